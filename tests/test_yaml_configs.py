"""The experiment configs in ``yaml_configs/``: each one validates, and the paper's grid says what it claims.

The grid (README, "The paper's experiment grid") reproduces the research code's runs: ClimbLab x 9
methods, Wiki40B T1/T2 x 5 and SlimPajama x 3. Besides ``grape-ds check-config`` passing on every file,
these tests pin what users rely on when they compare runs: the static baselines' weight vectors are the
ones in reference/ALGORITHMS.md §4.6, and two files of one family differ only in the keys their
methods need (so a diff of two runs' results is a diff of methods, not of set-ups).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from grape_ds.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "yaml_configs"
ALL_FILES = sorted(CONFIGS.glob("*.yaml"))

# ALGORITHMS.md §4.6, "Static weights per ClimbLab cluster" (clusters 1..20).
CLIMB = [0.01, 0.01, 0.01, 0.03, 0.02, 0.20, 0.16, 0.01, 0.01, 0.07,
         0.01, 0.28, 0.01, 0.00, 0.00, 0.07, 0.06, 0.02, 0.01, 0.00]
CRISP = [0.0279, 0.0200, 0.0027, 0.0934, 0.0161, 0.1488, 0.0314, 0.0312, 0.0934, 0.0233,
         0.2481, 0.0774, 0.0012, 0.0048, 0.0219, 0.0547, 0.0175, 0.0082, 0.0729, 0.0052]
REGMIX = [0.00, 0.01, 0.00, 0.19, 0.01, 0.03, 0.02, 0.02, 0.01, 0.00,
          0.01, 0.02, 0.00, 0.00, 0.02, 0.01, 0.62, 0.02, 0.00, 0.00]

# file stem -> (mixture.method, initial weights (None: uniform), mu_task)
CLIMBLAB_GRID = {
    "climblab_uniform": ("static", None, 5.0),
    "climblab_climb": ("static", CLIMB, 5.0),
    "climblab_crisp": ("static", CRISP, 5.0),
    "climblab_regmix": ("static", REGMIX, 5.0),
    "climblab_doge": ("doge", None, 5.0),
    "climblab_grape_mu5": ("grape", None, 5.0),
    "climblab_grape_mu10": ("grape", None, 10.0),
    "climblab_climb_grape_mu5": ("grape", CLIMB, 5.0),
    "climblab_climb_grape_mu10": ("grape", CLIMB, 10.0),
}
WIKI40B_METHODS = {"uniform": "static", "doge": "doge", "grape": "grape", "grape_ema": "grape_ema",
                   "grape_gap": "grape_gap"}
WIKI40B_GRID = {f"wiki40b_{t}_{m}": (method, None, 5.0)
                for t in ("t1", "t2") for m, method in WIKI40B_METHODS.items()}
SLIMPAJAMA_GRID = {"slimpajama_uniform": ("static", None, 5.0), "slimpajama_doge": ("doge", None, 5.0),
                   "slimpajama_grape": ("grape", None, 5.0)}
GRID = {**CLIMBLAB_GRID, **WIKI40B_GRID, **SLIMPAJAMA_GRID}

REASONING = ["logiqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq"]
# ALGORITHMS.md §6.2: target batches from train; scored split (PIQA: validation, its test split has no labels).
EVAL_SPLIT = {"logiqa": "test", "piqa": "validation", "arc_easy": "test", "arc_challenge": "test",
              "hellaswag": "validation", "sciq": "test", "gsm8k": "test", "kodcode": "train[90%:]"}
WIKI40B_SOURCES = ["en", "fr", "de", "es", "it", "ru"]
WIKI40B_TARGETS = {"t1": ["uk", "ca", "da", "ro"], "t2": ["pl", "uk", "nl", "pt", "ca", "tr", "da", "ro"]}
SLIMPAJAMA_SETS = ["RedPajamaArXiv", "RedPajamaBook", "RedPajamaCommonCrawl", "RedPajamaC4",
                   "RedPajamaGithub", "RedPajamaStackExchange", "RedPajamaWikipedia"]

# Keys in which two files of one family may differ: the mixture's method and its settings, the run name;
# RegMix also splits its batch 8 x 4 instead of 16 x 2 (§4.6).
METHOD_KEYS = {"mixture.method", "mixture.weights", "mixture.floor", "mixture.every", "mixture.mu_task",
               "logging.run_name"}
REGMIX_KEYS = {"train.micro_batch_size", "train.gradient_accumulation_steps"}
# Global batch of the research launches (§5.1): per-GPU 32 sequences x 2 GPUs (ClimbLab, Wiki40B) or x 4 (MT).
GLOBAL_BATCH = {"climblab": 64, "wiki40b": 64, "slimpajama": 128}


def world_size(path: Path) -> int:
    """The rank count the file's header launches with (``deepspeed --num_gpus N``); the demo uses 2."""
    m = re.search(r"--num_gpus (\d+)", path.read_text())
    return int(m.group(1)) if m else 2


@lru_cache(maxsize=None)
def _load(stem: str, ranks: int | None = None):
    """load_config on yaml_configs/<stem>.yaml at ``ranks`` (default: the header's world size)."""
    path = CONFIGS / f"{stem}.yaml"
    cwd = os.getcwd()
    os.chdir(REPO)  # deepspeed.config and other relative paths resolve against the repository root
    try:
        return load_config(path, world_size=ranks or world_size(path))
    finally:
        os.chdir(cwd)


def flat(stem: str) -> dict:
    """The resolved config as {dotted.key: value} (lists such as data.domains stay whole)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(config_to_dict(_load(stem)), "")
    return out


def differing(a: str, b: str) -> set[str]:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return {k for k in fa if fa[k] != fb[k]}


# ----------------------------------------------------------------------------------------------
# Every file validates
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_FILES, ids=[p.stem for p in ALL_FILES])
def test_check_config_exits_0(path, monkeypatch, capsys):
    """``grape-ds check-config`` in this process (the command line's own ``main``, from the repository
    root as a user runs it); the entry point itself is run once below."""
    from grape_ds.cli import main
    ws = world_size(path)
    monkeypatch.chdir(REPO)
    code = main(["check-config", str(path.relative_to(REPO)), "--world-size", str(ws)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"is valid for world size {ws}" in err


def test_check_config_entry_point_exits_0():
    """``python -m grape_ds check-config`` as a process: the exit status and stderr a user sees."""
    path = CONFIGS / "demo.yaml"
    ws = world_size(path)
    proc = subprocess.run([sys.executable, "-m", "grape_ds", "check-config", str(path.relative_to(REPO)),
                           "--world-size", str(ws)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"is valid for world size {ws}" in proc.stderr


@pytest.mark.parametrize("stem", sorted(GRID))
def test_batch_keys_come_from_the_yaml(stem):
    """The DeepSpeed JSON fixes no batch size, so the file runs at any world size (the header's is the
    research launch); the research global batch is micro x accumulation x that world size."""
    cfg = _load(stem)
    clip = "zero2_bf16_clip2.json" if stem.startswith("wiki40b") else "zero2_bf16.json"  # §5.1 max_grad_norm
    assert cfg.deepspeed.config == str(REPO / "ds_configs" / clip)
    assert cfg.ds_config["gradient_clipping"] == (2.0 if stem.startswith("wiki40b") else 1.0)
    t, ws = cfg.train, world_size(CONFIGS / f"{stem}.yaml")
    assert t.micro_batch_size * t.gradient_accumulation_steps * ws == GLOBAL_BATCH[stem.split("_")[0]]
    for other in (1, 3, 8):
        ds = _load(stem, other).ds_config
        assert ds["train_batch_size"] == t.micro_batch_size * t.gradient_accumulation_steps * other


# ----------------------------------------------------------------------------------------------
# The grid is complete and each file is what its name says
# ----------------------------------------------------------------------------------------------

def test_the_grid_is_complete():
    stems = {p.stem for p in ALL_FILES}
    assert {s for s in stems if s.startswith("climblab_")} == set(CLIMBLAB_GRID)  # 9 methods
    assert len(CLIMBLAB_GRID) == 9
    for t in ("t1", "t2"):  # 2 settings x 5 methods
        assert {s for s in stems if s.startswith(f"wiki40b_{t}_")} == {f"wiki40b_{t}_{m}" for m in WIKI40B_METHODS}
    assert len(WIKI40B_GRID) == 10
    assert {s for s in stems if s.startswith("slimpajama_")} == set(SLIMPAJAMA_GRID)
    assert stems == set(GRID) | {"demo"}


@pytest.mark.parametrize("stem", sorted(GRID))
def test_method_weights_and_schedule_of_the_reweighting(stem):
    method, weights, mu_task = GRID[stem]
    mix = _load(stem).mixture
    assert mix.method == method
    assert mix.weights == weights
    assert mix.task_weights is None
    assert mix.mu_task == mu_task and mix.mu_domain == 1.5  # §5.1 mu_tgt / mu_train
    assert mix.form == "research" and mix.task_smoothing == 0.001
    if method == "static":
        # Static baselines draw exactly their §4.6 vector: no floor mixed in, no rounds.
        assert mix.floor == 0.0 and mix.every <= 0
    else:
        assert mix.floor == 0.001 and mix.every == 100  # §5.1 reweight_*_iters


def test_static_baselines_are_the_section_4_6_vectors():
    assert _load("climblab_climb").mixture.weights == CLIMB
    assert _load("climblab_crisp").mixture.weights == CRISP
    assert _load("climblab_regmix").mixture.weights == REGMIX
    assert _load("climblab_uniform").mixture.weights is None
    for vec in (CLIMB, CRISP, REGMIX):
        assert len(vec) == 20 and abs(sum(vec) - 1) < 0.011  # §4.6: vectors summing to 0.99 are fine


@pytest.mark.parametrize("stem", sorted(GRID))
def test_run_name_and_launch_line_name_the_file(stem):
    path = CONFIGS / f"{stem}.yaml"
    assert _load(stem).logging.run_name == stem
    assert f"--config yaml_configs/{stem}.yaml" in path.read_text()


# ----------------------------------------------------------------------------------------------
# Files of one family differ only where their methods do
# ----------------------------------------------------------------------------------------------

def test_grape_mu_files_differ_only_in_mu_task():
    assert differing("climblab_grape_mu5", "climblab_grape_mu10") == {"mixture.mu_task", "logging.run_name"}
    assert differing("climblab_climb_grape_mu5", "climblab_climb_grape_mu10") == {"mixture.mu_task",
                                                                                  "logging.run_name"}


def test_climb_initialised_grape_differs_from_grape_only_in_the_start():
    assert differing("climblab_grape_mu5", "climblab_climb_grape_mu5") == {"mixture.weights", "logging.run_name"}
    # ... and from the static CLIMB baseline only in that it reweights.
    assert differing("climblab_climb", "climblab_climb_grape_mu5") == {
        "mixture.method", "mixture.floor", "mixture.every", "logging.run_name"}


FAMILIES = {"climblab": ("climblab_grape_mu5", CLIMBLAB_GRID),
            "wiki40b_t1": ("wiki40b_t1_grape", [s for s in WIKI40B_GRID if s.startswith("wiki40b_t1_")]),
            "wiki40b_t2": ("wiki40b_t2_grape", [s for s in WIKI40B_GRID if s.startswith("wiki40b_t2_")]),
            "slimpajama": ("slimpajama_grape", SLIMPAJAMA_GRID)}


@pytest.mark.parametrize("reference, family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_a_family_shares_everything_but_the_method(reference, family):
    for stem in family:
        allowed = METHOD_KEYS | (REGMIX_KEYS if stem == "climblab_regmix" else set())
        extra = differing(reference, stem) - allowed
        assert not extra, f"{stem} differs from {reference} in {sorted(extra)}"


@pytest.mark.parametrize("method", sorted(WIKI40B_METHODS))
def test_wiki40b_t1_and_t2_differ_only_in_the_targets(method):
    assert differing(f"wiki40b_t1_{method}", f"wiki40b_t2_{method}") == {"data.tasks", "logging.run_name"}


# ----------------------------------------------------------------------------------------------
# Data: sources, targets and splits
# ----------------------------------------------------------------------------------------------

def _units(stem: str, section: str) -> list[tuple[str, dict]]:
    return [(u["name"], u["source"]) for u in config_to_dict(_load(stem))["data"][section]]


def _check_benchmarks(stem: str, names: list[str]) -> None:
    tasks = _units(stem, "tasks")
    assert [n for n, _ in tasks] == names
    for name, src in tasks:
        assert src["type"] == "benchmark" and src["benchmark"] == name
        assert src["split"] == ("train[:90%]" if name == "kodcode" else "train")  # §6.2 / §4.10 item 6
        assert src["eval_split"] == EVAL_SPLIT[name]


@pytest.mark.parametrize("stem", sorted(CLIMBLAB_GRID))
def test_climblab_data(stem):
    cfg = _load(stem)
    assert cfg.data.tokenizer.name == "gpt2"  # ClimbLab stores GPT-2 token ids
    assert [(n, s["type"], s["subset"]) for n, s in _units(stem, "domains")] == [
        (f"cluster_{k}", "climblab", str(k)) for k in range(1, 21)]
    _check_benchmarks(stem, REASONING)
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_embd, m.n_head, m.n_positions, cfg.data.seq_len) == (12, 768, 12, 512, 512)
    assert (t.max_steps, t.lr, t.lr_end, t.warmup_steps, t.seed) == (50000, 1.5e-4, 1.5e-5, 2000, 16)
    assert cfg.mixture.unit_clip == 1.0


@pytest.mark.parametrize("stem", sorted(WIKI40B_GRID))
def test_wiki40b_data(stem):
    cfg = _load(stem)
    setting = stem.split("_")[1]
    assert [(n, s["type"], s["subset"], s["split"]) for n, s in _units(stem, "domains")] == [
        (lang, "wiki40b", lang, "train") for lang in WIKI40B_SOURCES]
    # Targets are Wiki40B languages too; their batches come from the validation split (§6.1).
    assert [(n, s["type"], s["subset"], s["split"]) for n, s in _units(stem, "tasks")] == [
        (lang, "wiki40b", lang, "validation") for lang in WIKI40B_TARGETS[setting]]
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_embd, m.n_head, m.n_positions) == (6, 768, 12, 512)
    assert (t.max_steps, t.lr, t.lr_end, t.warmup_steps) == (20000, 5e-4, 1e-4, 500)
    assert cfg.mixture.unit_clip == 2.0  # §5.1 max_grad_norm 2.0
    assert "xlm-mlm-100-1280" in cfg.data.tokenizer.name


@pytest.mark.parametrize("stem", sorted(SLIMPAJAMA_GRID))
def test_slimpajama_data(stem):
    cfg = _load(stem)
    assert [(s["type"], s["subset"]) for _, s in _units(stem, "domains")] == [
        ("slimpajama", name) for name in SLIMPAJAMA_SETS]
    _check_benchmarks(stem, REASONING + ["kodcode", "gsm8k"])  # reasoning + code + math
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.n_head) == (36, 1200, 24)
    assert cfg.train.max_steps == 100000
    assert cfg.data.max_tokens_per_domain == 1_000_000 * 512  # §4.7 max_train_samples


@pytest.mark.parametrize("stem", sorted(GRID))
def test_sources_use_the_hub_not_local_paths(stem):
    for section in ("domains", "tasks"):
        for name, src in _units(stem, section):
            assert src["path"] is None and src["hub_id"] is None, f"{stem}: {section} {name} names a local copy"


# ----------------------------------------------------------------------------------------------
# Layout: the same key order as demo.yaml
# ----------------------------------------------------------------------------------------------

def _in_same_order(mine: list[str], reference: list[str]) -> bool:
    shared = [k for k in mine if k in reference]
    return shared == [k for k in reference if k in shared]


@pytest.mark.parametrize("stem", sorted(GRID))
def test_sections_and_keys_follow_demo_order(stem):
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    mine = yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())
    assert list(mine) == list(demo)  # model, data, mixture, probe, train, deepspeed, eval, checkpoint, logging
    for section in demo:
        assert _in_same_order(list(mine[section]), list(demo[section])), section


@pytest.mark.parametrize("stem", sorted(GRID))
def test_research_mixture_batches(stem):
    """§2.4/§5.1: B_r = reweight_batch_size // reweight_mini_batch_size mixture batches of
    per_device_train_batch_size sequences (split over the launch's ranks, as the unit batches are)."""
    family = stem.split("_")[0]
    b_r, per_device = {"climblab": (32 // 8, 16), "wiki40b": (16 // 8, 16), "slimpajama": (32 // 8, 8)}[family]
    cfg = _load(stem)
    ranks = GLOBAL_BATCH[family] // (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps)
    assert cfg.probe.mixture_batches == b_r
    assert cfg.probe.mixture_batch_size * ranks == per_device
