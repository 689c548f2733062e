"""Small local copies of the public corpora and target benchmarks, written in each data set's real
schema: the hub repo's file layout, file format and compression, column names and types, and markup.

Every ``write_*`` function writes a folder laid out like the hub repo (what ``hf download <id>
--repo-type dataset --local-dir <folder>`` gives) and returns its root, so a source with
``path: <root>`` reads it. The record lists they write are module constants or return values, so tests
can assert exact outputs. Nothing here touches the network. The schemas and where they were found are
documented in :mod:`grape_ds.data.corpora` and :mod:`grape_ds.data.benchmarks`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

__all__ = ["write_climblab", "write_slimpajama_627b", "write_slimpajama_6b", "slimpajama_record",
           "write_wiki40b", "wiki40b_markup", "write_gpt2_shaped_tokenizer", "BENCHMARK_RECORDS",
           "write_benchmark", "humaneval_records", "kodcode_records"]


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------

def write_climblab(root: Path, clusters: Mapping[int, Sequence[Sequence[int]]], files_per_cluster: int = 2) -> Path:
    """nvidia/ClimbLab: ``cluster_<k>/cluster_<k>_<nnn>.tokenized.parquet`` with columns ``tokens``
    (list<int64>, GPT-2 ids) and ``token_count`` (int64); each cluster's documents are spread in order
    over ``files_per_cluster`` files (numbered from 001)."""
    for cluster, docs in clusters.items():
        folder = root / f"cluster_{cluster}"
        folder.mkdir(parents=True, exist_ok=True)
        per_file = -(-len(docs) // files_per_cluster)
        for part in range(files_per_cluster):
            chunk = [list(d) for d in docs[part * per_file:(part + 1) * per_file]]
            table = pa.table({"tokens": pa.array(chunk, type=pa.list_(pa.int64())),
                              "token_count": pa.array([len(d) for d in chunk], type=pa.int64())})
            pq.write_table(table, folder / f"cluster_{cluster}_{part + 1:03d}.tokenized.parquet")
    return root


def slimpajama_record(text: str, set_name: str) -> dict:
    """One SlimPajama record: ``{"text": ..., "meta": {"redpajama_set_name": ...}}``."""
    return {"text": text, "meta": {"redpajama_set_name": set_name}}


def write_slimpajama_627b(root: Path, splits: Mapping[str, Sequence[dict]]) -> Path:
    """cerebras/SlimPajama-627B: zstd-compressed JSON lines, ``train/chunk1/example_train_0.jsonl.zst``
    (``validation``/``test``: ``<split>/chunk1/example_holdout_0.jsonl.zst``)."""
    for split, records in splits.items():
        folder = root / split / "chunk1"
        folder.mkdir(parents=True, exist_ok=True)
        name = "example_train_0" if split == "train" else "example_holdout_0"
        lines = "".join(json.dumps(r) + "\n" for r in records).encode()
        (folder / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return root


def write_slimpajama_6b(root: Path, splits: Mapping[str, Sequence[dict]]) -> Path:
    """DKYoon/SlimPajama-6B: ``data/<split>-00000-of-00001-<hash>.parquet`` with a ``text`` column and a
    ``meta`` struct column holding ``redpajama_set_name``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    meta_type = pa.struct([("redpajama_set_name", pa.string())])
    for split, records in splits.items():
        table = pa.table({"text": pa.array([r["text"] for r in records], type=pa.string()),
                          "meta": pa.array([r["meta"] for r in records], type=meta_type)})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001-9f769cf7ce219017.parquet")
    return root


def wiki40b_markup(title: str, sections: Sequence[tuple[str | None, Sequence[str]]]) -> str:
    """A Wiki40B ``text`` value: ``\\n_START_ARTICLE_\\n<title>``, then per section an optional
    ``\\n_START_SECTION_\\n<heading>`` and ``\\n_START_PARAGRAPH_\\n<paragraph>`` per paragraph, with
    line breaks inside a paragraph written ``_NEWLINE_``."""
    out = f"\n_START_ARTICLE_\n{title}\n"
    for heading, paragraphs in sections:
        if heading is not None:
            out += f"_START_SECTION_\n{heading}\n"
        for paragraph in paragraphs:
            out += "_START_PARAGRAPH_\n" + paragraph.replace("\n", "_NEWLINE_") + "\n"
    return out


def write_wiki40b(root: Path, language: str, splits: Mapping[str, Sequence[str]]) -> Path:
    """google/wiki40b: ``<lang>/<split>-00000-of-00001.parquet`` with string columns ``wikidata_id``,
    ``text`` (marked-up article) and ``version_id``."""
    folder = root / language
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        table = pa.table({"wikidata_id": [f"Q{100 + i}" for i in range(len(texts))], "text": list(texts),
                          "version_id": [str(9_000_000_000_000_000_000 + i) for i in range(len(texts))]})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return root


def write_gpt2_shaped_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer with GPT-2's vocabulary size (50257) and end-of-text id (50256), written
    with ``save_pretrained``. It is not GPT-2 (no merges: text becomes one token per byte), but GPT-2
    token ids pass through it unchanged, which is what packing a ClimbLab domain needs offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {f"<unused_{i}>": i for i in range(len(vocab), 50256)}
    vocab["<|endoftext|>"] = 50256
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------
# Benchmarks: the first record of each split is hand-written (tests assert its exact formatting),
# the rest are generated fillers in the same schema.
# ----------------------------------------------------------------------------------------------

def _arc(split: str, n: int) -> list[dict]:
    first = {"id": f"Mercury_{split}_1", "question": "Which of these animals is a mammal?",
             "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["A", "B", "C", "D"]},
             "answerKey": "B"}
    rest = [{"id": f"NYSEDREGENTS_{split}_{i}", "question": f"What is {i} plus {i}?",
             "choices": {"text": [str(i), str(2 * i), str(3 * i)], "label": ["1", "2", "3"]}, "answerKey": "2"}
            for i in range(2, n + 1)]
    return [first, *rest]


def _piqa(split: str, n: int) -> list[dict]:
    label = -1 if split == "test" else 1  # the test split is unlabelled
    first = {"goal": "How do I open a stuck jar lid?", "sol1": "Put the jar in the freezer.",
             "sol2": "Run the lid under hot water, then twist.", "label": label}
    rest = [{"goal": f"How do I fold shirt {i}?", "sol1": "Fold it in half twice.", "sol2": "Crumple it up.",
             "label": -1 if split == "test" else 0} for i in range(2, n + 1)]
    return [first, *rest]


def _sciq(split: str, n: int) -> list[dict]:
    first = {"question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
             "distractor3": "viruses", "distractor1": "protozoa", "distractor2": "gymnosperms",
             "correct_answer": "mesophilic organisms",
             "support": " Mesophiles grow best in moderate temperature, typically between 25°C and 40°C."}
    rest = [{"question": f"Which planet is number {i}?", "distractor3": "Pluto", "distractor1": "the Moon",
             "distractor2": "the Sun", "correct_answer": f"planet {i}", "support": ""} for i in range(2, n + 1)]
    return [first, *rest]


def _hellaswag(split: str, n: int) -> list[dict]:
    label = "" if split == "test" else "1"  # the test split is unlabelled
    first = {"ind": 4, "activity_label": "Home and Garden",
             "ctx_a": "[header] How to grow tomatoes [title] Choose a sunny spot.", "ctx_b": "pick a Spot",
             "ctx": "[header] How to grow tomatoes [title] Choose a sunny spot. pick a Spot",
             "endings": ["[step] Water them daily.", "that gets six hours of sun  each day.",
                         "[title] Buy seeds.", "and paint it blue."],
             "source_id": "wikihow~71", "split": split, "split_type": "indomain", "label": label}
    rest = [{"ind": 10 + i, "activity_label": "Running a marathon", "ctx_a": f"A man runs lap {i}.", "ctx_b": "he",
             "ctx": f"A man runs lap {i}. he", "endings": ["stops.", "keeps running.", "flies.", "sings."],
             "source_id": f"activitynet~v_{i}", "split": split, "split_type": "zeroshot",
             "label": "" if split == "test" else "1"} for i in range(2, n + 1)]
    return [first, *rest]


def _logiqa_block(label: str, context: str, question: str, options: Sequence[str]) -> str:
    """One record of the original LogiQA files: a blank line, then label, passage, question, options."""
    return "\n" + "\n".join([label, context, question, *(f"{'ABCD'[i]}.{o}" for i, o in enumerate(options))]) + "\n"


_LOGIQA_FIRST = ("c", "Some Cantonese don't like chili.So some southerners don't like chili.",
                 "Which of the following can guarantee the above argument?",
                 ["Some Cantonese love chili.", "Some people who like peppers are southerners.",
                  "All Cantonese are southerners.", "Some Cantonese like neither peppers nor sweets."])


def _logiqa(split: str, n: int) -> list[dict]:
    """Records as the files hold them (label, raw passage/question/options; see write_benchmark)."""
    first = dict(zip(("label", "context", "question", "options"), _LOGIQA_FIRST))
    rest = [{"label": "a", "context": f"Every bird in aviary {i} sings.", "question": "What follows?",
             "options": [f"Birds in aviary {i} sing.", "Nothing.", "Fish sing.", "Birds swim."]}
            for i in range(2, n + 1)]
    return [first, *rest]


def _mathqa(split: str, n: int) -> list[dict]:
    first = {"Problem": "a train running at the speed of 60 km / hr crosses a pole in 9 seconds . what is the "
                        "length of the train ?",
             "Rationale": "\"speed = 60 * 5 / 18 m / sec = 50 / 3 m / sec . length = 50 / 3 * 9 = 150 m\"",
             "options": "a ) 120 metres , b ) 180 metres , c ) 324 metres , d ) 150 metres , e ) none of these",
             "correct": "d", "annotated_formula": "multiply(divide(multiply(60, const_1000), const_3600), 9)",
             "linear_formula": "multiply(n0,const_1000)|divide(#0,const_3600)|multiply(n1,#1)|",
             "category": "physics"}
    rest = [{"Problem": f"what is {i} times 2 ?", "Rationale": "\"simple\"",
             "options": f"a ) {i} , b ) {2 * i} , c ) {3 * i} , d ) {4 * i} , e ) 0", "correct": "b",
             "annotated_formula": f"multiply({i}, 2)", "linear_formula": "multiply(n0,n1)|",
             "category": "general"} for i in range(2, n + 1)]
    return [first, *rest]


def _medqa(split: str, n: int) -> list[dict]:
    first = {"id": f"{split}-00000", "sent1": "A 23-year-old woman presents with fever and a rash. Which drug is "
                                              "the best initial treatment?",
             "sent2": "", "ending0": "Ampicillin", "ending1": "Ceftriaxone", "ending2": "Doxycycline",
             "ending3": "Nitrofurantoin", "label": 2}
    rest = [{"id": f"{split}-{i:05d}", "sent1": f"Patient {i} has a cough. What is next?", "sent2": "",
             "ending0": "Chest X-ray", "ending1": "Surgery", "ending2": "Nothing", "ending3": "MRI", "label": 0}
            for i in range(1, n)]
    return [first, *rest]


def _gsm8k(split: str, n: int) -> list[dict]:
    first = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "in May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                       "clips altogether in April and May.\n#### 72"}
    rest = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(2, n + 1)]
    return [first, *rest]


def humaneval_records(n: int = 164) -> list[dict]:
    """openai/openai_humaneval rows (its only split, ``test``, has 164 problems)."""
    return [{"task_id": f"HumanEval/{i}",
             "prompt": f"def add_{i}(x: int) -> int:\n    \"\"\"Return x plus {i}.\"\"\"\n",
             "canonical_solution": f"    return x + {i}\n",
             "test": f"def check(candidate):\n    assert candidate(0) == {i}\n", "entry_point": f"add_{i}"}
            for i in range(n)]


def kodcode_records(n: int = 20) -> list[dict]:
    """KodCode/KodCode-V1-SFT-R1 rows (its split ``train``)."""
    return [{"style": "instruct", "question_id": f"Prefill_{i}_I", "subset": "Prefill",
             "question": f"Write a function that returns {i}.", "solution": f"def f():\n    return {i}",
             "r1_solution": f"def f():\n    return {i}",
             "conversations": [{"from": "human", "value": f"Write a function that returns {i}."},
                               {"from": "gpt", "value": f"def f():\n    return {i}"}]} for i in range(n)]


_STANDARD = ("train", "validation", "test")


def _per_split(make, splits: Sequence[str] = _STANDARD, n: int = 4) -> dict[str, list[dict]]:
    return {split: make(split, n) for split in splits}


BENCHMARK_RECORDS: dict[str, dict[str, list[dict]]] = {
    "logiqa": _per_split(_logiqa),
    "arc_easy": _per_split(_arc),
    "arc_challenge": _per_split(_arc),
    "piqa": _per_split(_piqa),
    "hellaswag": _per_split(_hellaswag),
    "sciq": _per_split(_sciq),
    "humaneval": {"test": humaneval_records()},
    "kodcode": {"train": kodcode_records()},
    "gsm8k": _per_split(_gsm8k, ("train", "test")),
    "mathqa": _per_split(_mathqa),
    "medqa": _per_split(_medqa),
}


def _write_parquet(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(records)), path)


def _write_logiqa(root: Path, splits: Mapping[str, Sequence[dict]]) -> None:
    """The original files EleutherAI/logiqa's loading script reads: Train.txt, Eval.txt, Test.txt."""
    names = {"train": "Train.txt", "validation": "Eval.txt", "test": "Test.txt"}
    for split, records in splits.items():
        text = "".join(_logiqa_block(r["label"], r["context"], r["question"], r["options"]) for r in records)
        (root / names[split]).write_text(text, encoding="utf-8")


def _write_medqa(root: Path, splits: Mapping[str, Sequence[dict]]) -> None:
    """GBaker/MedQA-USMLE-4-options-hf: train.json, dev.json, test.json (JSON lines)."""
    names = {"train": "train.json", "validation": "dev.json", "test": "test.json"}
    for split, records in splits.items():
        (root / names[split]).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


_PARQUET_LAYOUTS = {
    "arc_easy": "ARC-Easy/{split}-00000-of-00001.parquet",
    "arc_challenge": "ARC-Challenge/{split}-00000-of-00001.parquet",
    "piqa": "piqa_{split}.parquet",
    "hellaswag": "data/{split}-00000-of-00001.parquet",
    "sciq": "data/{split}-00000-of-00001.parquet",
    "humaneval": "openai_humaneval/{split}-00000-of-00001.parquet",
    "kodcode": "data/{split}-00000-of-00011.parquet",
    "gsm8k": "main/{split}-00000-of-00001.parquet",
    "mathqa": "data/{split}-00000-of-00001.parquet",
}


def write_benchmark(name: str, root: Path, records: Mapping[str, Sequence[dict]] | None = None) -> Path:
    """Write benchmark ``name`` (``records``, default :data:`BENCHMARK_RECORDS`) in its hub repo's layout
    under ``root``: Parquet files named as on the hub, LogiQA's original .txt files, MedQA's JSON lines."""
    root.mkdir(parents=True, exist_ok=True)
    splits = BENCHMARK_RECORDS[name] if records is None else records
    if name == "logiqa":
        _write_logiqa(root, splits)
    elif name == "medqa":
        _write_medqa(root, splits)
    else:
        for split, rows in splits.items():
            _write_parquet(root / _PARQUET_LAYOUTS[name].format(split=split), rows)
    return root
