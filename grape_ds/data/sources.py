"""Where documents come from: JSONL, plain text, Parquet, ``save_to_disk`` folders, the HF hub, the
public corpora (ClimbLab, SlimPajama, Wiki40B: :mod:`~grape_ds.data.corpora`) and the target
benchmarks (:mod:`~grape_ds.data.benchmarks`).

:func:`iter_documents` streams one source's documents, one at a time, never loading a whole corpus
into memory. A document is either text (``str``) or, for pre-tokenised corpora such as ClimbLab (GPT-2
ids), a ``list[int]`` of token ids that is passed through unchanged. :func:`source_files` lists the
files a local source reads, so that packed data can be keyed on their paths, sizes and mtimes.

Both look the source's type up in a table, :data:`DOCUMENT_READERS` and :data:`FILE_LISTERS`: the
generic types are read here, the corpora and benchmarks by their own modules. Records are read by
:mod:`~grape_ds.data.readers`, which all of them share.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from pathlib import Path

from grape_ds.config import CORPUS_TYPES, SourceConfig
from grape_ds.data import benchmarks, corpora
from grape_ds.data.readers import (ZSTD, Document, check_value, hub_records, iter_parquet_rows, missing_field,
                                   numbered_json_records, open_text)

__all__ = ["iter_documents", "source_files", "DOCUMENT_READERS", "FILE_LISTERS", "SUFFIXES"]

# File suffixes a folder or glob of each source type is filtered by.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".jsonl.gz") + ((".jsonl.zst",) if ZSTD else ()),
    "text": (".txt", ".txt.gz"),
    "parquet": (".parquet",),
}


def iter_documents(src: SourceConfig) -> Iterator[Document]:
    """Stream the documents of one source.

    Args:
        src: the source: ``type`` is one of ``jsonl``, ``text``, ``parquet``, ``disk``, ``hub``, a
            corpus (``climblab``, ``slimpajama``, ``wiki40b``: one domain of it, chosen by
            ``subset``) or ``benchmark`` (the LM text, question and gold answer, of ``src.split``).

    Yields:
        Each document: a string, or a list of token ids for pre-tokenised data.

    Raises:
        ValueError: the field/column ``src.field`` is missing (the message names the file and the
            fields that exist), a value is neither text nor a list of ints, the type is unknown, or a
            corpus subset / benchmark split does not exist (the message names the valid ones).
        FileNotFoundError: the path matches no file.
        RuntimeError: a hub data set cannot be loaded (e.g. offline, or it does not exist).
    """
    return _lookup(DOCUMENT_READERS, src)(src)


def source_files(src: SourceConfig) -> list[Path]:
    """The files a local source reads, sorted (for ``disk``: every file of the saved folder).

    For a ``hub`` source this is empty unless ``hub_id`` names a local folder or file; for a corpus or
    benchmark it is the files of the local copy it reads (empty when it is read from the hub).

    Raises:
        ValueError: the type is unknown, or a file source has no path.
        FileNotFoundError: the path matches no file.
    """
    return _lookup(FILE_LISTERS, src)(src)


def _lookup(table: dict[str, Callable], src: SourceConfig) -> Callable:
    if src.type not in table:
        raise ValueError(f"unknown source type {src.type!r}; choose from {sorted(table)}")
    return table[src.type]


# ----------------------------------------------------------------------------------------------
# Files of the generic types
# ----------------------------------------------------------------------------------------------

def _path(src: SourceConfig) -> str:
    if not src.path:
        raise ValueError(f"a {src.type} source needs a path")
    return src.path


def _matched_files(src: SourceConfig) -> list[Path]:
    """A file (any name), a folder (searched recursively) or a glob, filtered by the type's
    :data:`SUFFIXES`."""
    path, suffixes, kind = _path(src), SUFFIXES[src.type], src.type
    if any(ch in path for ch in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
        files = [p for p in found if p.is_file()]
    elif Path(path).is_dir():
        files = [p for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(suffixes)]
    elif Path(path).is_file():
        return [Path(path).resolve()]
    else:
        raise FileNotFoundError(f"{kind} source: no such file or folder: {path}")
    if not files:
        raise FileNotFoundError(
            f"{kind} source: {path} matches no file (looked for names ending in {', '.join(suffixes)})")
    return sorted(p.resolve() for p in files)


def _disk_files(src: SourceConfig) -> list[Path]:
    root = Path(_path(src))
    if not root.is_dir():
        raise FileNotFoundError(f"disk source: {root} is not a folder written by save_to_disk")
    return sorted(p.resolve() for p in root.rglob("*") if p.is_file())


def _hub_files(src: SourceConfig) -> list[Path]:
    local = Path(src.hub_id or "")
    if src.hub_id and local.exists():
        return sorted(p.resolve() for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
    return []


# ----------------------------------------------------------------------------------------------
# Documents of the generic types
# ----------------------------------------------------------------------------------------------

def _iter_jsonl(src: SourceConfig) -> Iterator[Document]:
    for path in _matched_files(src):
        for line, record in numbered_json_records(path):
            where = f"{path}:{line}"
            if src.field not in record:
                raise missing_field(src.field, where, list(record))
            yield check_value(record[src.field], src.field, where)


def _iter_text(src: SourceConfig) -> Iterator[Document]:
    """Plain text: documents are separated by one or more blank lines."""
    for path in _matched_files(src):
        try:
            yield from _text_documents(path)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _text_documents(path: Path) -> Iterator[str]:
    with open_text(path) as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


def _iter_parquet(src: SourceConfig) -> Iterator[Document]:
    for path in _matched_files(src):
        for index, row in enumerate(iter_parquet_rows(path, [src.field])):
            yield check_value(row[src.field], src.field, f"{path} (row {index})")


def _iter_disk(src: SourceConfig) -> Iterator[Document]:
    import datasets

    path = Path(src.path or "")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"disk source: {path} is not a folder written by save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise ValueError(f"disk source {path}: no split {src.split!r}; the splits are {sorted(ds)}")
        ds = ds[src.split]
    if src.field not in ds.column_names:
        raise missing_field(src.field, str(path), ds.column_names)
    index = 0
    for batch in ds.select_columns([src.field]).iter(batch_size=1000):
        for value in batch[src.field]:
            yield check_value(value, src.field, f"{path} (row {index})")
            index += 1


_HUB_SOURCE_ADVICE = ("Without network access, provide a local copy instead: save it with datasets' "
                      "save_to_disk and use 'type: disk, path: <folder>', or export it to files and use "
                      "'type: jsonl' / 'type: parquet' with a 'path'.")


def _iter_hub(src: SourceConfig) -> Iterator[Document]:
    if not src.hub_id:
        raise ValueError("a hub source needs a hub_id")
    for number, record in enumerate(hub_records(src.hub_id, src.hub_config, src.split, src.revision,
                                                advice=_HUB_SOURCE_ADVICE)):
        where = f"hub data set {src.hub_id!r}, split {src.split!r} (row {number})"
        if src.field not in record:  # every row: a data set can change its columns part-way
            raise missing_field(src.field, where, list(record))
        yield check_value(record[src.field], src.field, where)


# ----------------------------------------------------------------------------------------------
# The tables: source type -> what reads it
# ----------------------------------------------------------------------------------------------

#: source type -> the function streaming a source's documents (see :func:`iter_documents`).
DOCUMENT_READERS: dict[str, Callable[[SourceConfig], Iterator[Document]]] = {
    "jsonl": _iter_jsonl, "text": _iter_text, "parquet": _iter_parquet, "disk": _iter_disk, "hub": _iter_hub,
    "benchmark": benchmarks.iter_lm_texts, **dict.fromkeys(CORPUS_TYPES, corpora.iter_corpus)}
#: source type -> the function listing the files a source reads (see :func:`source_files`).
FILE_LISTERS: dict[str, Callable[[SourceConfig], list[Path]]] = {
    "jsonl": _matched_files, "text": _matched_files, "parquet": _matched_files, "disk": _disk_files,
    "hub": _hub_files, "benchmark": benchmarks.benchmark_files, **dict.fromkeys(CORPUS_TYPES, corpora.corpus_files)}
