"""Experiment configuration: typed sections, YAML loading, ``--set`` overrides and validation.

One YAML file per experiment with the sections ``model``, ``data``, ``mixture``, ``train``,
``deepspeed``, ``eval``, ``checkpoint`` and ``logging``; the ``deepspeed`` section names a DeepSpeed
JSON (``ds_configs/``). :func:`load_config` parses, type-checks and cross-checks the whole tree before
any process group exists. Every mistake a user can make raises one :class:`ConfigError` whose message
names the key path (``mixture.weights``) and what to do about it.

Relative paths are resolved against the current working directory, and the resolved config (absolute
paths, defaults filled in) is what a run writes into its directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError", "Config", "ModelConfig", "DataConfig", "SourceConfig", "UnitConfig",
    "TokenizerConfig", "PlantedConfig", "MixtureConfig", "ProbeConfig", "TrainConfig", "DeepSpeedSection",
    "EvalConfig", "CheckpointConfig", "LoggingConfig", "load_config", "apply_overrides",
    "config_to_dict", "SCHEDULES", "METHODS", "SOURCE_TYPES", "CORPUS_TYPES", "BENCHMARKS", "BATCH_MODES",
    "ATTENTION",
]

SCHEDULES = ("linear_warmup_cosine", "linear_warmup_exponential", "linear_warmup_decay")
# Reweighting methods (grape_ds.controller.METHOD_FNS holds their update rules; a test keeps the two
# lists equal without making the config import the controller).
METHODS = ("static", "grape", "grape_ema", "grape_gap", "doge")
FORMS = ("research", "alignment")
ESTIMATORS = ("sketch", "exact")
DOMAIN_SOURCES = ("inband", "probe")
# Generic sources, the public corpora's adapters (grape_ds.data.corpora) and target benchmarks
# (grape_ds.data.benchmarks).
SOURCE_TYPES = ("jsonl", "text", "parquet", "disk", "hub", "climblab", "slimpajama", "wiki40b", "benchmark")
CORPUS_TYPES = ("climblab", "slimpajama", "wiki40b")
# Target benchmarks (grape_ds.data.benchmarks.BENCHMARKS holds their specs; a test keeps the lists equal).
BENCHMARKS = ("logiqa", "arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq", "humaneval", "kodcode",
              "gsm8k", "mathqa", "medqa")
BATCH_MODES = ("domain_pure", "mixed")
ATTENTION = ("sdpa", "eager")  # transformers' attn_implementation values that need no extra package


class ConfigError(ValueError):
    """A config the user wrote is wrong; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------
# Sections. Each field's comment is its meaning, unit and range.
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
    attn_implementation: str = "sdpa"  # one of ATTENTION: PyTorch's scaled_dot_product_attention
                                # (flash / memory-efficient kernels on GPUs), or "eager" (transformers' own)
    init_from: str | None = None  # local folder of a HF GPT-2 checkpoint to start from (optional)


@dataclass
class SourceConfig:
    type: str = "jsonl"         # one of SOURCE_TYPES
    path: str | None = None     # file, folder or glob (jsonl/text/parquet/disk); for a corpus or
                                # benchmark: a local copy (folder of the hub's files) used instead of the hub
    field: str = "text"         # column/key holding the document text (generic types)
    hub_id: str | None = None   # type=hub: the id passed to datasets.load_dataset; corpus/benchmark:
                                # overrides the default id (null: the public one)
    hub_config: str | None = None  # type=hub: the data set's config name
    split: str = "train"        # hub / disk (DatasetDict) / corpus / benchmark: which split
    revision: str | None = None  # hub, corpus, benchmark: git revision
    subset: str | int | None = None  # corpus: ClimbLab cluster id (1-20), SlimPajama redpajama_set_name,
                                # Wiki40B language code
    benchmark: str | None = None  # type=benchmark: one of BENCHMARKS
    eval_split: str | None = None  # type=benchmark: split scored for accuracy in evaluation; must differ
                                   # from `split`, which drives the task weights (null: the benchmark's default)


@dataclass
class UnitConfig:
    """A source domain or a target task: a name and where its text comes from."""
    name: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)


@dataclass
class TokenizerConfig:
    name: str | None = None     # HF tokenizer name or local path; null trains a byte-level BPE
    vocab_size: int = 1024      # vocabulary of the trained BPE (ignored when name is set)


@dataclass
class PlantedConfig:
    num_domains: int = 6        # source domains K
    num_tasks: int = 3          # target tasks N
    seed: int = 0               # generator seed: same seed, same corpus
    docs_per_domain: int = 1500  # documents generated per domain
    docs_per_task: int = 300    # documents generated per task


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


@dataclass
class MixtureConfig:
    method: str = "static"      # one of METHODS
    weights: list[float] | None = None  # initial domain weights alpha (null: uniform); renormalised
    task_weights: list[float] | None = None  # initial task weights z (null: uniform); renormalised
    floor: float = 1e-3         # adaptive methods: no domain weight goes below this (the controller's
                                # floor; the sampler draws the weights exactly); num_domains*floor < 1.
                                # static: no floor, the weights are drawn as written (0 = never)
    batch: str = "domain_pure"  # one of BATCH_MODES: a micro-batch from one domain, or mixed per sequence
    every: int = 0              # a reweighting round after every this-many-th optimizer step (<= 0:
                                # never): after steps 100, 200, ... counted from 1, which is the
                                # research code's (t+1) % T == 0 with its 0-based t (its "step 99")
    mu_domain: float = 1.5      # exponentiated-gradient step on alpha (research code: mu_train)
    mu_task: float = 5.0        # exponentiated-gradient step on z (research code: mu_tgt)
    form: str = "research"      # "research": the research code's estimators exactly (per-batch clipped
                                # mixture batches, probe.mixture_batches); "alignment": the explicit
                                # alignment-matrix form (ALGORITHMS.md §4.10), no clipping, no mixture batches
    unit_clip: float | None = 1.0  # research form: clip each unit gradient to this norm (null: no clip)
    task_smoothing: float = 0.001  # z <- (1 - s) z + s / N after each task update (research: 0.001)
    ema_beta: float = 0.9       # grape_ema: EMA factor of each task's loss


@dataclass
class ProbeConfig:
    estimator: str = "sketch"   # "sketch" (projection of dimension dim) or "exact" (full dot products)
    dim: int = 32768            # sketch dimension m; the buffer is [units, m] fp32 (bench fidelity)
    seed: int = 0               # seeds the projection; identical on every rank
    domains: str = "inband"     # where domain gradients come from: "inband" (the training micro-batches,
                                # needs mixture.batch=domain_pure) or "probe" (extra probe batches)
    window: int = 2             # inband: the last this-many optimizer steps before a round feed it
    batch_size: int = 4         # sequences per probe batch, per unit and rank (tasks; domains in "probe";
                                # in-band domains that drew no micro-batch in the window)
    mixture_batches: int = 2    # research form: B_r, the train-mixture and the target-mixture batches
                                # each clipped on its own (research code: reweight_batch_size //
                                # reweight_mini_batch_size: 16 // 8 = 2 by default, 32 // 8 = 4 in CLIMB)
    mixture_batch_size: int | None = None  # sequences per mixture batch, per rank (null:
                                # train.micro_batch_size, the research code's per_device_train_batch_size)


@dataclass
class TrainConfig:
    seed: int = 1234            # model init and data sampling seed
    max_steps: int = 200        # optimizer steps; the LR schedule's horizon
    micro_batch_size: int = 8   # sequences per rank per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3            # peak learning rate
    lr_end: float = 1e-4        # final learning rate
    schedule: str = "linear_warmup_cosine"  # one of SCHEDULES
    warmup_steps: int = 20      # linear warm-up from 1e-7 to lr
    decay_rate: float = 0.1     # linear_warmup_decay: share of max_steps spent decaying, in (0, 1]
    weight_decay: float = 0.01  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8           # AdamW epsilon
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms, cuBLAS
                                # workspace): two GPU runs of one config give identical parameters.
                                # Slower on GPUs; CPU runs are deterministic either way


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2_fp32.json"  # DeepSpeed JSON; batch keys must agree with train
    timeout_minutes: float = 30.0  # collective timeout of the process group


@dataclass
class EvalConfig:
    every: int = 0              # per-domain validation sweep every this many steps (<= 0: only at the end)
    batch_size: int = 16        # sequences per evaluation forward
    max_windows: int | None = None  # cap on validation windows swept per domain (null: all)
    max_items: int | None = None  # cap on multiple-choice items scored per benchmark task (null: all)


@dataclass
class CheckpointConfig:
    every: int = 100            # save every this many optimizer steps (<= 0: only at the end)
    keep_last: int = 2          # complete checkpoints kept; older ones are deleted
    resume: bool = True         # resume from the latest complete checkpoint in the run directory


@dataclass
class LoggingConfig:
    output_dir: str = "runs"    # run directories are created under this folder
    run_name: str = "run"       # the run directory's name
    every: int = 10             # TensorBoard/console logging period in optimizer steps
    progress: bool = True       # progress bar on rank 0's console
    trace_batches: bool = False  # write every rank's drawn (domain, window) ids to <run>/trace/


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
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
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

def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in place."""
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
        cls: Any = Config
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


def _is_str_field(cls: Any, name: str) -> bool:
    if not dataclasses.is_dataclass(cls):
        return False
    tp = typing.get_type_hints(cls).get(name)
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and set(typing.get_args(tp)) == {str, type(None)})


def _section_class(cls: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


# ----------------------------------------------------------------------------------------------
# Load + validate
# ----------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Read, override, type-check and validate an experiment.

    ``world_size`` defaults to the ``WORLD_SIZE`` environment variable (1 when unset); it is only used
    for the batch arithmetic against the DeepSpeed JSON.
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
    validate(cfg, world_size)
    return cfg


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_weights(weights: list[float] | None, names: list[str], key: str, what: str) -> None:
    if weights is None:
        return
    _require(len(weights) == len(names),
             f"{key}: {len(weights)} weights for {len(names)} {what} {names}; give one weight per {what[:-1]}")
    for name, w in zip(names, weights):
        _require(w == w and w not in (float("inf"), float("-inf")), f"{key}: weight of {name} is {w}")
        _require(w >= 0, f"{key}: weight of {name} is negative ({w}); weights must be >= 0")
    _require(sum(weights) > 0, f"{key}: all weights are zero; at least one must be positive")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks; fills ``cfg.ds_config`` and makes paths absolute."""
    m, d, mix, t = cfg.model, cfg.data, cfg.mixture, cfg.train
    # model
    for key in ("n_layer", "n_embd", "n_head", "n_positions"):
        _require(getattr(m, key) > 0, f"model.{key}: must be > 0")
    _require(m.n_embd % m.n_head == 0, f"model.n_head: {m.n_head} does not divide model.n_embd={m.n_embd}")
    _require(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _require(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size: must be > 0 (or null)")
    _require(m.attn_implementation in ATTENTION,
             f"model.attn_implementation: unknown {m.attn_implementation!r}; choose from {list(ATTENTION)}")
    if m.init_from is not None:
        m.init_from = _existing_path(m.init_from, "model.init_from")
    # data
    _require(d.seq_len > 1, "data.seq_len: must be > 1")
    _require(d.seq_len <= m.n_positions,
             f"data.seq_len: {d.seq_len} exceeds model.n_positions={m.n_positions}")
    _require(0 < d.val_fraction <= 0.5, f"data.val_fraction: must be in (0, 0.5], got {d.val_fraction}")
    _require(d.max_tokens_per_domain is None or d.max_tokens_per_domain > d.seq_len,
             "data.max_tokens_per_domain: must exceed data.seq_len (or be null)")
    _require(d.tokenizer.name is not None or d.tokenizer.vocab_size >= 259,
             "data.tokenizer.vocab_size: a byte-level BPE needs at least 259 entries")
    if d.planted is not None:
        _require(not d.domains and not d.tasks,
                 "data.planted: set either data.planted or data.domains/data.tasks, not both")
        _require(d.planted.num_domains >= 3, "data.planted.num_domains: must be >= 3")
        _require(d.planted.num_tasks >= 2, "data.planted.num_tasks: must be >= 2")
    else:
        _require(len(d.domains) > 0, "data.domains: no source domains (or set data.planted for the built-in corpus)")
        for section, units in (("data.domains", d.domains), ("data.tasks", d.tasks)):
            seen = set()
            for i, unit in enumerate(units):
                key = f"{section}[{i}]"
                _require(bool(unit.name), f"{key}.name: every unit needs a name")
                _require(unit.name not in seen, f"{key}.name: duplicate name {unit.name!r}")
                seen.add(unit.name)
                _validate_source(unit.source, f"{key}.source")
    if d.tokenizer.name is not None and Path(d.tokenizer.name).exists():
        d.tokenizer.name = str(Path(d.tokenizer.name).resolve())
    d.cache_dir = str(Path(d.cache_dir).resolve())
    # mixture
    _require(mix.method in METHODS, f"mixture.method: unknown method {mix.method!r}; choose from {list(METHODS)}")
    _require(mix.batch in BATCH_MODES, f"mixture.batch: unknown mode {mix.batch!r}; choose from {list(BATCH_MODES)}")
    _check_weights(mix.weights, cfg.domain_names, "mixture.weights", "domains")
    _check_weights(mix.task_weights, cfg.task_names, "mixture.task_weights", "tasks")
    k = len(cfg.domain_names)
    _require(0 <= mix.floor and mix.floor * k < 1,
             f"mixture.floor: {mix.floor} x {k} domains must be < 1 (and floor >= 0)")
    _require(mix.form in FORMS, f"mixture.form: unknown form {mix.form!r}; choose from {list(FORMS)}")
    _require(mix.mu_domain >= 0 and mix.mu_task >= 0, "mixture.mu_domain / mixture.mu_task: must be >= 0")
    _require(mix.unit_clip is None or mix.unit_clip > 0, "mixture.unit_clip: must be > 0 (or null)")
    _require(0 <= mix.task_smoothing < 1, "mixture.task_smoothing: must be in [0, 1)")
    _require(0 <= mix.ema_beta < 1, "mixture.ema_beta: must be in [0, 1)")
    if mix.method != "static" and mix.every > 0:
        _require(len(cfg.task_names) > 0, f"mixture.method: {mix.method} needs target tasks (data.tasks)")
    pr = cfg.probe
    _require(pr.estimator in ESTIMATORS, f"probe.estimator: unknown estimator {pr.estimator!r}; choose from {list(ESTIMATORS)}")
    _require(pr.domains in DOMAIN_SOURCES, f"probe.domains: unknown source {pr.domains!r}; choose from {list(DOMAIN_SOURCES)}")
    _require(pr.dim > 0 and pr.batch_size > 0, "probe.dim / probe.batch_size: must be > 0")
    _require(pr.mixture_batch_size is None or pr.mixture_batch_size > 0,
             "probe.mixture_batch_size: must be > 0 (or null: train.micro_batch_size)")
    if mix.form == "research" and mix.method != "static" and mix.every > 0:
        _require(pr.mixture_batches >= 1, "probe.mixture_batches: the research form needs at least one "
                 "train-mixture and one target-mixture batch per round (or set mixture.form=alignment)")
    _require(pr.window >= 1, "probe.window: must be >= 1")
    if mix.every > 0:
        _require(pr.window <= mix.every, f"probe.window: {pr.window} exceeds mixture.every={mix.every}")
    if pr.domains == "inband" and mix.method != "static":
        _require(mix.batch == "domain_pure",
                 "probe.domains: inband domain gradients need mixture.batch=domain_pure "
                 "(or set probe.domains=probe)")
    # train
    _require(t.schedule in SCHEDULES, f"train.schedule: unknown LR schedule {t.schedule!r}; choose from {list(SCHEDULES)}")
    _require(t.max_steps > 0, "train.max_steps: must be > 0")
    _require(t.micro_batch_size > 0, "train.micro_batch_size: must be > 0")
    _require(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps: must be > 0")
    _require(t.lr > 0 and t.lr_end >= 0, "train.lr / train.lr_end: must be positive")
    _require(0 <= t.warmup_steps < t.max_steps, f"train.warmup_steps: must be in [0, train.max_steps={t.max_steps})")
    _require(0 < t.decay_rate <= 1, f"train.decay_rate: must be in (0, 1], got {t.decay_rate}")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas: two numbers in [0, 1)")
    if t.schedule == "linear_warmup_exponential":
        _require(t.lr != t.lr_end, "train.lr_end: linear_warmup_exponential needs lr_end != lr")
    # eval / checkpoint / logging
    _require(cfg.eval.batch_size > 0, "eval.batch_size: must be > 0")
    _require(cfg.eval.max_items is None or cfg.eval.max_items > 0, "eval.max_items: must be > 0 (or null)")
    _require(cfg.eval.max_windows is None or cfg.eval.max_windows > 0,
             "eval.max_windows: must be > 0 (or null: every validation window)")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last: must be >= 1")
    _require(cfg.logging.every > 0, "logging.every: must be > 0")
    name = cfg.logging.run_name
    _require(bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0"),
             f"logging.run_name: {name!r} is not a folder name; give a non-empty name without '/', "
             "'\\' or NUL that is not '.' or '..'")
    _require(cfg.deepspeed.timeout_minutes > 0, "deepspeed.timeout_minutes: must be > 0")
    cfg.logging.output_dir = str(Path(cfg.logging.output_dir).resolve())
    cfg.ds_config = _resolve_ds_config(cfg, world_size)


def _existing_path(p: str, key: str) -> str:
    path = Path(p)
    _require(path.exists(), f"{key}: path does not exist: {path}")
    return str(path.resolve())


def _validate_source(src: SourceConfig, key: str) -> None:
    _require(src.type in SOURCE_TYPES, f"{key}.type: unknown source type {src.type!r}; choose from {list(SOURCE_TYPES)}")
    if src.type in CORPUS_TYPES:
        _require(src.subset is not None and str(src.subset) != "",
                 f"{key}.subset: a {src.type} source needs a subset (ClimbLab cluster id, SlimPajama "
                 "set name or Wiki40B language)")
        src.subset = str(src.subset)
    if src.type == "benchmark":
        _require(src.benchmark in BENCHMARKS,
                 f"{key}.benchmark: unknown benchmark {src.benchmark!r}; choose from {list(BENCHMARKS)}")
        _require(src.eval_split is None or src.eval_split != src.split,
                 f"{key}.eval_split: {src.eval_split!r} is also the split that drives the task weights; "
                 "evaluate on a different split")
    if src.type in CORPUS_TYPES or src.type == "benchmark":
        if src.path:  # a local copy instead of the hub
            src.path = _existing_path(src.path, f"{key}.path")
        return
    if src.type == "hub":
        _require(bool(src.hub_id), f"{key}.hub_id: a hub source needs a data set id")
        return
    _require(bool(src.path), f"{key}.path: a {src.type} source needs a path")
    import glob
    if any(ch in src.path for ch in "*?["):
        _require(bool(glob.glob(src.path)), f"{key}.path: no file matches {src.path}")
        return
    src.path = _existing_path(src.path, f"{key}.path")


_DS_FORBIDDEN = {
    "optimizer": "grape-ds passes torch.optim.AdamW as the client optimizer; set lr/betas/weight_decay under train:",
    "scheduler": "grape-ds owns the LR schedule; set train.schedule / train.warmup_steps instead",
}


def _resolve_ds_config(cfg: Config, world_size: int) -> dict:
    path = Path(cfg.deepspeed.config)
    _require(path.is_file(), f"deepspeed.config: DeepSpeed JSON not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {exc}") from None
    cfg.deepspeed.config = str(path.resolve())
    for key, why in _DS_FORBIDDEN.items():
        _require(key not in ds, f"deepspeed.config: {path} has an '{key}' section; {why}")
    t = cfg.train
    expected = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
    }
    for key, want in expected.items():
        if key in ds and ds[key] != want:
            raise ConfigError(
                f"deepspeed.config: {path} has {key}={ds[key]}, but train.micro_batch_size "
                f"({t.micro_batch_size}) x train.gradient_accumulation_steps ({t.gradient_accumulation_steps}) "
                f"x world size ({world_size}) gives {key}={want}; make them agree (or drop the key from the JSON)")
    ds.update(expected)
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    _require(zero in (0, 1, 2), f"deepspeed.config: zero_optimization.stage={zero}; grape-ds supports stages 0-2")
    fp16, bf16 = (ds.get(k, {}).get("enabled", False) for k in ("fp16", "bf16"))
    _require(not (fp16 and bf16), f"deepspeed.config: {path} enables both fp16 and bf16; choose one")
    if ds.get("torch_autocast", {}).get("enabled", False):
        _require(not (fp16 or bf16), f"deepspeed.config: {path} enables torch_autocast together with "
                 "fp16/bf16; autocast keeps fp32 weights, so drop the fp16/bf16 section")
    return ds
