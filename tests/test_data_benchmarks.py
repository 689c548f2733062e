"""Target benchmarks on local copies in each data set's real schema: the registry matches the config,
every benchmark streams its LM text, every multiple-choice benchmark formats its items exactly as
lm-evaluation-harness does, the derived HumanEval/KodCode splits hold the right rows, unlabelled and
unknown splits are refused with the valid ones named, and offline without a copy fails fast."""

import time

import pytest
from common.real_schema import BENCHMARK_RECORDS, write_benchmark

from grape_ds import config
from grape_ds.config import DataConfig, PlantedConfig, SourceConfig, UnitConfig
from grape_ds.data import benchmarks, readers
from grape_ds.data.benchmarks import BENCHMARKS, MCItem, is_multiple_choice, iter_lm_texts, load_items, mc_items_for
from grape_ds.data.sources import iter_documents, source_files

GENERATIVE = ("humaneval", "kodcode", "gsm8k")


def bench(name, path=None, **kw):
    return SourceConfig(type="benchmark", benchmark=name, path=str(path) if path else None, **kw)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Every benchmark's fixture copy, written once: {name: root}."""
    base = tmp_path_factory.mktemp("benchmarks")
    return {name: write_benchmark(name, base / name) for name in BENCHMARKS}


def test_registry_matches_config_and_split_defaults_differ():
    assert config.BENCHMARKS == tuple(BENCHMARKS)
    for name, spec in BENCHMARKS.items():
        assert spec.name == name
        assert spec.train_split != spec.eval_split and {spec.train_split, spec.eval_split} <= set(spec.splits)
        assert is_multiple_choice(name) == (name not in GENERATIVE)
        assert (spec.lm_eval_task is None) == (name == "kodcode")
    assert BENCHMARKS["piqa"].eval_split == BENCHMARKS["hellaswag"].eval_split == "validation"
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        is_multiple_choice("mmlu")


# The LM text of each benchmark's first train record: question/context + gold answer (ALGORITHMS §6.2).
FIRST_LM_TEXT = {
    "logiqa": ("Some Cantonese don't like chili. So some southerners don't like chili. Which of the following "
               "can guarantee the above argument? All Cantonese are southerners."),
    "arc_easy": "Which of these animals is a mammal? whale",
    "arc_challenge": "Which of these animals is a mammal? whale",
    "piqa": "How do I open a stuck jar lid? Run the lid under hot water, then twist.",
    "hellaswag": ("[header] How to grow tomatoes [title] Choose a sunny spot. pick a Spot that gets six hours of "
                  "sun  each day."),
    "sciq": ("Mesophiles grow best in moderate temperature, typically between 25°C and 40°C. What type of organism "
             "is commonly used in preparation of foods such as cheese and yogurt? mesophilic organisms"),
    "humaneval": 'def add_0(x: int) -> int:\n    """Return x plus 0."""\n\n    return x + 0\n',
    "kodcode": "Write a function that returns 0.\ndef f():\n    return 0",
    "gsm8k": ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
              "many clips did Natalia sell altogether in April and May?\nNatalia sold 48/2 = <<48/2=24>>24 clips in "
              "May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"),
    "mathqa": ("a train running at the speed of 60 km / hr crosses a pole in 9 seconds . what is the length of the "
               "train ? 150 metres"),
    "medqa": ("A 23-year-old woman presents with fever and a rash. Which drug is the best initial treatment? "
              "Doxycycline"),
}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_lm_text_of_every_benchmark(copies, name):
    src = bench(name, copies[name])
    texts = list(iter_documents(src))  # the dispatch packing uses
    assert texts[0] == FIRST_LM_TEXT[name]
    assert texts == list(iter_lm_texts(src)) and all(isinstance(t, str) and t for t in texts)
    expected_rows = {"humaneval": 82, "kodcode": 18}.get(name, len(BENCHMARK_RECORDS[name].get("train", [])))
    assert len(texts) == expected_rows
    files = source_files(src)
    assert files and all(f.is_file() for f in files)
    assert all("train" in f.name.lower() for f in files) or name == "humaneval"  # HumanEval's train is in test


# The first item of each multiple-choice benchmark's default evaluation split, as lm-eval builds it
# (context = doc_to_text; choices = " " + each doc_to_choice entry; gold = doc_to_target).
FIRST_ITEM = {
    "logiqa": MCItem(
        "Passage: Some Cantonese don't like chili. So some southerners don't like chili.\n"
        "Question: Which of the following can guarantee the above argument?\nChoices:\n"
        "A. Some Cantonese love chili.\nB. Some people who like peppers are southerners.\n"
        "C. All Cantonese are southerners.\nD. Some Cantonese like neither peppers nor sweets.\nAnswer:",
        (" Some Cantonese love chili.", " Some people who like peppers are southerners.",
         " All Cantonese are southerners.", " Some Cantonese like neither peppers nor sweets."), 2),
    "arc_easy": MCItem("Question: Which of these animals is a mammal?\nAnswer:",
                       (" shark", " whale", " trout", " eel"), 1),
    "arc_challenge": MCItem("Question: Which of these animals is a mammal?\nAnswer:",
                            (" shark", " whale", " trout", " eel"), 1),
    "piqa": MCItem("Question: How do I open a stuck jar lid?\nAnswer:",
                   (" Put the jar in the freezer.", " Run the lid under hot water, then twist."), 1),
    "hellaswag": MCItem("Home and Garden: How to grow tomatoes. Choose a sunny spot. Pick a spot",
                        ("  Water them daily.", " that gets six hours of sun each day.", "  Buy seeds.",
                         " and paint it blue."), 1),
    "sciq": MCItem("Mesophiles grow best in moderate temperature, typically between 25°C and 40°C.\n"
                   "Question: What type of organism is commonly used in preparation of foods such as cheese and "
                   "yogurt?\nAnswer:", (" protozoa", " gymnosperms", " viruses", " mesophilic organisms"), 3),
    "mathqa": MCItem("Question: a train running at the speed of 60 km / hr crosses a pole in 9 seconds . what is "
                     "the length of the train ?\nAnswer:",
                     (" 120 metres", " 180 metres", " 324 metres", " 150 metres", " none of these"), 3),
    "medqa": MCItem("Question: A 23-year-old woman presents with fever and a rash. Which drug is the best initial "
                    "treatment?\nA. Ampicillin\nB. Ceftriaxone\nC. Doxycycline\nD. Nitrofurantoin\nAnswer:",
                    (" A", " B", " C", " D"), 2),
}


@pytest.mark.parametrize("name", sorted(FIRST_ITEM))
def test_multiple_choice_items_are_formatted_as_lm_eval_does(copies, name):
    items = load_items(bench(name, copies[name]))
    assert items[0] == FIRST_ITEM[name]
    assert len(items) == len(BENCHMARK_RECORDS[name][BENCHMARKS[name].eval_split])
    assert all(0 <= item.gold < len(item.choices) and all(c.startswith(" ") for c in item.choices)
               for item in items)
    assert load_items(bench(name, copies[name]), limit=2) == items[:2]


def test_explicit_and_configured_eval_splits(copies):
    arc = copies["arc_easy"]
    assert len(load_items(bench("arc_easy", arc), split="validation")) == 4
    assert load_items(bench("arc_easy", arc, eval_split="validation")) == load_items(bench("arc_easy", arc),
                                                                                      split="validation")
    with pytest.raises(ValueError, match=r"also the default evaluation split; set eval_split to one of "
                                         r"\['train', 'validation'\]"):
        load_items(bench("arc_easy", arc, split="test"))


@pytest.mark.parametrize("name", GENERATIVE)
def test_generative_benchmarks_have_no_items(copies, name):
    with pytest.raises(ValueError, match=f"benchmark {name} is generative"):
        load_items(bench(name, copies[name]))


@pytest.mark.parametrize("name", ["piqa", "hellaswag"])
def test_unlabelled_test_splits_are_refused(copies, name):
    with pytest.raises(ValueError, match=r"split 'test', row 0 .*no gold answer") as err:
        load_items(bench(name, copies[name]), split="test")
    assert "use 'validation' instead of 'test'" in str(err.value)
    with pytest.raises(ValueError, match="no gold answer"):
        list(iter_lm_texts(bench(name, copies[name], split="test")))


def test_humaneval_and_kodcode_derived_splits(copies):
    he = copies["humaneval"]
    train = list(iter_lm_texts(bench("humaneval", he)))
    test = list(iter_lm_texts(bench("humaneval", he, split="test")))
    assert [t.split("(")[0] for t in train] == [f"def add_{i}" for i in range(82)]
    assert [t.split("(")[0] for t in test] == [f"def add_{i}" for i in range(82, 164)]
    kod = copies["kodcode"]
    held_out = list(iter_lm_texts(bench("kodcode", kod, split="test")))
    assert held_out == [f"Write a function that returns {i}.\ndef f():\n    return {i}" for i in (9, 19)]
    assert not set(held_out) & set(iter_lm_texts(bench("kodcode", kod)))


def test_logiqa_original_files_and_dev_json(copies):
    assert sorted(p.name for p in copies["logiqa"].iterdir()) == ["Eval.txt", "Test.txt", "Train.txt"]
    assert [p.name for p in source_files(bench("logiqa", copies["logiqa"], split="validation"))] == ["Eval.txt"]
    assert [p.name for p in source_files(bench("medqa", copies["medqa"], split="validation"))] == ["dev.json"]
    assert len(load_items(bench("medqa", copies["medqa"]), split="validation")) == 4


def test_mistakes_name_the_valid_choices(copies, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'dev'; the splits are \['train', 'validation', 'test'\]"):
        list(iter_lm_texts(bench("sciq", copies["sciq"], split="dev")))
    with pytest.raises(ValueError, match=r"unknown split 'validation'; the splits are \['train', 'test'\]"):
        list(iter_lm_texts(bench("gsm8k", copies["gsm8k"], split="validation")))
    renamed = {"train": [{"query": "q", "answer": "a"}]}
    with pytest.raises(ValueError) as err:
        list(iter_lm_texts(bench("gsm8k", write_benchmark("gsm8k", tmp_path / "gsm", renamed))))
    assert "no field 'question'; the fields present are ['answer', 'query']" in str(err.value)
    arc = write_benchmark("arc_easy", tmp_path / "arc", {"train": BENCHMARK_RECORDS["arc_easy"]["train"]})
    (arc / "ARC-Easy" / "train-00000-of-00001.parquet").rename(arc / "train.parquet")
    (arc / "ARC-Easy").rmdir()  # the config folder of the hub layout is missing
    with pytest.raises(FileNotFoundError) as err:
        list(iter_lm_texts(bench("arc_easy", arc)))
    assert "is not a folder" in str(err.value) and "ARC-Easy/<split>-00000-of-00001.parquet" in str(err.value)
    sciq = write_benchmark("sciq", tmp_path / "sciq", {"train": BENCHMARK_RECORDS["sciq"]["train"]})
    with pytest.raises(FileNotFoundError) as err:
        load_items(bench("sciq", sciq))
    assert "no files for split 'test'" in str(err.value)
    assert "Data files there: ['data/train-00000-of-00001.parquet']" in str(err.value)


def test_mc_items_only_for_multiple_choice_benchmark_tasks(copies):
    assert mc_items_for(DataConfig(planted=PlantedConfig()), max_items=10) == {}
    tasks = [UnitConfig(name="text", source=SourceConfig(type="jsonl", path="x.jsonl")),
             UnitConfig(name="arc", source=bench("arc_easy", copies["arc_easy"])),
             UnitConfig(name="math", source=bench("gsm8k", copies["gsm8k"]))]
    items = mc_items_for(DataConfig(tasks=tasks), max_items=1)
    assert list(items) == ["arc"] and len(items["arc"]) == 1  # gsm8k is generative
    assert items["arc"] == load_items(bench("arc_easy", copies["arc_easy"]), limit=1)
    assert all(c.startswith(" ") for c in items["arc"][0].choices)


def test_offline_without_a_copy_fails_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)  # as on a machine without network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        load_items(bench("arc_challenge"))
    assert time.monotonic() - start < 10
    message = str(err.value)
    for part in ("allenai/ai2_arc", "config 'ARC-Challenge'", "split 'test'", "path is not set",
                 "hf download allenai/ai2_arc --repo-type dataset", "ARC-Challenge/<split>-00000-of-00001.parquet"):
        assert part in message, (part, message)
    with pytest.raises(RuntimeError, match=r"EleutherAI/logiqa, config 'logiqa', split 'train'.*Train\.txt"):
        list(iter_lm_texts(bench("logiqa")))
    assert benchmarks.benchmark_files(bench("logiqa")) == []
