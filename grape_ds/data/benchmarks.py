"""Target benchmarks: hub ids, splits, the LM text of the target loss, and multiple-choice items.

:data:`BENCHMARKS` holds one :class:`BenchmarkSpec` per name of ``config.BENCHMARKS``. A target task
(``type: benchmark``) uses two splits of its benchmark: ``split`` (default ``train``), whose examples
become LM text for the target loss that drives the task weights (:func:`iter_lm_texts`), and
``eval_split`` (default: the spec's ``eval_split``, always a different split), whose examples are
scored for accuracy (:func:`load_items`).

**LM text** is the question (or context) followed by the gold answer, as the GRAPE research code
builds it (``reference/ALGORITHMS.md`` §6.2); one deliberate difference is SciQ, whose support,
question and answer are joined by spaces (the research code glues them with no separator).

**Multiple-choice items** are formatted exactly as lm-evaluation-harness formats the task (zero-shot):
the context is the task's ``doc_to_text``, each choice is ``target_delimiter`` (one space) followed by
the task's ``doc_to_choice`` entry, and the gold index is ``doc_to_target``; the lm-eval task file each
format follows is named next to it. HumanEval, KodCode and GSM8K are generative: LM text only.

**Splits.** The data set's own splits, except two made from rows of one split (by row index in file
order, the same on every machine): HumanEval has only ``test`` (164 problems); grape-ds splits it into
``train`` (the first 82) and ``test`` (the last 82), as the research code splits it 50/50. KodCode has
only ``train``; grape-ds holds out every 10th row (index % 10 == 9) as ``test``, a 90/10 split.
Unlabelled splits (the PIQA and HellaSwag ``test`` splits) are refused, never scored against a dummy label.

**Where the data comes from.** With ``path`` set: a local copy, a folder holding the hub repo's files
in the hub repo's layout (e.g. ``hf download allenai/ai2_arc --repo-type dataset --local-dir <folder>``).
In it, the files of a split are those under the spec's ``local_dir`` (the config's folder, e.g.
``ARC-Easy/``; else the whole folder) whose relative path contains the split name as a word (split at
``- _ . /``): ``ARC-Easy/test-00000-of-00001.parquet``, ``data/validation-00000-of-00001.parquet``,
``piqa_validation.parquet``, ``default/train/0000.parquet`` (the hub's Parquet export), ``dev.json``
(``dev`` also names ``validation``). Files may be Parquet, JSON lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``) or ``.json`` (JSON lines or an array); LogiQA also reads the original ``Train.txt``,
``Eval.txt``, ``Test.txt``. Each spec's ``layout`` is its hub repo's actual layout. Without ``path``:
the hub id (``hub_id``, or the spec's), streamed; offline that fails within seconds with a message
that names what was looked for and how to provide a local copy.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from grape_ds.config import DataConfig, SourceConfig
from grape_ds.data.readers import hub_records, iter_json_records, iter_parquet_rows, missing_field, open_text

__all__ = ["MCItem", "BenchmarkSpec", "RowSplit", "BENCHMARKS", "iter_lm_texts", "load_items",
           "is_multiple_choice", "benchmark_files", "mc_items_for"]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: score ``context + choices[i]`` for each ``i``."""
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class RowSplit:
    """A grape-ds split made of some rows of one of the data set's own splits."""
    source: str                  # the data set's split the rows come from
    keep: Callable[[int], bool]  # row index (0-based, in file order) -> whether the row belongs here
    rule: str                    # the rule in words


Record = dict
_T = TypeVar("_T")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives, its splits, and how a record becomes LM text and an MC item."""
    name: str
    hub_id: str
    hub_config: str | None
    layout: str                  # the hub repo's file layout (what a local copy holds)
    local_dir: str | None        # folder of a local copy holding this config's files (None: all of it)
    splits: Mapping[str, str | RowSplit]  # grape-ds split -> the data set's split (or rows of one)
    train_split: str             # default split of the target loss (drives the task weights)
    eval_split: str              # default split scored for accuracy; differs from train_split
    columns: tuple[str, ...]     # the record fields the formatters read
    lm_text: Callable[[Record], str]
    mc_item: Callable[[Record], MCItem] | None  # None: generative (LM text only)
    lm_eval_task: str | None     # the lm-evaluation-harness task file (the MC format follows it); None: none
    file_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # data set split -> words
                                 # naming its files in a local copy (default: the split name; see _FILE_KEYS)
    txt_records: Callable[[Iterable[str]], Iterator[Record]] | None = None  # parser for .txt files


class _NoGold(ValueError):
    """A record without a usable gold answer (an unlabelled split)."""


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def iter_lm_texts(src: SourceConfig) -> Iterator[str]:
    """Stream the LM text (question + gold answer) of every example of ``src.split``.

    Raises:
        ValueError: unknown benchmark or split (the message names the valid ones), a record without a
            needed column (it names the columns there are), or an unlabelled record.
        FileNotFoundError: ``src.path`` holds no files for the split (the message gives the layout).
        RuntimeError: no ``src.path`` and the hub copy cannot be loaded (e.g. offline).
    """
    spec = _spec(src)
    for index, record, where in _records(spec, src, src.split):
        yield _convert(spec.lm_text, record, spec, src.split, index, where)


def load_items(src: SourceConfig, split: str | None = None, limit: int | None = None) -> list[MCItem]:
    """The multiple-choice items of a split, formatted as lm-evaluation-harness formats the task.

    Args:
        src: a benchmark source.
        split: the split to load; None: ``src.eval_split``, else the benchmark's default evaluation
            split (which must differ from ``src.split``, the split that drives the task weights).
        limit: at most this many items (the first ones, in file order); None: all.

    Raises:
        ValueError: the benchmark is generative (no MC items), the split is unknown or unlabelled, or
            the default evaluation split is also ``src.split``; plus the errors of :func:`iter_lm_texts`.
    """
    spec = _spec(src)
    if spec.mc_item is None:
        raise ValueError(f"benchmark {spec.name} is generative: it gives LM text for the target loss but "
                         f"no multiple-choice items; the multiple-choice benchmarks are "
                         f"{[n for n in BENCHMARKS if is_multiple_choice(n)]}")
    if split is None:
        split = src.eval_split or spec.eval_split
        if split == src.split:
            others = [s for s in spec.splits if s != split]
            raise ValueError(f"benchmark {spec.name}: split {split!r} drives the task weights and is also "
                             f"the default evaluation split; set eval_split to one of {others}")
    mc_item, rows = spec.mc_item, _records(spec, src, split)
    items = (_convert(mc_item, record, spec, split, index, where) for index, record, where in rows)
    return list(itertools.islice(items, limit))  # stops reading at the limit


def is_multiple_choice(name: str) -> bool:
    """Whether benchmark ``name`` has multiple-choice items (else it is generative: LM text only)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
    return BENCHMARKS[name].mc_item is not None


def benchmark_files(src: SourceConfig) -> list[Path]:
    """The local files :func:`iter_lm_texts` reads for ``src.split`` (empty without ``src.path``)."""
    spec = _spec(src)
    if not src.path:
        return []
    return _split_files(spec, Path(src.path), _resolve_split(spec, src.split)[0])


def mc_items_for(cfg: DataConfig, max_items: int | None) -> dict[str, list[MCItem]]:
    """The multiple-choice items of every target task whose benchmark is multiple choice: task name ->
    at most ``max_items`` (None: all) items of its evaluation split (:func:`load_items`). Empty when
    no task is such a benchmark; tasks of other source types and generative benchmarks are left out.

    Raises:
        the errors of :func:`load_items` (e.g. RuntimeError: a hub copy cannot be loaded offline).
    """
    return {t.name: load_items(t.source, limit=max_items) for t in cfg.tasks
            if t.source.type == "benchmark" and is_multiple_choice(t.source.benchmark)}


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

_FILE_KEYS = {"validation": ("validation", "dev")}  # as the hub's own split-name inference
_LOCAL_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")


def _spec(src: SourceConfig) -> BenchmarkSpec:
    if src.type != "benchmark":
        raise ValueError(f"not a benchmark source: type {src.type!r}")
    if src.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {src.benchmark!r}; choose from {list(BENCHMARKS)}")
    return BENCHMARKS[src.benchmark]


def _resolve_split(spec: BenchmarkSpec, split: str) -> tuple[str, Callable[[int], bool] | None]:
    """The data set's split holding ``split``, and the row filter (None: every row)."""
    if split not in spec.splits:
        derived = "".join(f"; {name!r} is {target.rule}" for name, target in spec.splits.items()
                          if isinstance(target, RowSplit))
        raise ValueError(f"benchmark {spec.name}: unknown split {split!r}; the splits are {list(spec.splits)}"
                         + derived)
    target = spec.splits[split]
    return (target.source, target.keep) if isinstance(target, RowSplit) else (target, None)


def _records(spec: BenchmarkSpec, src: SourceConfig, split: str) -> Iterator[tuple[int, Record, str]]:
    """(row index, record, where it came from) of the rows of ``split``, streamed."""
    source, keep = _resolve_split(spec, split)
    rows = _local_rows(spec, Path(src.path), source) if src.path else _hub_rows(spec, src, source)
    for index, (record, where) in enumerate(rows):
        for column in spec.columns:  # every row: a data set can change its columns part-way
            if column not in record:
                raise missing_field(column, f"benchmark {spec.name}, split {split!r}, row {index} ({where})",
                                    list(record), hint=f"benchmark {spec.name} reads {list(spec.columns)}.")
        if keep is None or keep(index):
            yield index, record, where


def _convert(fn: Callable[[Record], _T], record: Record, spec: BenchmarkSpec, split: str, index: int,
             where: str) -> _T:
    try:
        return fn(record)
    except _NoGold as exc:
        raise ValueError(f"benchmark {spec.name}, split {split!r}, row {index} ({where}): no gold answer "
                         f"({exc}); an unlabelled split cannot be used (for PIQA and HellaSwag, use "
                         "'validation' instead of 'test')") from None
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:  # a malformed row
        raise ValueError(f"benchmark {spec.name}, split {split!r}, row {index} ({where}): cannot read the "
                         f"row ({type(exc).__name__}: {exc}); its fields are {sorted(record)}") from None


def _split_files(spec: BenchmarkSpec, root: Path, source: str) -> list[Path]:
    """Files of the data set's split ``source`` in a local copy (see the module docstring)."""
    base = root / spec.local_dir if spec.local_dir else root
    if not base.is_dir():
        raise FileNotFoundError(f"benchmark {spec.name}: {base} is not a folder; a local copy of "
                                f"{spec.hub_id} keeps the hub repo's layout: {spec.layout}")
    keys = spec.file_keys.get(source) or _FILE_KEYS.get(source, (source,))
    suffixes = _LOCAL_SUFFIXES + ((".txt",) if spec.txt_records else ())
    candidates = sorted(p for p in base.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                        and not any(part.startswith(".") for part in p.relative_to(base).parts))
    files = [p.resolve() for p in candidates if set(keys) & _words(p.relative_to(base))]
    if not files:
        present = [p.relative_to(base).as_posix() for p in candidates]
        raise FileNotFoundError(
            f"benchmark {spec.name}: no files for split {source!r} in {base} (looked for names containing "
            f"{' or '.join(repr(k) for k in keys)}). A local copy of {spec.hub_id} keeps the hub repo's "
            f"layout: {spec.layout}. Data files there: {present or 'none'}")
    return files


def _words(relative: Path) -> set[str]:
    return set(re.split(r"[-_./]", relative.as_posix().lower()))


def _local_rows(spec: BenchmarkSpec, root: Path, source: str) -> Iterator[tuple[Record, str]]:
    for path in _split_files(spec, root, source):
        if path.name.endswith(".parquet"):
            rows: Iterator[Record] = iter_parquet_rows(path, list(spec.columns))
        elif path.name.endswith(".txt"):
            rows = _txt_rows(spec, path)
        else:
            rows = iter_json_records(path)
        for row in rows:
            yield row, str(path)


def _txt_rows(spec: BenchmarkSpec, path: Path) -> Iterator[Record]:
    assert spec.txt_records is not None, "only specs with a .txt parser list .txt files"
    with open_text(path) as f:
        yield from spec.txt_records(f)


def _hub_rows(spec: BenchmarkSpec, src: SourceConfig, source: str) -> Iterator[tuple[Record, str]]:
    hub_id = src.hub_id or spec.hub_id
    config = src.hub_config if src.hub_config is not None else spec.hub_config
    advice = (f"No local copy was given (source.path is not set). To read one, download the files, e.g. "
              f"`hf download {hub_id} --repo-type dataset --local-dir <folder>`, and set path: <folder>; "
              f"the layout is {spec.layout}.")
    for record in hub_records(hub_id, config, source, src.revision, advice=advice):
        yield record, hub_id


# ----------------------------------------------------------------------------------------------
# Formats. Choices are scored as lm-eval's target_delimiter (" ") + choice.
# ----------------------------------------------------------------------------------------------

def _continuations(choices: Iterable[str]) -> tuple[str, ...]:
    return tuple(" " + choice for choice in choices)


def _gold(value: object, n_choices: int) -> int:
    """A gold index in [0, n_choices); anything else (e.g. -1 or '' in unlabelled splits) is no gold."""
    text = str(value).strip()
    if not text.lstrip("-").isdigit() or not 0 <= int(text) < n_choices:
        raise _NoGold(f"label {value!r}")
    return int(text)


# ARC (lm_eval/tasks/arc/arc_easy.yaml, arc_challenge.yaml): doc_to_text "Question: {{question}}\nAnswer:",
# doc_to_choice "{{choices.text}}", doc_to_target "{{choices.label.index(answerKey)}}".
def _arc_gold(doc: Record) -> int:
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise _NoGold(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    return labels.index(doc["answerKey"])


def _arc_text(doc: Record) -> str:
    return f"{doc['question']} {doc['choices']['text'][_arc_gold(doc)]}"


def _arc_item(doc: Record) -> MCItem:
    return MCItem(f"Question: {doc['question']}\nAnswer:", _continuations(doc["choices"]["text"]), _arc_gold(doc))


# PIQA (lm_eval/tasks/piqa/piqa.yaml): doc_to_text "Question: {{goal}}\nAnswer:",
# doc_to_choice "{{[sol1, sol2]}}", doc_to_target label.
def _piqa_text(doc: Record) -> str:
    return f"{doc['goal']} {(doc['sol1'], doc['sol2'])[_gold(doc['label'], 2)]}"


def _piqa_item(doc: Record) -> MCItem:
    return MCItem(f"Question: {doc['goal']}\nAnswer:", _continuations([doc["sol1"], doc["sol2"]]),
                  _gold(doc["label"], 2))


# SciQ (lm_eval/tasks/sciq/sciq.yaml): doc_to_text "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:",
# doc_to_choice "{{[distractor1, distractor2, distractor3, correct_answer]}}", doc_to_target 3.
def _sciq_text(doc: Record) -> str:
    return " ".join(part for part in (doc["support"].strip(), doc["question"], doc["correct_answer"]) if part)


def _sciq_item(doc: Record) -> MCItem:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return MCItem(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", _continuations(choices), 3)


# HellaSwag (lm_eval/tasks/hellaswag/hellaswag.yaml with utils.process_docs): doc_to_text "{{query}}",
# doc_to_choice "choices", doc_to_target "{{label}}", where query = preprocess(activity_label + ": " +
# ctx_a + " " + ctx_b.capitalize()) and choices = [preprocess(ending) for ending in endings].
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of HellaSwag
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_text(doc: Record) -> str:
    return f"{doc['ctx']} {doc['endings'][_gold(doc['label'], len(doc['endings']))]}"


def _hellaswag_item(doc: Record) -> MCItem:
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = [_hellaswag_preprocess(ending) for ending in doc["endings"]]
    return MCItem(query, _continuations(choices), _gold(doc["label"], len(choices)))


# LogiQA (lm_eval/tasks/logiqa/logiqa.yaml with utils_logiqa.py): doc_to_text "Passage: <context>\n
# Question: <question>\nChoices:\nA. <option>\n...D. <option>\nAnswer:", doc_to_choice "{{options}}",
# doc_to_target ["a", "b", "c", "d"].index(label.strip()).
_LOGIQA_LETTERS = ("a", "b", "c", "d")


def _logiqa_gold(doc: Record) -> int:
    label = str(doc["label"]).strip()
    if label not in _LOGIQA_LETTERS[:len(doc["options"])]:
        raise _NoGold(f"label {doc['label']!r}")
    return _LOGIQA_LETTERS.index(label)


def _logiqa_text(doc: Record) -> str:
    return f"{doc['context']} {doc['question']} {doc['options'][_logiqa_gold(doc)]}"


def _logiqa_item(doc: Record) -> MCItem:
    prompt = f"Passage: {doc['context']}\nQuestion: {doc['question']}\nChoices:\n"
    prompt += "".join(f"{letter.upper()}. {option}\n" for letter, option in zip(_LOGIQA_LETTERS, doc["options"]))
    return MCItem(prompt + "Answer:", _continuations(doc["options"]), _logiqa_gold(doc))


def _logiqa_normalize(text: str) -> str:
    return text.replace(".", ". ").strip()


def _logiqa_txt_records(lines: Iterable[str]) -> Iterator[Record]:
    """Records of an original LogiQA file (``Train.txt``, ``Eval.txt``, ``Test.txt``): blank-line
    separated blocks of the answer letter, the passage, the question and one ``X.``-prefixed line per
    option, parsed as EleutherAI/logiqa's loading script parses them."""
    block: list[str] = []
    for line in itertools.chain(lines, [""]):  # a final blank line ends the last block
        if line.strip():
            block.append(line.rstrip("\n"))
            continue
        if not block:
            continue
        if len(block) < 4:
            raise ValueError(f"LogiQA record {block!r}: expected the answer letter, passage, question and options")
        yield {"label": block[0].strip(), "context": _logiqa_normalize(block[1]),
               "question": _logiqa_normalize(block[2]),
               "options": [_logiqa_normalize(option[2:]) for option in block[3:]]}
        block = []


# MathQA (lm_eval/tasks/mathqa/mathqa.yaml with utils.py): doc_to_text "Question: {{Problem}}\nAnswer:",
# doc_to_choice: the options string "a ) 38 , b ) 27.675 , ..." split by the regex below,
# doc_to_target ['a', 'b', 'c', 'd', 'e'].index(correct).
def _mathqa_choices(doc: Record) -> list[str]:
    return [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \) .*?, |e \) .*?$", doc["options"])]


def _mathqa_gold(doc: Record, n_choices: int) -> int:
    letters = ("a", "b", "c", "d", "e")[:n_choices]
    if doc["correct"] not in letters:
        raise _NoGold(f"correct {doc['correct']!r} with {n_choices} parsed options")
    return letters.index(doc["correct"])


def _mathqa_text(doc: Record) -> str:
    choices = _mathqa_choices(doc)
    return f"{doc['Problem']} {choices[_mathqa_gold(doc, len(choices))]}"


def _mathqa_item(doc: Record) -> MCItem:
    choices = _mathqa_choices(doc)
    return MCItem(f"Question: {doc['Problem']}\nAnswer:", _continuations(choices), _mathqa_gold(doc, len(choices)))


# MedQA, 4 options (lm_eval/tasks/medqa/medqa.yaml with preprocess_medqa.py, task medqa_4options):
# doc_to_text "Question: <sent1>\nA. <ending0>\nB. <ending1>\nC. <ending2>\nD. <ending3>\nAnswer:",
# doc_to_choice ['A', 'B', 'C', 'D'], doc_to_target label.
_MEDQA_ENDINGS = ("ending0", "ending1", "ending2", "ending3")


def _medqa_text(doc: Record) -> str:
    return f"{doc['sent1']} {doc[_MEDQA_ENDINGS[_gold(doc['label'], 4)]]}"


def _medqa_item(doc: Record) -> MCItem:
    options = "".join(f"{letter}. {doc[key]}\n" for letter, key in zip("ABCD", _MEDQA_ENDINGS))
    return MCItem(f"Question: {doc['sent1']}\n{options}Answer:", _continuations("ABCD"), _gold(doc["label"], 4))


# Generative: LM text only.
def _gsm8k_text(doc: Record) -> str:
    return f"{doc['question']}\n{doc['answer']}"


def _humaneval_text(doc: Record) -> str:
    return f"{doc['prompt']}\n{doc['canonical_solution']}"


def _kodcode_text(doc: Record) -> str:
    return f"{doc['question']}\n{doc['solution']}"


# ----------------------------------------------------------------------------------------------
# The registry (names exactly config.BENCHMARKS)
# ----------------------------------------------------------------------------------------------

_STANDARD_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
_HUMANEVAL_HALF = 82  # of the 164 problems of its only split, "test"


def _arc(name: str, config: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name, hub_id="allenai/ai2_arc", hub_config=config, local_dir=config,
        layout=f"{config}/<split>-00000-of-00001.parquet (columns id, question, choices {{text, label}}, answerKey)",
        splits=_STANDARD_SPLITS, train_split="train", eval_split="test",
        columns=("question", "choices", "answerKey"), lm_text=_arc_text, mc_item=_arc_item,
        lm_eval_task=f"lm_eval/tasks/arc/{name}.yaml")


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "logiqa": BenchmarkSpec(
        name="logiqa", hub_id="EleutherAI/logiqa", hub_config="logiqa", local_dir=None,
        layout=("Train.txt, Eval.txt, Test.txt: the original files (github.com/lgw863/LogiQA-dataset) that "
                "EleutherAI/logiqa's loading script reads; or per-split Parquet/JSON-lines files with columns "
                "label, context, question, options, e.g. logiqa/<split>/0000.parquet"),
        splits=_STANDARD_SPLITS, train_split="train", eval_split="test",
        columns=("label", "context", "question", "options"), lm_text=_logiqa_text, mc_item=_logiqa_item,
        lm_eval_task="lm_eval/tasks/logiqa/logiqa.yaml", file_keys={"validation": ("validation", "eval")},
        txt_records=_logiqa_txt_records),
    "arc_easy": _arc("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc("arc_challenge", "ARC-Challenge"),
    "piqa": BenchmarkSpec(
        name="piqa", hub_id="baber/piqa", hub_config=None, local_dir=None,
        layout="piqa_<split>.parquet (columns goal, sol1, sol2, label; test labels are -1)",
        splits=_STANDARD_SPLITS, train_split="train", eval_split="validation",
        columns=("goal", "sol1", "sol2", "label"), lm_text=_piqa_text, mc_item=_piqa_item,
        lm_eval_task="lm_eval/tasks/piqa/piqa.yaml"),
    "hellaswag": BenchmarkSpec(
        name="hellaswag", hub_id="Rowan/hellaswag", hub_config=None, local_dir=None,
        layout=("data/<split>-00000-of-00001.parquet (columns ind, activity_label, ctx_a, ctx_b, ctx, endings, "
                "source_id, split, split_type, label; test labels are empty)"),
        splits=_STANDARD_SPLITS, train_split="train", eval_split="validation",
        columns=("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"), lm_text=_hellaswag_text,
        mc_item=_hellaswag_item, lm_eval_task="lm_eval/tasks/hellaswag/hellaswag.yaml"),
    "sciq": BenchmarkSpec(
        name="sciq", hub_id="allenai/sciq", hub_config=None, local_dir=None,
        layout=("data/<split>-00000-of-00001.parquet (columns question, distractor3, distractor1, distractor2, "
                "correct_answer, support)"),
        splits=_STANDARD_SPLITS, train_split="train", eval_split="test",
        columns=("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
        lm_text=_sciq_text, mc_item=_sciq_item, lm_eval_task="lm_eval/tasks/sciq/sciq.yaml"),
    "humaneval": BenchmarkSpec(
        name="humaneval", hub_id="openai/openai_humaneval", hub_config=None, local_dir="openai_humaneval",
        layout=("openai_humaneval/test-00000-of-00001.parquet (columns task_id, prompt, canonical_solution, "
                "test, entry_point)"),
        splits={"train": RowSplit("test", lambda index: index < _HUMANEVAL_HALF,
                                  f"the first {_HUMANEVAL_HALF} problems of 'test'"),
                "test": RowSplit("test", lambda index: index >= _HUMANEVAL_HALF,
                                 f"the problems of 'test' after the first {_HUMANEVAL_HALF}")},
        train_split="train", eval_split="test", columns=("prompt", "canonical_solution"),
        lm_text=_humaneval_text, mc_item=None, lm_eval_task="lm_eval/tasks/humaneval/humaneval.yaml"),
    "kodcode": BenchmarkSpec(
        name="kodcode", hub_id="KodCode/KodCode-V1-SFT-R1", hub_config=None, local_dir=None,
        layout=("data/train-<nnnnn>-of-00011.parquet (columns style, question_id, subset, question, solution, "
                "r1_solution, conversations, ...)"),
        splits={"train": RowSplit("train", lambda index: index % 10 != 9, "9 of every 10 rows of 'train'"),
                "test": RowSplit("train", lambda index: index % 10 == 9,
                                 "every 10th row of 'train' (index % 10 == 9)")},
        train_split="train", eval_split="test", columns=("question", "solution"),
        lm_text=_kodcode_text, mc_item=None, lm_eval_task=None),
    "gsm8k": BenchmarkSpec(
        name="gsm8k", hub_id="openai/gsm8k", hub_config="main", local_dir="main",
        layout="main/<split>-00000-of-00001.parquet (columns question, answer; splits train, test)",
        splits={"train": "train", "test": "test"}, train_split="train", eval_split="test",
        columns=("question", "answer"), lm_text=_gsm8k_text, mc_item=None,
        lm_eval_task="lm_eval/tasks/gsm8k/gsm8k.yaml"),
    "mathqa": BenchmarkSpec(
        name="mathqa", hub_id="allenai/math_qa", hub_config=None, local_dir=None,
        layout=("per-split Parquet files, e.g. data/<split>-00000-of-00001.parquet (columns Problem, Rationale, "
                "options, correct, annotated_formula, linear_formula, category)"),
        splits=_STANDARD_SPLITS, train_split="train", eval_split="test",
        columns=("Problem", "options", "correct"), lm_text=_mathqa_text, mc_item=_mathqa_item,
        lm_eval_task="lm_eval/tasks/mathqa/mathqa.yaml"),
    "medqa": BenchmarkSpec(
        name="medqa", hub_id="GBaker/MedQA-USMLE-4-options-hf", hub_config=None, local_dir=None,
        layout=("train.json, dev.json (validation), test.json: JSON lines with id, sent1, sent2, ending0..ending3, "
                "label"),
        splits=_STANDARD_SPLITS, train_split="train", eval_split="test",
        columns=("sent1", "ending0", "ending1", "ending2", "ending3", "label"), lm_text=_medqa_text,
        mc_item=_medqa_item, lm_eval_task="lm_eval/tasks/medqa/medqa.yaml"),
}
