"""The public pretraining corpora, one grape-ds domain at a time: ClimbLab, SlimPajama and Wiki40B.

A corpus source (``type: climblab | slimpajama | wiki40b``) streams the documents of one domain of
the corpus, chosen by ``subset``. With ``path`` set it reads a local copy: a folder holding the hub
repo's files in the hub repo's layout (for instance made with ``hf download <id> --repo-type dataset
--local-dir <folder>``, optionally with ``--include`` to fetch one domain). Without ``path`` it streams
the hub id (``hub_id``, or the public id below) with ``datasets.load_dataset(..., streaming=True)``;
offline that fails within seconds with a message naming what was looked for and the local layout.
Nothing is ever loaded whole into memory.

The schemas (column names, file layout, compression, markup) are the real ones, taken from:

**ClimbLab** (``nvidia/ClimbLab``; ``subset`` = cluster id 1..20). 20 topic clusters, stored as
GPT-2 token ids in Parquet: ``cluster_<k>/cluster_<k>_<nnn>.tokenized.parquet`` with the columns
``tokens`` (list of int: GPT-2 BPE ids) and ``token_count`` (int); the cluster is the folder, and the
repo has one split, ``train``. Sources: the dataset card (huggingface.co/datasets/nvidia/ClimbLab:
"token sequences that have been tokenized using the GPT-2 tokenizer", one folder per cluster), the
GRAPE authors' download script (``.../resolve/main/cluster_$CLS/cluster_${CLS}_${NUM}.tokenized.parquet``)
and their loader ``get_climblab`` (reads ``dataset['tokens']`` and ``dataset['token_count']`` from
``<climblab>/cluster_<k>/*.parquet``). Documents are yielded as ``list[int]``, not re-tokenised, so the
packing tokenizer must be GPT-2's (vocabulary :data:`GPT2_VOCAB_SIZE`, end-of-text :data:`GPT2_EOT_ID`).

**SlimPajama** (``cerebras/SlimPajama-627B``, or its 6B-token sample ``DKYoon/SlimPajama-6B``;
``subset`` = one of the 7 :data:`SLIMPAJAMA_SETS`). Every record is
``{"text": ..., "meta": {"redpajama_set_name": "RedPajamaCommonCrawl" | ...}}``; a domain is the texts
of one set name. SlimPajama-627B stores zstd-compressed JSON lines,
``<split>/chunk<i>/example_train_<j>.jsonl.zst`` (``example_holdout_<j>`` in ``validation`` and
``test``), splits ``train``, ``validation``, ``test`` (dataset card and tree of
huggingface.co/datasets/cerebras/SlimPajama-627B). SlimPajama-6B stores Parquet,
``data/<split>-<nnnnn>-of-<nnnnn>-<hash>.parquet`` with the same ``text`` and ``meta`` (a struct)
columns (tree of huggingface.co/datasets/DKYoon/SlimPajama-6B). A local copy of either layout is
recognised.

**Wiki40B** (``google/wiki40b``; ``subset`` = language config, one of :data:`WIKI40B_LANGUAGES`).
Parquet per language, ``<lang>/<split>-<nnnnn>-of-<nnnnn>.parquet`` (splits ``train``,
``validation``, ``test``) with the columns ``wikidata_id``, ``text``, ``version_id`` (tree of
huggingface.co/datasets/google/wiki40b after "Replace script with data files"). ``text`` is marked up:
``\\n_START_ARTICLE_\\n<title>\\n_START_SECTION_\\n<heading>\\n_START_PARAGRAPH_\\n<paragraph>`` with
``_NEWLINE_`` for line breaks inside a paragraph; :func:`wiki40b_plain_text` turns it into plain text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from grape_ds.config import SourceConfig
from grape_ds.data.readers import Document, hub_records, iter_json_records, iter_parquet_rows, missing_field

__all__ = ["iter_corpus", "corpus_files", "wiki40b_plain_text", "CLIMBLAB_ID", "CLIMBLAB_CLUSTERS",
           "SLIMPAJAMA_ID", "SLIMPAJAMA_6B_ID", "SLIMPAJAMA_SETS", "WIKI40B_ID", "WIKI40B_LANGUAGES",
           "GPT2_VOCAB_SIZE", "GPT2_EOT_ID", "TOKEN_ID_CORPORA"]

CLIMBLAB_ID = "nvidia/ClimbLab"
CLIMBLAB_CLUSTERS = tuple(range(1, 21))
SLIMPAJAMA_ID = "cerebras/SlimPajama-627B"
SLIMPAJAMA_6B_ID = "DKYoon/SlimPajama-6B"
SLIMPAJAMA_SETS = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
                   "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange")
WIKI40B_ID = "google/wiki40b"
WIKI40B_LANGUAGES = ("en", "ar", "zh-cn", "zh-tw", "nl", "fr", "de", "it", "ja", "ko", "pl", "pt", "ru",
                     "es", "th", "tr", "bg", "ca", "cs", "da", "el", "et", "fa", "fi", "he", "hi", "hr",
                     "hu", "id", "lt", "lv", "ms", "no", "ro", "sk", "sl", "sr", "sv", "tl", "uk", "vi")
GPT2_VOCAB_SIZE = 50257     # len(GPT-2's tokenizer)
GPT2_EOT_ID = 50256         # GPT-2's <|endoftext|>
TOKEN_ID_CORPORA = ("climblab",)  # corpora stored as GPT-2 token ids

_DEFAULT_IDS = {"climblab": CLIMBLAB_ID, "slimpajama": SLIMPAJAMA_ID, "wiki40b": WIKI40B_ID}
_SPLITS = {"climblab": ("train",), "slimpajama": ("train", "validation", "test"),
           "wiki40b": ("train", "validation", "test")}
_JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz")
_WIKI40B_MARKERS = frozenset({"_START_ARTICLE_", "_START_SECTION_", "_START_PARAGRAPH_"})


def iter_corpus(src: SourceConfig) -> Iterator[Document]:
    """Stream the documents of one domain of a public corpus.

    Args:
        src: ``type`` ``climblab`` (yields ``list[int]`` of GPT-2 ids), ``slimpajama`` or ``wiki40b``
            (yield ``str``); ``subset`` picks the domain, ``split`` the split, ``path`` a local copy.

    Raises:
        ValueError: an unknown subset or split (the message names the valid ones), ``hub_config`` set
            (the subset selects the data), or a record without the expected column (the message names
            the columns there are).
        FileNotFoundError: ``path`` holds no files for the subset and split (the message gives the layout).
        RuntimeError: no ``path`` and the hub copy cannot be loaded (e.g. offline).
    """
    readers = {"climblab": _iter_climblab, "slimpajama": _iter_slimpajama, "wiki40b": _iter_wiki40b}
    _check_source(src)
    return readers[src.type](src)


def corpus_files(src: SourceConfig) -> list[Path]:
    """The files of the local copy that :func:`iter_corpus` reads for ``src`` (empty without ``path``).

    Raises:
        ValueError, FileNotFoundError: as :func:`iter_corpus`.
    """
    _check_source(src)
    if not src.path:
        return []
    finders = {"climblab": _climblab_files, "slimpajama": _slimpajama_files, "wiki40b": _wiki40b_files}
    return finders[src.type](src)


def wiki40b_plain_text(markup: str) -> str:
    """A Wiki40B article as plain text: the title, then each section heading and each paragraph, as
    blocks separated by a blank line; ``_NEWLINE_`` inside a paragraph becomes a line break."""
    blocks = [line.replace("_NEWLINE_", "\n") for line in markup.split("\n")
              if line.strip() and line.strip() not in _WIKI40B_MARKERS]
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------

def _check_source(src: SourceConfig) -> None:
    if src.type not in _SPLITS:
        raise ValueError(f"unknown corpus type {src.type!r}; choose from {sorted(_SPLITS)}")
    if src.hub_config is not None:
        raise ValueError(f"{src.type} source: hub_config is not used ({src.hub_config!r}); the subset "
                         "selects the domain (ClimbLab cluster, SlimPajama set name, Wiki40B language)")
    if src.split not in _SPLITS[src.type]:
        raise ValueError(f"{src.type} source: unknown split {src.split!r}; the splits are "
                         f"{list(_SPLITS[src.type])}")
    _SUBSET_CHECKS[src.type](src)  # raises for an unknown cluster / set name / language


def _local_root(src: SourceConfig) -> Path:
    root = Path(src.path or "")
    if not root.is_dir():
        raise FileNotFoundError(f"{src.type} source: path {root} is not a folder (a local copy of the "
                                "hub repo, in its layout)")
    return root


def _missing_files(src: SourceConfig, looked_in: Path, layout: str, present: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{src.type} source: no files for subset {src.subset!r}, split {src.split!r} in {looked_in}. A local "
        f"copy keeps the hub repo's layout: {layout}. The copy holds: {present or 'nothing'}")


def _hub_advice(src: SourceConfig, include: str, layout: str) -> str:
    hub_id = src.hub_id or _DEFAULT_IDS[src.type]
    return (f"No local copy was given (source.path is not set). To read one, download the files, e.g. "
            f"`hf download {hub_id} --repo-type dataset --include '{include}' --local-dir <folder>`, and set "
            f"path: <folder>; the layout is {layout}.")


def _check_column(record: dict, column: str, where: str) -> None:
    if column not in record:
        raise missing_field(column, where, list(record), hint="")


# ----------------------------------------------------------------------------------------------
# ClimbLab
# ----------------------------------------------------------------------------------------------

_CLIMBLAB_LAYOUT = "<path>/cluster_<k>/cluster_<k>_<nnn>.tokenized.parquet with a 'tokens' column (GPT-2 ids)"


def _climblab_cluster(src: SourceConfig) -> int:
    """The cluster id from ``subset``: ``3`` or ``cluster_3``."""
    text = str(src.subset).removeprefix("cluster_")
    if not text.isdigit() or int(text) not in CLIMBLAB_CLUSTERS:
        raise ValueError(f"climblab source: unknown cluster {src.subset!r}; the clusters are "
                         f"{CLIMBLAB_CLUSTERS[0]} to {CLIMBLAB_CLUSTERS[-1]} (write 3 or cluster_3)")
    return int(text)


def _climblab_files(src: SourceConfig) -> list[Path]:
    root = _local_root(src)
    folder = root / f"cluster_{_climblab_cluster(src)}"
    files = sorted(p.resolve() for p in folder.glob("*.parquet"))
    if not files:
        present = sorted(p.name for p in root.glob("cluster_*") if p.is_dir())
        raise _missing_files(src, folder, _CLIMBLAB_LAYOUT, present)
    return files


def _iter_climblab(src: SourceConfig) -> Iterator[list[int]]:
    cluster = _climblab_cluster(src)
    if src.path:
        import pyarrow as pa
        import pyarrow.parquet as pq
        for path in _climblab_files(src):
            schema = pq.ParquetFile(path).schema_arrow  # a missing column is named by iter_parquet_rows
            kind = schema.field("tokens").type if "tokens" in schema.names else None
            if kind is not None and not ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                                         and pa.types.is_integer(kind.value_type)):
                raise ValueError(f"{path}: column 'tokens' is {kind}, not a list of integer token ids")
            for number, row in enumerate(iter_parquet_rows(path, ["tokens"])):
                tokens = row["tokens"]
                if tokens is None or None in tokens:
                    raise ValueError(f"{path}, row {number}: 'tokens' is null or holds a null, not a list of "
                                     "integer token ids")
                yield tokens
        return
    advice = _hub_advice(src, f"cluster_{cluster}/*", _CLIMBLAB_LAYOUT)
    hub_id = src.hub_id or CLIMBLAB_ID
    for number, record in enumerate(hub_records(hub_id, None, src.split, src.revision,
                                                data_dir=f"cluster_{cluster}", advice=advice)):
        if number == 0:
            _check_column(record, "tokens", f"{hub_id} cluster_{cluster}")
        yield record["tokens"]


# ----------------------------------------------------------------------------------------------
# SlimPajama
# ----------------------------------------------------------------------------------------------

_SLIMPAJAMA_LAYOUT = ("<path>/<split>/chunk<i>/example_<train|holdout>_<j>.jsonl.zst (SlimPajama-627B) or "
                      "<path>/data/<split>-<nnnnn>-of-<nnnnn>-<hash>.parquet (SlimPajama-6B), records "
                      "{'text', 'meta': {'redpajama_set_name'}}")


def _subset(src: SourceConfig, known, what: str, listed: str) -> str:
    """``src.subset`` when it is one of ``known``; else a ValueError naming ``what`` it is and listing them."""
    if src.subset not in known:
        raise ValueError(f"{src.type} source: unknown {what} {src.subset!r}; the {listed} are {list(known)}")
    return str(src.subset)


def _slimpajama_set(src: SourceConfig) -> str:
    return _subset(src, SLIMPAJAMA_SETS, "set name", "redpajama_set_name values")


def _slimpajama_files(src: SourceConfig) -> list[Path]:
    """JSON lines under ``<path>/<split>/`` (627B layout), else ``<path>/data/<split>-*.parquet`` (6B)."""
    root = _local_root(src)
    jsonl = [p for p in (root / src.split).rglob("*") if p.is_file() and p.name.endswith(_JSONL_SUFFIXES)]
    parquet = list((root / "data").glob(f"{src.split}-*.parquet"))
    files = sorted(p.resolve() for p in (jsonl or parquet))
    if not files:
        present = sorted(p.relative_to(root).as_posix() for p in root.glob("*") if p.name != ".cache")
        raise _missing_files(src, root, _SLIMPAJAMA_LAYOUT, present)
    return files


def _slimpajama_records(src: SourceConfig) -> Iterator[tuple[dict, str]]:
    """(record, where) pairs of the split, from the local copy or the hub."""
    if src.path:
        for path in _slimpajama_files(src):
            rows = (iter_parquet_rows(path, ["text", "meta"]) if path.name.endswith(".parquet")
                    else iter_json_records(path))
            for row in rows:
                yield row, str(path)
        return
    hub_id = src.hub_id or SLIMPAJAMA_ID
    include = f"{src.split}/*" if hub_id == SLIMPAJAMA_ID else f"data/{src.split}-*"
    advice = _hub_advice(src, include, _SLIMPAJAMA_LAYOUT)
    for record in hub_records(hub_id, None, src.split, src.revision, advice=advice):
        yield record, hub_id


def _iter_slimpajama(src: SourceConfig) -> Iterator[str]:
    wanted = _slimpajama_set(src)
    for record, where in _slimpajama_records(src):
        _check_column(record, "text", where)
        _check_column(record, "meta", where)
        meta = record["meta"]
        if not isinstance(meta, dict) or "redpajama_set_name" not in meta:
            raise ValueError(f"{where}: 'meta' is {meta!r}; SlimPajama records carry "
                             "{'meta': {'redpajama_set_name': ...}}")
        if meta["redpajama_set_name"] == wanted:
            yield record["text"]


# ----------------------------------------------------------------------------------------------
# Wiki40B
# ----------------------------------------------------------------------------------------------

_WIKI40B_LAYOUT = "<path>/<language>/<split>-<nnnnn>-of-<nnnnn>.parquet with columns wikidata_id, text, version_id"


def _wiki40b_language(src: SourceConfig) -> str:
    return _subset(src, WIKI40B_LANGUAGES, "language", "languages")


def _wiki40b_files(src: SourceConfig) -> list[Path]:
    root = _local_root(src)
    folder = root / _wiki40b_language(src)
    files = sorted(p.resolve() for p in folder.glob(f"{src.split}-*.parquet"))
    if not files:
        present = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.parquet"))
        raise _missing_files(src, folder, _WIKI40B_LAYOUT, present)
    return files


def _iter_wiki40b(src: SourceConfig) -> Iterator[str]:
    language = _wiki40b_language(src)
    if src.path:
        for path in _wiki40b_files(src):
            for row in iter_parquet_rows(path, ["text"]):
                yield wiki40b_plain_text(row["text"])
        return
    hub_id = src.hub_id or WIKI40B_ID
    advice = _hub_advice(src, f"{language}/{src.split}-*", _WIKI40B_LAYOUT)
    for number, record in enumerate(hub_records(hub_id, language, src.split, src.revision, advice=advice)):
        if number == 0:
            _check_column(record, "text", f"{hub_id} ({language})")
        yield wiki40b_plain_text(record["text"])


_SUBSET_CHECKS = {"climblab": _climblab_cluster, "slimpajama": _slimpajama_set, "wiki40b": _wiki40b_language}
