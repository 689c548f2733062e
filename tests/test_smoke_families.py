"""A shrunk real-schema smoke run of each corpus family of the paper's grid, end to end with 2 real
ranks (common.runs.launch): ClimbLab (GPT-2 token ids from Parquet), Wiki40B (marked-up
articles, languages as domains and target languages' validation splits as tasks) and SlimPajama
(``.jsonl.zst`` filtered by ``redpajama_set_name``), each with the targets of its grid.

Each test writes small local copies in the data sets' real schema (``common.real_schema``), loads
the family's GRAPE grid file, keeps its mixture/probe/method settings and source types, points a few
of its units at the local copies with ``path:``, shrinks model, data and schedule to a tiny run,
validates the YAML with ``grape-ds check-config`` and trains it. It then checks what a user of such a
run relies on: the status, the per-step metrics, the moved mixture weights, per-unit evaluation with
multiple-choice accuracy, the TensorBoard tags and a complete final checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from common.runs import REPO, launch
from common.real_schema import (
    slimpajama_record, wiki40b_markup, write_benchmark, write_climblab, write_gpt2_shaped_tokenizer,
    write_slimpajama_627b, write_wiki40b)

pytestmark = pytest.mark.slow

SEQ_LEN = 32
MAX_STEPS = 20
ROUND_EVERY = 5            # mixture.every: a reweighting round every 5 steps, 4 rounds in 20 steps
EVAL_EVERY = 10
MAX_ITEMS = 8              # eval.max_items: multiple-choice items scored per benchmark task
MIN_WINDOWS = 40           # every unit of a fixture packs at least this many windows of SEQ_LEN tokens
TRAIN_ITEMS, EVAL_ITEMS = 120, 16  # benchmark records written per split

# What a smoke run replaces in a grid file (dotted keys, each of which the grid file must have);
# everything else (mixture, probe method and estimator, source types, splits) stays the grid's.
SHRINK = {
    "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 2, "model.n_positions": SEQ_LEN,
    "data.seq_len": SEQ_LEN,
    "mixture.every": ROUND_EVERY,
    "probe.batch_size": 2,
    "train.max_steps": MAX_STEPS, "train.warmup_steps": 2, "train.micro_batch_size": 4,
    "train.gradient_accumulation_steps": 2,
    # a 20-step run: a larger peak LR than the grid's, so that the tiny model's loss visibly falls
    "train.lr": 2e-3, "train.lr_end": 2e-4,
    # CPU has no fast bf16 path: fp32 ZeRO-2 instead of the grid's bf16 JSON
    "deepspeed.config": "ds_configs/zero2_fp32.json",
    "eval.every": EVAL_EVERY, "eval.max_windows": 8, "eval.max_items": MAX_ITEMS,
    "checkpoint.every": 10,
    "logging.every": 5, "logging.progress": False,
}


# ----------------------------------------------------------------------------------------------
# Shrinking a grid file
# ----------------------------------------------------------------------------------------------

def _get(cfg: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    for key in parents:
        cfg = cfg[key]
    return cfg[leaf]


def _set_existing(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        cfg = cfg[key]
    assert leaf in cfg, f"the grid file has no {dotted}: this smoke test no longer matches the grid's schema"
    cfg[leaf] = value


def _grid_units(units: list[dict], paths: dict[str, Path]) -> list[dict]:
    """The grid's units named in ``paths`` (its ``type``/``subset``/``benchmark``/``split``/``eval_split``
    kept as they are), each reading the local copy at its path."""
    by_name = {u["name"]: u for u in units}
    missing = sorted(set(paths) - set(by_name))
    assert not missing, f"the grid has no units {missing}; it has {sorted(by_name)}"
    return [{"name": name, "source": {**by_name[name]["source"], "path": str(path)}}
            for name, path in paths.items()]


def shrink_grid(grid: dict, domains: dict[str, Path], tasks: dict[str, Path], tokenizer: dict,
                tmp_path: Path) -> dict:
    """A tiny smoke-run config from a grid file's dict: :data:`SHRINK`, the given units of the grid
    pointed at local copies, ``tokenizer`` as ``data.tokenizer``, and cache and output under ``tmp_path``."""
    cfg = copy.deepcopy(grid)
    for key, value in SHRINK.items():
        _set_existing(cfg, key, value)
    _set_existing(cfg, "data.domains", _grid_units(grid["data"]["domains"], domains))
    _set_existing(cfg, "data.tasks", _grid_units(grid["data"]["tasks"], tasks))
    _set_existing(cfg, "data.tokenizer", tokenizer)
    _set_existing(cfg, "data.cache_dir", str(tmp_path / "cache"))
    _set_existing(cfg, "logging.output_dir", str(tmp_path / "runs"))
    return cfg


# ----------------------------------------------------------------------------------------------
# Varied text for the fixtures (seeded: the same on every run)
# ----------------------------------------------------------------------------------------------

# Subject / verb / object phrases per language: sentences with structure a model can learn.
PHRASES = {
    "en": (["the river", "a small bird", "the old city", "my neighbour", "the young teacher", "a quiet village"],
           ["crosses", "watches", "builds", "remembers", "follows", "paints"],
           ["the bridge", "a green field", "the long road", "the winter sky", "an old book", "the harbour"]),
    "de": (["der Fluss", "ein kleiner Vogel", "die alte Stadt", "mein Nachbar", "der junge Lehrer", "ein ruhiges Dorf"],
           ["überquert", "beobachtet", "baut", "erinnert sich an", "folgt", "malt"],
           ["die Brücke", "ein grünes Feld", "die lange Straße", "den Winterhimmel", "ein altes Buch", "den Hafen"]),
    "ru": (["река", "маленькая птица", "старый город", "мой сосед", "молодой учитель", "тихая деревня"],
           ["пересекает", "смотрит на", "строит", "помнит", "следует за", "рисует"],
           ["мост", "зелёное поле", "длинную дорогу", "зимнее небо", "старую книгу", "гавань"]),
    "uk": (["річка", "маленький птах", "старе місто", "мій сусід", "молодий вчитель", "тихе село"],
           ["перетинає", "дивиться на", "будує", "пам'ятає", "йде за", "малює"],
           ["міст", "зелене поле", "довгу дорогу", "зимове небо", "стару книгу", "гавань"]),
    "ca": (["el riu", "un ocell petit", "la ciutat vella", "el meu veí", "el jove mestre", "un poble tranquil"],
           ["travessa", "mira", "construeix", "recorda", "segueix", "pinta"],
           ["el pont", "un camp verd", "el llarg camí", "el cel d'hivern", "un llibre vell", "el port"]),
}

# (question, correct answer, three distractors, supporting sentence)
FACTS = [
    ("Which gas do plants take in from the air?", "carbon dioxide", ("helium", "neon", "argon"),
     "Plants take in carbon dioxide and give off oxygen."),
    ("What force pulls objects toward the Earth?", "gravity", ("magnetism", "friction", "wind"),
     "Gravity pulls every object toward the centre of the Earth."),
    ("Which organ pumps blood through the body?", "the heart", ("the lungs", "the liver", "the skin"),
     "The heart is a muscle that pumps blood through the body."),
    ("What is frozen water called?", "ice", ("steam", "salt", "sand"), "Water freezes into ice at zero degrees."),
    ("Which planet is closest to the Sun?", "Mercury", ("Mars", "Saturn", "Neptune"),
     "Mercury orbits closer to the Sun than any other planet."),
    ("What do bees make from nectar?", "honey", ("milk", "silk", "wax paper"), "Bees turn flower nectar into honey."),
    ("Which part of a plant grows under the ground?", "the roots", ("the petals", "the fruit", "the leaves"),
     "Roots grow under the ground and take up water."),
    ("What kind of energy does a battery store?", "chemical energy", ("sound energy", "light energy", "wind energy"),
     "A battery stores chemical energy and releases it as electricity."),
]


def english(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng, "en") if rng.random() < 0.6 else rng.choice(FACTS)[3]
                    for _ in range(n_sentences))


def _sentence(rng: random.Random, lang: str) -> str:
    subjects, verbs, objects = PHRASES[lang]
    text = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
    return text[0].upper() + text[1:]


def _paragraph(rng: random.Random, lang: str) -> str:
    return " ".join(_sentence(rng, lang) for _ in range(rng.randint(2, 4)))


def _article(rng: random.Random, lang: str, i: int) -> str:
    """A Wiki40B article in its markup: a title, a lead section and one headed section."""
    subjects, _, objects = PHRASES[lang]
    return wiki40b_markup(f"{objects[i % 6].title()} {i}",
                          [(None, [_paragraph(rng, lang), _paragraph(rng, lang)]),
                           (subjects[i % 6].title(), [_paragraph(rng, lang)])])


def code_snippet(rng: random.Random) -> str:
    name, arg = rng.choice(["scale", "shift", "clip", "total", "merge"]), rng.choice(["x", "value", "items"])
    op, k = rng.choice(["+", "-", "*", "//"]), rng.randint(2, 99)
    body = f"def {name}_{k}({arg}):\n    \"\"\"Return {arg} {op} {k}.\"\"\"\n    return {arg} {op} {k}\n"
    if rng.random() < 0.5:
        body = f"import {rng.choice(['math', 'os', 'json'])}\n\n\n" + body
    return body


def arxiv_abstract(rng: random.Random) -> str:
    topic = rng.choice(["sparse graphs", "random matrices", "language models", "convex games", "spin chains"])
    claim = rng.choice(["the bound is tight", "the estimator is consistent", "the rate is optimal"])
    return (f"We study {topic}. We prove that {claim} under mild assumptions. Our method improves the "
            f"baseline by {rng.randint(2, 40)} percent on {rng.randint(3, 12)} benchmarks.")


# ----------------------------------------------------------------------------------------------
# Benchmark records in each data set's schema (see common.real_schema.BENCHMARK_RECORDS)
# ----------------------------------------------------------------------------------------------

def _arc(rng: random.Random, split: str, i: int) -> dict:
    if rng.random() < 0.5:
        question, gold, wrong, _ = rng.choice(FACTS)
    else:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question, gold, wrong = f"What is {a} plus {b}?", str(a + b), (str(a + b + 1), str(a * b), str(abs(a - b)))
    choices = [gold, *wrong]
    rng.shuffle(choices)
    labels = ["A", "B", "C", "D"]
    return {"id": f"Mercury_{split}_{i}", "question": question,
            "choices": {"text": choices, "label": labels}, "answerKey": labels[choices.index(gold)]}


def _sciq(rng: random.Random, split: str, i: int) -> dict:
    question, gold, (d1, d2, d3), support = rng.choice(FACTS)
    return {"question": question, "distractor3": d3, "distractor1": d1, "distractor2": d2,
            "correct_answer": gold, "support": support if rng.random() < 0.7 else ""}


def _piqa(rng: random.Random, split: str, i: int) -> dict:
    thing = rng.choice(["a shirt", "a jar lid", "a wet towel", "a paper map", "a bicycle chain", "a candle"])
    good = rng.choice(["Do it slowly with both hands.", "Use a soft cloth and warm water.", "Ask a friend to hold it."])
    bad = rng.choice(["Throw it into the river.", "Paint it blue first.", "Leave it in the freezer for a year."])
    label = rng.randint(0, 1)
    goal = f"How do I {rng.choice(['fold', 'clean', 'open', 'dry', 'fix'])} {thing}?"
    return {"goal": goal, "sol1": bad if label else good, "sol2": good if label else bad, "label": label}


def _gsm8k(rng: random.Random, split: str, i: int) -> dict:
    name, item = rng.choice(["Natalia", "Omar", "Lena", "Ravi"]), rng.choice(["clips", "apples", "stamps", "marbles"])
    a, b = rng.randint(3, 90), rng.randint(2, 40)
    return {"question": f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"}


RECORD_MAKERS = {"arc_easy": _arc, "sciq": _sciq, "piqa": _piqa, "gsm8k": _gsm8k}


def write_target_benchmark(name: str, root: Path, splits: tuple[str, ...]) -> Path:
    """``name`` in its hub repo's layout with :data:`TRAIN_ITEMS` varied training records and
    :data:`EVAL_ITEMS` in each other split."""
    rng = random.Random(f"benchmark-{name}")
    make = RECORD_MAKERS[name]
    return write_benchmark(name, root, {split: [make(rng, split, i) for i in
                                                range(TRAIN_ITEMS if split == "train" else EVAL_ITEMS)]
                                        for split in splits})


# ----------------------------------------------------------------------------------------------
# The three families' fixtures
# ----------------------------------------------------------------------------------------------

@dataclass
class Fixtures:
    domains: dict[str, Path]  # grid unit name -> local copy
    tasks: dict[str, Path]
    tokenizer: dict           # data.tokenizer
    mc_tasks: set[str]        # tasks scored for multiple-choice accuracy


def climblab_fixtures(tmp_path: Path) -> Fixtures:
    """Clusters 1-3 of nvidia/ClimbLab: English prose and code as ids of the GPT-2-shaped tokenizer
    (one id per byte), and a cluster of ids spread over the whole GPT-2 vocabulary; ARC-Easy and SciQ."""
    from transformers import PreTrainedTokenizerFast

    tok_dir = write_gpt2_shaped_tokenizer(tmp_path / "gpt2_shaped")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    rng = random.Random("climblab")
    chain = {t: rng.sample(range(256, 50256), 3) for t in rng.sample(range(256, 50256), 120)}
    starts = list(chain)

    def markov_doc() -> list[int]:
        doc, length = [rng.choice(starts)], rng.randint(60, 160)
        while len(doc) < length:
            nxt = chain.get(doc[-1])
            doc.append(rng.choice(nxt) if nxt else rng.choice(starts))
        return doc

    clusters = {1: [tok.encode(english(rng, rng.randint(3, 8))) for _ in range(40)],
                2: [tok.encode(code_snippet(rng)) for _ in range(40)],
                3: [markov_doc() for _ in range(40)]}
    root = write_climblab(tmp_path / "ClimbLab", clusters)
    return Fixtures(domains={f"cluster_{k}": root for k in clusters},
                    tasks={"arc_easy": write_target_benchmark("arc_easy", tmp_path / "ai2_arc", ("train", "test")),
                           "sciq": write_target_benchmark("sciq", tmp_path / "sciq", ("train", "test"))},
                    tokenizer={"name": str(tok_dir)}, mc_tasks={"arc_easy", "sciq"})


def wiki40b_fixtures(tmp_path: Path) -> Fixtures:
    """google/wiki40b: en, de, ru as domains (train split), uk and ca as targets (validation split)."""
    root = tmp_path / "wiki40b"
    for lang in ("en", "de", "ru", "uk", "ca"):
        rng = random.Random(f"wiki40b-{lang}")
        write_wiki40b(root, lang, {split: [_article(rng, lang, i) for i in range(40)]
                                   for split in ("train", "validation")})
    # The grid's XLM-100 tokenizer is a hub download (and slow-only, see the grid file); offline, a
    # small byte-level BPE is trained on the fixtures instead.
    return Fixtures(domains={lang: root for lang in ("en", "de", "ru")}, tasks={"uk": root, "ca": root},
                    tokenizer={"name": None, "vocab_size": 512}, mc_tasks=set())


def slimpajama_fixtures(tmp_path: Path) -> Fixtures:
    """cerebras/SlimPajama-627B: ArXiv, GitHub and Wikipedia (plus C4 records no domain reads) in one
    zstd JSON-lines chunk; PIQA and ARC-Easy (multiple choice) and GSM8K (generative)."""
    rng = random.Random("slimpajama")
    makers = {"RedPajamaArXiv": lambda: arxiv_abstract(rng), "RedPajamaGithub": lambda: code_snippet(rng),
              "RedPajamaWikipedia": lambda: english(rng, rng.randint(3, 8)),
              "RedPajamaC4": lambda: "Buy now! " * rng.randint(2, 6)}
    records = [slimpajama_record(make(), set_name) for _ in range(60) for set_name, make in makers.items()]
    rng.shuffle(records)
    root = write_slimpajama_627b(tmp_path / "SlimPajama-627B", {"train": records})
    return Fixtures(domains={"arxiv": root, "github": root, "wikipedia": root},
                    tasks={"piqa": write_target_benchmark("piqa", tmp_path / "piqa", ("train", "validation")),
                           "arc_easy": write_target_benchmark("arc_easy", tmp_path / "ai2_arc", ("train", "test")),
                           "gsm8k": write_target_benchmark("gsm8k", tmp_path / "gsm8k", ("train", "test"))},
                    # the grid's GPT-2 tokenizer is a hub download: offline, a small BPE trained here
                    tokenizer={"name": None, "vocab_size": 512}, mc_tasks={"piqa", "arc_easy"})


@dataclass
class Family:
    grid: str
    fixtures: Callable[[Path], Fixtures]


FAMILIES = {
    "climblab": Family("climblab_grape_mu5.yaml", climblab_fixtures),
    "wiki40b": Family("wiki40b_t1_grape.yaml", wiki40b_fixtures),
    "slimpajama": Family("slimpajama_grape.yaml", slimpajama_fixtures),
}


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _on_simplex(weights: list[float], floor: float = 0.0) -> bool:
    return math.isclose(sum(weights), 1.0, abs_tol=1e-6) and min(weights) >= floor - 1e-9


def _packed_windows(cache: Path) -> dict[str, int]:
    (manifest,) = (cache / "packed").glob("*/manifest.json")
    units = json.loads(manifest.read_text())["units"]
    return {name: u["train_windows"] + u["val_windows"] for name, u in units.items()}


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_shrunk_grid_run_trains_end_to_end(family, tmp_path):
    spec = FAMILIES[family]
    fx = spec.fixtures(tmp_path)
    grid = yaml.safe_load((REPO / "yaml_configs" / spec.grid).read_text())
    cfg = shrink_grid(grid, fx.domains, fx.tasks, fx.tokenizer, tmp_path)
    config = tmp_path / f"{family}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    domains, tasks = list(fx.domains), list(fx.tasks)
    assert cfg["mixture"]["method"] == "grape" and cfg["probe"]["domains"] == grid["probe"]["domains"]

    check = subprocess.run([str(Path(sys.executable).parent / "grape-ds"), "check-config", str(config),
                            "--world-size", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is valid for world size 2" in check.stderr
    resolved = yaml.safe_load(check.stdout.split("# resolved DeepSpeed config:")[0])
    assert [u["name"] for u in resolved["data"]["domains"]] == domains
    grid_types = {u["name"]: u["source"]["type"] for u in grid["data"]["domains"] + grid["data"]["tasks"]}
    assert {u["name"]: u["source"]["type"] for u in resolved["data"]["domains"] + resolved["data"]["tasks"]} == {
        name: grid_types[name] for name in domains + tasks}

    launch(tmp_path / "runs", tmp_path / "cache", config=config, timeout=300)
    run = tmp_path / "runs" / cfg["logging"]["run_name"]
    ran = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config the run used
    assert {k: _get(ran, k) for k in SHRINK if k != "deepspeed.config"} == {
        k: v for k, v in SHRINK.items() if k != "deepspeed.config"}
    assert ran["deepspeed"]["config"] == str(REPO / SHRINK["deepspeed.config"])
    assert {k: ran["mixture"][k] for k in grid["mixture"]} == {**grid["mixture"], "every": ROUND_EVERY}

    # every unit of the fixture packed enough windows to train, probe and evaluate on
    windows = _packed_windows(tmp_path / "cache")
    assert sorted(windows) == sorted(domains + tasks)
    assert min(windows.values()) >= MIN_WINDOWS, windows

    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"], status["max_steps"]) == ("finished", MAX_STEPS, MAX_STEPS)

    metrics = _rows(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) / 5 < losses[0], losses  # the tiny model learns something

    mixture = json.loads((run / "mixture.json").read_text())
    assert mixture["domains"] == domains and mixture["tasks"] == tasks
    assert [h["step"] for h in mixture["history"]] == list(range(0, MAX_STEPS + 1, ROUND_EVERY))
    assert mixture["rounds"] == MAX_STEPS // ROUND_EVERY and mixture["skipped_rounds"] == 0
    floor = cfg["mixture"]["floor"]
    for h in mixture["history"]:
        assert _on_simplex(h["alpha"], floor) and _on_simplex(h["z"]), h
    assert mixture["history"][0]["alpha"] == pytest.approx([1 / len(domains)] * len(domains))
    assert max(abs(a - 1 / len(domains)) for a in mixture["alpha"]) > 1e-3, mixture["alpha"]  # GRAPE moved alpha
    assert max(abs(z - 1 / len(tasks)) for z in mixture["z"]) > 1e-3, mixture["z"]          # and z

    evals = _rows(run / "eval" / "eval.jsonl")
    assert [e["step"] for e in evals] == [EVAL_EVERY, MAX_STEPS]
    last = evals[-1]
    assert list(last["domain_loss"]) == domains and list(last["task_loss"]) == tasks
    assert all(math.isfinite(v) for v in [*last["domain_loss"].values(), *last["task_loss"].values()]), last
    if fx.mc_tasks:
        assert set(last["mc_acc"]) == set(last["mc_acc_norm"]) == fx.mc_tasks  # a generative task has none
        assert last["mc_items"] == {t: MAX_ITEMS for t in fx.mc_tasks}
        for value in [*last["mc_acc"].values(), *last["mc_acc_norm"].values(),
                      last["mc_acc_avg"], last["mc_acc_norm_avg"]]:
            assert 0.0 <= value <= 1.0, last
    else:
        assert "mc_acc" not in last

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {f"mixture/domain/{d}" for d in domains} | {f"mixture/task/{t}" for t in tasks}
    expected |= {f"eval/loss/{d}" for d in domains} | {f"eval/task_loss/{t}" for t in tasks}
    expected |= {f"eval/acc/{t}" for t in fx.mc_tasks} | {f"eval/acc_norm/{t}" for t in fx.mc_tasks}
    assert expected <= tags, expected - tags
    assert not {f"eval/acc/{t}" for t in set(tasks) - fx.mc_tasks} & tags
    assert len(acc.Scalars(f"mixture/domain/{domains[0]}")) >= MAX_STEPS // ROUND_EVERY

    from grape_ds.checkpoint import complete_checkpoints
    assert (MAX_STEPS, f"step{MAX_STEPS:08d}") in complete_checkpoints(run / "checkpoints")
