"""Experiment configuration: typed sections, YAML loading, ``--set`` overrides and checks.

One YAML file per experiment with the sections ``model``, ``data``, ``mixture``, ``train``,
``deepspeed``, ``eval``, ``checkpoint`` and ``logging``; the ``deepspeed`` section names a DeepSpeed
JSON (``ds_configs/``). :func:`load_config` parses, type-checks and checks the whole tree before any
process group exists, in three steps: the typed construction (types, unknown keys, choice fields typed
``Literal``), each section's own ``check`` (beside its fields), then :func:`cross_check` (the rules
that span sections and the DeepSpeed JSON). Every mistake a user can make raises one
:class:`ConfigError` whose message names the key path (``mixture.weights``) and what to do about it.

Relative paths are resolved against the current working directory by :func:`resolve_paths`, after the
checks, and the resolved config (absolute paths, defaults filled in) is what a run writes into its
directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError", "Config", "ModelConfig", "DataConfig", "SourceConfig", "UnitConfig",
    "TokenizerConfig", "PlantedConfig", "MixtureConfig", "ProbeConfig", "TrainConfig", "DeepSpeedSection",
    "EvalConfig", "CheckpointConfig", "LoggingConfig", "load_config", "apply_overrides", "section_from_overrides",
    "cross_check", "resolve_paths", "config_to_dict", "SCHEDULES", "METHODS", "FORMS", "ESTIMATORS",
    "DOMAIN_SOURCES", "SOURCE_TYPES", "CORPUS_TYPES", "BENCHMARKS", "BATCH_MODES", "ATTENTION",
]

# Choice fields: each list of names is written once, here; the tuples below are derived from it.
Schedule = Literal["linear_warmup_cosine", "linear_warmup_exponential", "linear_warmup_decay"]
# Reweighting methods (grape_ds.controller.METHOD_FNS holds their update rules; a test keeps the two
# lists equal without making the config import the controller).
Method = Literal["static", "grape", "grape_ema", "grape_gap", "doge"]
Form = Literal["research", "alignment"]
Estimator = Literal["sketch", "exact"]
DomainSource = Literal["inband", "probe"]
BatchMode = Literal["domain_pure", "mixed"]
Attention = Literal["sdpa", "eager"]  # transformers' attn_implementation values that need no extra package
# The public corpora's adapters (grape_ds.data.corpora); with the generic sources and target benchmarks
# (grape_ds.data.benchmarks) they make the source types.
CorpusType = Literal["climblab", "slimpajama", "wiki40b"]
SourceType = Literal["jsonl", "text", "parquet", "disk", "hub", CorpusType, "benchmark"]
# Target benchmarks (grape_ds.data.benchmarks.BENCHMARKS holds their specs; a test keeps the lists equal).
Benchmark = Literal["logiqa", "arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq", "humaneval", "kodcode",
                    "gsm8k", "mathqa", "medqa"]

SCHEDULES = typing.get_args(Schedule)
METHODS = typing.get_args(Method)
FORMS = typing.get_args(Form)
ESTIMATORS = typing.get_args(Estimator)
DOMAIN_SOURCES = typing.get_args(DomainSource)
BATCH_MODES = typing.get_args(BatchMode)
ATTENTION = typing.get_args(Attention)
CORPUS_TYPES = typing.get_args(CorpusType)
SOURCE_TYPES = typing.get_args(SourceType)
BENCHMARKS = typing.get_args(Benchmark)


class ConfigError(ValueError):
    """A config the user wrote is wrong; the message names the key and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _at(key: str) -> str:
    """The prefix of a field's key path under section ``key`` ("" for a section at the root)."""
    return f"{key}." if key else ""


def _check_exists(path: str, key: str) -> None:
    _require(Path(path).exists(), f"{key}: path does not exist: {Path(path)}")


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


# ----------------------------------------------------------------------------------------------
# Sections. Each field's comment is its meaning, unit and range; each section's ``check(key)`` holds
# the rules that involve its own fields only and raises ConfigError naming ``<key>.<field>``.
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    n_layer: int = 2            # transformer blocks
    n_embd: int = 128           # hidden width
    n_head: int = 4             # attention heads; must divide n_embd
    n_positions: int = 128      # context length of the model; >= data.seq_len
    dropout: float = 0.0        # residual, embedding and attention dropout, in [0, 1)
    vocab_size: int | None = None  # embedding rows; null: the tokenizer's vocabulary. Larger pads the
                                # embedding and LM head (GPT-2's 50257 padded to 50304, as nanoGPT does)
    attn_implementation: Attention = "sdpa"  # PyTorch's scaled_dot_product_attention (flash /
                                # memory-efficient kernels on GPUs), or "eager" (transformers' own)
    init_from: str | None = None  # local folder of a HF GPT-2 checkpoint to start from (optional)

    def check(self, key: str = "model") -> None:
        p = _at(key)
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            _require(getattr(self, name) > 0, f"{p}{name}: must be > 0")
        _require(self.n_embd % self.n_head == 0,
                 f"{p}n_head: {self.n_head} does not divide {p}n_embd={self.n_embd}")
        _require(0 <= self.dropout < 1, f"{p}dropout: must be in [0, 1), got {self.dropout}")
        _require(self.vocab_size is None or self.vocab_size > 0, f"{p}vocab_size: must be > 0 (or null)")
        if self.init_from is not None:
            _check_exists(self.init_from, f"{p}init_from")


@dataclass
class SourceConfig:
    type: SourceType = "jsonl"  # generic (jsonl, text, parquet, disk, hub), a corpus or a benchmark
    path: str | None = None     # file, folder or glob (jsonl/text/parquet/disk); for a corpus or
                                # benchmark: a local copy (folder of the hub's files) used instead of the hub
    field: str = "text"         # column/key holding the document text (generic types)
    hub_id: str | None = None   # type=hub: the id passed to datasets.load_dataset; corpus/benchmark:
                                # overrides the default id (null: the public one)
    hub_config: str | None = None  # type=hub: the data set's config name
    split: str = "train"        # hub / disk (DatasetDict) / corpus / benchmark: which split
    revision: str | None = None  # hub, corpus, benchmark: git revision
    subset: str | int | None = None  # corpus: ClimbLab cluster id (1-20), SlimPajama redpajama_set_name,
                                # Wiki40B language code; a corpus's subset is kept as text (3 and "3" agree)
    benchmark: Benchmark | None = None  # type=benchmark: which one
    eval_split: str | None = None  # type=benchmark: split scored for accuracy in evaluation; must differ
                                   # from `split`, which drives the task weights (null: the benchmark's default)

    def __post_init__(self) -> None:
        if self.type in CORPUS_TYPES and self.subset is not None:
            self.subset = str(self.subset)

    def check(self, key: str) -> None:
        """The fields the source's type needs, and its local paths (file, folder or glob) exist."""
        p = _at(key)
        if self.type in CORPUS_TYPES:
            _require(self.subset is not None and str(self.subset) != "",
                     f"{p}subset: a {self.type} source needs a subset (ClimbLab cluster id, SlimPajama "
                     "set name or Wiki40B language)")
        if self.type == "benchmark":
            _require(self.benchmark is not None,
                     f"{p}benchmark: a benchmark source needs a benchmark; choose from {list(BENCHMARKS)}")
            _require(self.eval_split is None or self.eval_split != self.split,
                     f"{p}eval_split: {self.eval_split!r} is also the split that drives the task weights; "
                     "evaluate on a different split")
        if self.type in CORPUS_TYPES or self.type == "benchmark":
            if self.path:  # a local copy instead of the hub
                _check_exists(self.path, f"{p}path")
            return
        if self.type == "hub":
            _require(bool(self.hub_id), f"{p}hub_id: a hub source needs a data set id")
            return
        _require(bool(self.path), f"{p}path: a {self.type} source needs a path")
        if _is_glob(self.path):
            _require(bool(glob.glob(self.path)), f"{p}path: no file matches {self.path}")
        else:
            _check_exists(self.path, f"{p}path")

    def resolve_path(self) -> None:
        """``path`` made absolute where :meth:`check` found it on disk (not a glob, not a hub source's)."""
        if not self.path or self.type == "hub":
            return
        if self.type in CORPUS_TYPES or self.type == "benchmark" or not _is_glob(self.path):
            self.path = str(Path(self.path).resolve())


@dataclass
class UnitConfig:
    """A source domain or a target task: a name and where its text comes from."""
    name: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)

    def check(self, key: str) -> None:
        _require(bool(self.name), f"{_at(key)}name: every unit needs a name")
        self.source.check(f"{_at(key)}source")


@dataclass
class TokenizerConfig:
    name: str | None = None     # HF tokenizer name or local path; null trains a byte-level BPE
    vocab_size: int = 1024      # vocabulary of the trained BPE (ignored when name is set)

    def check(self, key: str = "data.tokenizer") -> None:
        _require(self.name is not None or self.vocab_size >= 259,
                 f"{_at(key)}vocab_size: a byte-level BPE needs at least 259 entries")


@dataclass
class PlantedConfig:
    num_domains: int = 6        # source domains K, >= 3
    num_tasks: int = 3          # target tasks N, >= 2
    seed: int = 0               # generator seed: same seed, same corpus
    docs_per_domain: int = 1500  # documents generated per domain, >= 1
    docs_per_task: int = 300    # documents generated per task, >= 1

    def check(self, key: str = "data.planted") -> None:
        p = _at(key)
        _require(self.num_domains >= 3, f"{p}num_domains: must be >= 3")
        _require(self.num_tasks >= 2, f"{p}num_tasks: must be >= 2")
        for name in ("docs_per_domain", "docs_per_task"):
            _require(getattr(self, name) >= 1, f"{p}{name}: must be >= 1")


@dataclass
class DataConfig:
    cache_dir: str = ".cache/grape_ds"  # packed shards and trained tokenizers (reused by content hash)
    seq_len: int = 128          # tokens per training window
    val_fraction: float = 0.05  # share of each unit's windows held out for validation, in (0, 0.5]
    max_tokens_per_domain: int | None = None  # cap on packed tokens per unit (null: all)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    planted: PlantedConfig | None = None  # the built-in planted corpus (mutually exclusive with domains)
    domains: list[UnitConfig] = field(default_factory=list)  # source domains
    tasks: list[UnitConfig] = field(default_factory=list)    # target tasks (LM text)

    def check(self, key: str = "data") -> None:
        """Its own keys, the tokenizer, and the planted corpus or every unit (unique names, sources)."""
        p = _at(key)
        _require(self.seq_len > 1, f"{p}seq_len: must be > 1")
        _require(0 < self.val_fraction <= 0.5, f"{p}val_fraction: must be in (0, 0.5], got {self.val_fraction}")
        _require(self.max_tokens_per_domain is None or self.max_tokens_per_domain > self.seq_len,
                 f"{p}max_tokens_per_domain: must exceed {p}seq_len (or be null)")
        self.tokenizer.check(f"{p}tokenizer")
        if self.planted is not None:
            _require(not self.domains and not self.tasks,
                     f"{p}planted: set either {p}planted or {p}domains/{p}tasks, not both")
            self.planted.check(f"{p}planted")
            return
        _require(len(self.domains) > 0, f"{p}domains: no source domains (or set {p}planted for the built-in corpus)")
        for section, units in (("domains", self.domains), ("tasks", self.tasks)):
            seen = set()
            for i, unit in enumerate(units):
                unit.check(f"{p}{section}[{i}]")
                _require(unit.name not in seen, f"{p}{section}[{i}].name: duplicate name {unit.name!r}")
                seen.add(unit.name)


@dataclass
class MixtureConfig:
    method: Method = "static"   # a method of grape_ds.controller.METHOD_FNS
    weights: list[float] | None = None  # initial domain weights alpha (null: uniform); renormalised
    task_weights: list[float] | None = None  # initial task weights z (null: uniform); renormalised
    floor: float = 1e-3         # adaptive methods: no domain weight goes below this (the controller's
                                # floor; the sampler draws the weights exactly); num_domains*floor < 1.
                                # static: no floor, the weights are drawn as written (0 = never)
    batch: BatchMode = "domain_pure"  # a micro-batch from one domain, or mixed per sequence
    every: int = 0              # a reweighting round after every this-many-th optimizer step (<= 0:
                                # never): after steps 100, 200, ... counted from 1, which is the
                                # research code's (t+1) % T == 0 with its 0-based t (its "step 99")
    mu_domain: float = 1.5      # exponentiated-gradient step on alpha (research code: mu_train)
    mu_task: float = 5.0        # exponentiated-gradient step on z (research code: mu_tgt)
    form: Form = "research"     # "research": the research code's estimators exactly (per-batch clipped
                                # mixture batches, probe.mixture_batches); "alignment": the explicit
                                # alignment-matrix form (ALGORITHMS.md §4.10), no clipping, no mixture batches
    unit_clip: float | None = 1.0  # research form: clip each unit gradient to this norm (null: no clip)
    task_smoothing: float = 0.001  # z <- (1 - s) z + s / N after each task update (research: 0.001)
    ema_beta: float = 0.9       # grape_ema: EMA factor of each task's loss

    @property
    def adaptive(self) -> bool:
        """Whether reweighting rounds run (a method other than static, every > 0)."""
        return self.method != "static" and self.every > 0

    def check(self, key: str = "mixture") -> None:
        """Steps and factors in range; the weights against the units are :func:`cross_check`'s."""
        p = _at(key)
        _require(self.floor >= 0, f"{p}floor: must be >= 0, got {self.floor}")
        _require(self.mu_domain >= 0 and self.mu_task >= 0, f"{p}mu_domain / {p}mu_task: must be >= 0")
        _require(self.unit_clip is None or self.unit_clip > 0, f"{p}unit_clip: must be > 0 (or null)")
        _require(0 <= self.task_smoothing < 1, f"{p}task_smoothing: must be in [0, 1)")
        _require(0 <= self.ema_beta < 1, f"{p}ema_beta: must be in [0, 1)")


@dataclass
class ProbeConfig:
    estimator: Estimator = "sketch"  # "sketch" (projection of dimension dim) or "exact" (full dot products)
    dim: int = 32768            # sketch dimension m; the buffer is [units, m] fp32 (bench fidelity)
    seed: int = 0               # seeds the projection; identical on every rank
    domains: DomainSource = "inband"  # where domain gradients come from: "inband" (the training
                                # micro-batches, needs mixture.batch=domain_pure) or "probe" (extra probe batches)
    window: int = 2             # inband: the last this-many optimizer steps before a round feed it
    batch_size: int = 4         # sequences per probe batch, per unit and rank (tasks; domains in "probe";
                                # in-band domains that drew no micro-batch in the window)
    mixture_batches: int = 2    # research form: B_r, the train-mixture and the target-mixture batches
                                # each clipped on its own (research code: reweight_batch_size //
                                # reweight_mini_batch_size: 16 // 8 = 2 by default, 32 // 8 = 4 in CLIMB)
    mixture_batch_size: int | None = None  # sequences per mixture batch, per rank (null:
                                # train.micro_batch_size, the research code's per_device_train_batch_size)

    def check(self, key: str = "probe") -> None:
        p = _at(key)
        _require(self.dim > 0 and self.batch_size > 0, f"{p}dim / {p}batch_size: must be > 0")
        _require(self.mixture_batch_size is None or self.mixture_batch_size > 0,
                 f"{p}mixture_batch_size: must be > 0 (or null: train.micro_batch_size)")
        _require(self.window >= 1, f"{p}window: must be >= 1")


@dataclass
class TrainConfig:
    seed: int = 1234            # model init and data sampling seed
    max_steps: int = 200        # optimizer steps; the LR schedule's horizon
    micro_batch_size: int = 8   # sequences per rank per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3            # peak learning rate
    lr_end: float = 1e-4        # final learning rate
    schedule: Schedule = "linear_warmup_cosine"  # a schedule of grape_ds.schedules.SCHEDULES
    warmup_steps: int = 20      # linear warm-up from 1e-7 to lr
    decay_rate: float = 0.1     # linear_warmup_decay: share of max_steps spent decaying, in (0, 1]
    weight_decay: float = 0.01  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8           # AdamW epsilon
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms, cuBLAS
                                # workspace): two GPU runs of one config give identical parameters.
                                # Slower on GPUs; CPU runs are deterministic either way

    def check(self, key: str = "train") -> None:
        p = _at(key)
        _require(self.max_steps > 0, f"{p}max_steps: must be > 0")
        _require(self.micro_batch_size > 0, f"{p}micro_batch_size: must be > 0")
        _require(self.gradient_accumulation_steps > 0, f"{p}gradient_accumulation_steps: must be > 0")
        _require(self.lr > 0 and self.lr_end >= 0, f"{p}lr / {p}lr_end: must be positive")
        _require(0 <= self.warmup_steps < self.max_steps,
                 f"{p}warmup_steps: must be in [0, {p}max_steps={self.max_steps})")
        _require(0 < self.decay_rate <= 1, f"{p}decay_rate: must be in (0, 1], got {self.decay_rate}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}betas: two numbers in [0, 1)")
        if self.schedule == "linear_warmup_exponential":
            _require(self.lr != self.lr_end, f"{p}lr_end: linear_warmup_exponential needs lr_end != lr")


_DS_FORBIDDEN = {
    "optimizer": "grape-ds passes torch.optim.AdamW as the client optimizer; set lr/betas/weight_decay under train:",
    "scheduler": "grape-ds owns the LR schedule; set train.schedule / train.warmup_steps instead",
}


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2_fp32.json"  # DeepSpeed JSON; batch keys must agree with train
    timeout_minutes: float = 30.0  # collective timeout of the process group

    def check(self, key: str = "deepspeed") -> None:
        """The timeout, and the JSON on its own (:meth:`read_json`); its batch keys are :func:`cross_check`'s."""
        _require(self.timeout_minutes > 0, f"{_at(key)}timeout_minutes: must be > 0")
        self.read_json(key)

    def read_json(self, key: str = "deepspeed") -> dict:
        """The DeepSpeed JSON of ``config``: it exists, parses, brings no optimizer or scheduler, uses ZeRO
        stage 0-2 and at most one of fp16/bf16 (none with torch_autocast)."""
        k, path = f"{_at(key)}config", Path(self.config)
        _require(path.is_file(), f"{k}: DeepSpeed JSON not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{k}: {path} is not valid JSON: {exc}") from None
        for name, why in _DS_FORBIDDEN.items():
            _require(name not in ds, f"{k}: {path} has an '{name}' section; {why}")
        zero = ds.get("zero_optimization", {}).get("stage", 0)
        _require(zero in (0, 1, 2), f"{k}: zero_optimization.stage={zero}; grape-ds supports stages 0-2")
        fp16, bf16 = (ds.get(name, {}).get("enabled", False) for name in ("fp16", "bf16"))
        _require(not (fp16 and bf16), f"{k}: {path} enables both fp16 and bf16; choose one")
        if ds.get("torch_autocast", {}).get("enabled", False):
            _require(not (fp16 or bf16), f"{k}: {path} enables torch_autocast together with "
                     "fp16/bf16; autocast keeps fp32 weights, so drop the fp16/bf16 section")
        return ds


@dataclass
class EvalConfig:
    every: int = 0              # per-domain validation sweep every this many steps (<= 0: only at the end)
    batch_size: int = 16        # sequences per evaluation forward
    max_windows: int | None = None  # cap on validation windows swept per domain (null: all)
    max_items: int | None = None  # cap on multiple-choice items scored per benchmark task (null: all)

    def check(self, key: str = "eval") -> None:
        p = _at(key)
        _require(self.batch_size > 0, f"{p}batch_size: must be > 0")
        _require(self.max_items is None or self.max_items > 0, f"{p}max_items: must be > 0 (or null)")
        _require(self.max_windows is None or self.max_windows > 0,
                 f"{p}max_windows: must be > 0 (or null: every validation window)")


@dataclass
class CheckpointConfig:
    every: int = 100            # save every this many optimizer steps (<= 0: only at the end)
    keep_last: int = 2          # complete checkpoints kept; older ones are deleted
    resume: bool = True         # resume from the latest complete checkpoint in the run directory

    def check(self, key: str = "checkpoint") -> None:
        _require(self.keep_last >= 1, f"{_at(key)}keep_last: must be >= 1")


@dataclass
class LoggingConfig:
    output_dir: str = "runs"    # run directories are created under this folder
    run_name: str = "run"       # the run directory's name
    every: int = 10             # TensorBoard/console logging period in optimizer steps
    progress: bool = True       # progress bar on rank 0's console
    trace_batches: bool = False  # write every rank's drawn (domain, window) ids to <run>/trace/

    def check(self, key: str = "logging") -> None:
        p, name = _at(key), self.run_name
        _require(self.every > 0, f"{p}every: must be > 0")
        _require(bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0"),
                 f"{p}run_name: {name!r} is not a folder name; give a non-empty name without '/', "
                 "'\\' or NUL that is not '.' or '..'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Filled by load_config: the DeepSpeed JSON, with the batch keys resolved for the world size.
    ds_config: dict = field(default_factory=dict, repr=False)

    def check(self) -> None:
        """Every section's own check, in file order (ConfigError naming the key); not :func:`cross_check`."""
        for f in dataclasses.fields(self):
            if f.name != "ds_config":
                getattr(self, f.name).check(f.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.output_dir) / self.logging.run_name

    @property
    def domain_names(self) -> list[str]:
        if self.data.planted is not None:
            return [f"domain_{k}" for k in range(self.data.planted.num_domains)]
        return [d.name for d in self.data.domains]

    @property
    def task_names(self) -> list[str]:
        if self.data.planted is not None:
            return [f"task_{n}" for n in range(self.data.planted.num_tasks)]
        return [t.name for t in self.data.tasks]


# ----------------------------------------------------------------------------------------------
# Generic typed construction from nested dicts.
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``path``; a ``Literal`` field takes one
    of its choices (the message lists them, with a did-you-mean)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is None:
            raise ConfigError(f"{path}: must not be null; choose from {list(choices)}")
        if isinstance(value, str) and value in choices:  # every choice field's names are strings
            return value
        raise ConfigError(f"{path}: unknown value {value!r}; choose from {list(choices)}"
                          + _did_you_mean(str(value), choices))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{path}: expected one of {[_type_name(a) for a in args]}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no key of the config means anything by .inf or .nan
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {path}")



def _build(cls: type, values: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.repr or f.name != "ds_config"}
    unknown = [k for k in values if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}: {cls.__name__} has keys {sorted(fields)}"
            + _did_you_mean(str(unknown[0]), fields))
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _did_you_mean(key: str, options) -> str:
    import difflib
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data (what ``config.yaml`` in a run directory holds)."""
    out = dataclasses.asdict(cfg)
    out.pop("ds_config", None)
    return out


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------

def apply_overrides(raw: dict, overrides: list[str], root: type = Config) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict of section ``root``, in place.

    Raises ConfigError naming the ``--set`` key: no ``=``, a value that is not YAML, an unknown key (with
    a did-you-mean), or a key below one that is not a section.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {text!r} as YAML: {exc}") from None
        parts = key.split(".")
        node = raw
        cls: Any = root
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
            if names is not None and part not in names:
                raise ConfigError(f"--set {key}: unknown key {here}" + _did_you_mean(part, names))
            if i == len(parts) - 1:
                if value is not None and _is_str_field(cls, part):
                    value = text.strip()  # keep "off", "1e3", "yes" as written for string keys
                    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
                        value = value[1:-1]
                node[part] = value
                break
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None:
                    raise ConfigError(f"--set {key}: {here} is not a section")
                node[part] = {}
            node = node[part]
            cls = _section_class(cls, part)
    return raw


def _is_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))


def _is_str_field(cls: Any, name: str) -> bool:
    """A string key (``str``, a ``Literal`` of strings, or either or null)."""
    if not dataclasses.is_dataclass(cls):
        return False
    tp = typing.get_type_hints(cls).get(name)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _is_str(args[0])
    return _is_str(tp)


def _section_class(cls: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def section_from_overrides(cls: type, overrides: list[str]) -> Any:
    """One section of type ``cls`` (e.g. PlantedConfig) from its defaults and ``--set`` overrides whose keys
    are relative to it (``num_domains=9``), type-checked and checked as in an experiment (its ``check``);
    raises ConfigError naming the key, as :func:`load_config` does."""
    section = _build(cls, apply_overrides({}, list(overrides), root=cls), "")
    section.check("")
    return section


# ----------------------------------------------------------------------------------------------
# Load, check, resolve
# ----------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Read, override, type-check and check an experiment, then make its paths absolute.

    ``world_size`` defaults to the ``WORLD_SIZE`` environment variable (1 when unset); it is only used
    for the batch arithmetic against the DeepSpeed JSON. Fills ``ds_config`` (:func:`cross_check`).
    Raises ConfigError (a missing or malformed file, or any mistake in it; the message names the key).
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    apply_overrides(raw, list(overrides or []))
    cfg = _build(Config, raw, "")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check()
    cfg.ds_config = cross_check(cfg, world_size)
    resolve_paths(cfg)
    return cfg


def _check_weights(weights: list[float] | None, names: list[str], key: str, what: str) -> None:
    if weights is None:
        return
    _require(len(weights) == len(names),
             f"{key}: {len(weights)} weights for {len(names)} {what} {names}; give one weight per {what[:-1]}")
    for name, w in zip(names, weights):
        _require(w == w and w not in (float("inf"), float("-inf")), f"{key}: weight of {name} is {w}")
        _require(w >= 0, f"{key}: weight of {name} is negative ({w}); weights must be >= 0")
    _require(sum(weights) > 0, f"{key}: all weights are zero; at least one must be positive")


def cross_check(cfg: Config, world_size: int = 1) -> dict:
    """The rules that span sections, after each section's own check (:meth:`Config.check`): data.seq_len
    vs model.n_positions; mixture.weights / task_weights / floor vs the domains and tasks; reweighting
    vs the tasks and the probe (mixture_batches, window, in-band domains); train's batch sizes vs the
    DeepSpeed JSON at ``world_size`` ranks. Returns that JSON with its batch keys set (``ds_config``).
    """
    m, d, mix, pr, t = cfg.model, cfg.data, cfg.mixture, cfg.probe, cfg.train
    _require(d.seq_len <= m.n_positions, f"data.seq_len: {d.seq_len} exceeds model.n_positions={m.n_positions}")
    _check_weights(mix.weights, cfg.domain_names, "mixture.weights", "domains")
    _check_weights(mix.task_weights, cfg.task_names, "mixture.task_weights", "tasks")
    k = len(cfg.domain_names)
    _require(mix.floor * k < 1, f"mixture.floor: {mix.floor} x {k} domains must be < 1; lower the floor")
    if mix.adaptive:
        _require(len(cfg.task_names) > 0, f"mixture.method: {mix.method} needs target tasks (data.tasks)")
        if mix.form == "research":
            _require(pr.mixture_batches >= 1, "probe.mixture_batches: the research form needs at least one "
                     "train-mixture and one target-mixture batch per round (or set mixture.form=alignment)")
    if mix.every > 0:
        _require(pr.window <= mix.every, f"probe.window: {pr.window} exceeds mixture.every={mix.every}")
    if pr.domains == "inband" and mix.method != "static":
        _require(mix.batch == "domain_pure",
                 "probe.domains: inband domain gradients need mixture.batch=domain_pure "
                 "(or set probe.domains=probe)")
    ds = cfg.deepspeed.read_json("deepspeed")
    expected = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
    }
    for key, want in expected.items():
        if key in ds and ds[key] != want:
            raise ConfigError(
                f"deepspeed.config: {Path(cfg.deepspeed.config)} has {key}={ds[key]}, but train.micro_batch_size "
                f"({t.micro_batch_size}) x train.gradient_accumulation_steps ({t.gradient_accumulation_steps}) "
                f"x world size ({world_size}) gives {key}={want}; make them agree (or drop the key from the JSON)")
    ds.update(expected)
    return ds


def resolve_paths(cfg: Config) -> None:
    """Make the config's local paths absolute, against the current directory, in place; after the checks,
    which found the paths that must exist. model.init_from, data.cache_dir, data.tokenizer.name (when it
    names something on disk, not a hub id), each unit's source.path (:meth:`SourceConfig.resolve_path`:
    not a glob, not a hub source's), logging.output_dir and deepspeed.config."""
    if cfg.model.init_from is not None:
        cfg.model.init_from = str(Path(cfg.model.init_from).resolve())
    d = cfg.data
    d.cache_dir = str(Path(d.cache_dir).resolve())
    if d.tokenizer.name is not None and Path(d.tokenizer.name).exists():
        d.tokenizer.name = str(Path(d.tokenizer.name).resolve())
    for unit in (*d.domains, *d.tasks):
        unit.source.resolve_path()
    cfg.logging.output_dir = str(Path(cfg.logging.output_dir).resolve())
    cfg.deepspeed.config = str(Path(cfg.deepspeed.config).resolve())
