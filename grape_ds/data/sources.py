"""Where documents come from: JSONL, plain text, Parquet, ``save_to_disk`` folders, the HF hub, the
public corpora (ClimbLab, SlimPajama, Wiki40B: :mod:`~grape_ds.data.corpora`) and the target
benchmarks (:mod:`~grape_ds.data.benchmarks`).

:func:`iter_documents` streams one source's documents, one at a time, never loading a whole corpus
into memory. A document is either text (``str``) or, for pre-tokenised corpora such as ClimbLab (GPT-2
ids), a ``list[int]`` of token ids that is passed through unchanged. :func:`source_files` lists the
files a local source reads, so that packed data can be keyed on their paths, sizes and mtimes.

The record readers (:func:`iter_parquet_rows`, :func:`iter_json_records`, :func:`open_text`) and
:func:`hub_records` (one split of a hub data set, streamed, failing within seconds when offline) are
shared with the corpus and benchmark adapters.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from grape_ds.config import CORPUS_TYPES, SourceConfig

__all__ = ["Document", "iter_documents", "source_files", "SUFFIXES", "hub_records", "iter_parquet_rows",
           "iter_json_records", "numbered_json_records", "open_text", "missing_field", "check_text"]

Document = str | list[int]

try:  # optional: .jsonl.zst support
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the environment
    _zstd = None

# File suffixes a folder or glob of each source type is filtered by.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".jsonl.gz") + ((".jsonl.zst",) if _zstd else ()),
    "text": (".txt", ".txt.gz"),
    "parquet": (".parquet",),
}
_HUB_PROBE_TIMEOUT_S = 3.0


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
    from grape_ds.data import benchmarks, corpora

    readers = {"jsonl": _iter_jsonl, "text": _iter_text, "parquet": _iter_parquet,
               "disk": _iter_disk, "hub": _iter_hub, "benchmark": benchmarks.iter_lm_texts}
    readers |= dict.fromkeys(CORPUS_TYPES, corpora.iter_corpus)
    if src.type not in readers:
        raise ValueError(f"unknown source type {src.type!r}; choose from {sorted(readers)}")
    return readers[src.type](src)


def source_files(src: SourceConfig) -> list[Path]:
    """The files a local source reads, sorted (for ``disk``: every file of the saved folder).

    For a ``hub`` source this is empty unless ``hub_id`` names a local folder or file; for a corpus or
    benchmark it is the files of the local copy it reads (empty when it is read from the hub).

    Raises:
        FileNotFoundError: the path matches no file.
    """
    from grape_ds.data import benchmarks, corpora

    if src.type in CORPUS_TYPES:
        return corpora.corpus_files(src)
    if src.type == "benchmark":
        return benchmarks.benchmark_files(src)
    if src.type == "hub":
        local = Path(src.hub_id or "")
        if src.hub_id and local.exists():
            return sorted(p.resolve() for p in ([local] if local.is_file() else local.rglob("*"))
                          if p.is_file())
        return []
    if not src.path:
        raise ValueError(f"a {src.type} source needs a path")
    if src.type == "disk":
        root = Path(src.path)
        if not root.is_dir():
            raise FileNotFoundError(f"disk source: {root} is not a folder written by save_to_disk")
        return sorted(p.resolve() for p in root.rglob("*") if p.is_file())
    return _match_files(src.path, SUFFIXES[src.type], src.type)


def _match_files(path: str, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """A file (any name), a folder (searched recursively) or a glob, filtered by ``suffixes``."""
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


@contextlib.contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """Open a possibly compressed (.gz, .zst) file as UTF-8 text."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield f
    elif path.name.endswith(".zst"):
        if _zstd is None:
            raise ValueError(f"{path}: reading .zst files needs the 'zstandard' package "
                             "(pip install zstandard)")
        with open(path, "rb") as raw:
            reader = _zstd.ZstdDecompressor().stream_reader(raw)
            yield io.TextIOWrapper(reader, encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            yield f


def iter_json_records(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, streamed line by
    line), or of a ``.json`` file holding either JSON lines or one array of objects.

    Raises:
        ValueError: a line is not valid JSON or not UTF-8, or a record is not an object (the message
            names the file and line).
    """
    for _, record in numbered_json_records(path):
        yield record


def numbered_json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` of :func:`iter_json_records` (for a JSON array: the 1-based index)."""
    try:
        yield from _numbered_json_records(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _numbered_json_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        if path.name.endswith(".json"):
            text = f.read()
            if text.lstrip().startswith("["):
                yield from _objects(path, enumerate(json.loads(text), 1))
                return
            lines: Iterable[str] = text.splitlines()
        else:
            lines = f
        yield from _objects(path, _parsed_lines(path, lines))


def _parsed_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None


def _objects(path: Path, numbered: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, dict]]:
    for number, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def iter_parquet_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    """The rows of a Parquet file (only ``columns``), read one row group at a time.

    Raises:
        ValueError: a column is missing (the message names the file and the columns it has).
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for column in columns:
        if column not in names:
            raise missing_field(column, str(path), names, hint="")
    for group in range(pf.num_row_groups):
        yield from pf.read_row_group(group, columns=columns).to_pylist()


def check_text(text: str, where: str) -> None:
    """Text must be encodable as UTF-8: no unpaired surrogate such as ``"\\ud800"`` (valid JSON, but
    no text a tokenizer can read).

    Raises:
        ValueError: naming ``where`` and the character.
    """
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: holds text that is not valid Unicode ({exc.reason} at character "
                         f"{exc.start}: {text[max(0, exc.start - 20):exc.start]!r}...); fix or drop the "
                         "record") from None


def _check_value(value: Any, field: str, where: str) -> Document:
    """A document value must be text that UTF-8 can encode (no unpaired surrogate such as
    ``"\\ud800"``, which is valid JSON but no text a tokenizer can read), or a list of ints
    (pre-tokenised ids)."""
    if isinstance(value, str):
        check_text(value, f"{where}: field {field!r}")
        return value
    if isinstance(value, list):
        bad = next((i for i, v in enumerate(value) if not isinstance(v, int) or isinstance(v, bool)), None)
        if bad is None:
            return value
        raise ValueError(f"{where}: field {field!r} is a list of token ids whose item {bad} is "
                         f"{value[bad]!r} ({type(value[bad]).__name__}), not an integer")
    raise ValueError(f"{where}: field {field!r} holds {type(value).__name__}, "
                     "expected text or a list of token ids")


def missing_field(field: str, where: str, present: list[str],
                  hint: str = "Set the source's 'field' to one of them.") -> ValueError:
    """The error for a record or file without ``field``: it names the fields that are there."""
    return ValueError(f"{where}: no field {field!r}; the fields present are {sorted(present)}. {hint}".rstrip())


def _iter_jsonl(src: SourceConfig) -> Iterator[Document]:
    for path in source_files(src):
        for line, record in numbered_json_records(path):
            where = f"{path}:{line}"
            if src.field not in record:
                raise missing_field(src.field, where, list(record))
            yield _check_value(record[src.field], src.field, where)


def _iter_text(src: SourceConfig) -> Iterator[Document]:
    """Plain text: documents are separated by one or more blank lines."""
    for path in source_files(src):
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
    for path in source_files(src):
        for index, row in enumerate(iter_parquet_rows(path, [src.field])):
            yield _check_value(row[src.field], src.field, f"{path} (row {index})")


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
            yield _check_value(value, src.field, f"{path} (row {index})")
            index += 1


# ----------------------------------------------------------------------------------------------
# The hub
# ----------------------------------------------------------------------------------------------

def _hub_reachable() -> bool:
    """Whether the hub endpoint answers a TCP connection within a few seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily put ``datasets``/``huggingface_hub`` in offline mode (cached copies still load)."""
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    from huggingface_hub import constants

    saved = ds_config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    ds_config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def hub_records(hub_id: str, config: str | None, split: str, revision: str | None, *,
                data_dir: str | None = None, advice: str) -> Iterator[dict]:
    """Stream the records of one split of a data set on the hub (or in the local hub cache).

    Without network access this fails within seconds instead of retrying for half a minute: a quick
    probe of the hub endpoint puts ``datasets`` in offline mode, where only a cached copy loads.

    Args:
        hub_id: the data set's id (or a local folder ``datasets.load_dataset`` reads).
        config: its config name, or None.
        split: the split to stream.
        revision: a git revision, or None for the default branch.
        data_dir: a folder inside the repo to read instead of the whole repo (e.g. one ClimbLab cluster).
        advice: what the user can do instead (how to provide a local copy); ends the error message.

    Yields:
        Each record (a dict from column name to value), in the data set's order.

    Raises:
        RuntimeError: the data set cannot be loaded; the message names the id, config, data_dir, split
            and revision that were looked for, the loader's error, and ``advice``.
    """
    import datasets

    is_local = Path(hub_id).exists()
    # Offline, huggingface_hub retries for ~25 s before failing; a quick probe avoids that wait
    # while still letting a cached copy load.
    force_offline = not is_local and not datasets.config.HF_HUB_OFFLINE and not _hub_reachable()
    with _offline_mode(force_offline):
        try:
            ds = datasets.load_dataset(hub_id, config, data_dir=data_dir, split=split,
                                       revision=revision, streaming=True)
            examples = iter(ds)
            first = next(examples, None)
        except Exception as exc:  # noqa: BLE001 - every loader failure gets the same advice
            where = hub_id + "".join(f", {k} {v!r}" for k, v in
                                     (("config", config), ("data_dir", data_dir)) if v)
            raise RuntimeError(
                f"cannot load data set {where}, split {split!r}"
                + (f", revision {revision!r}" if revision else "")
                + f" from the hub ({type(exc).__name__}: {exc}). {advice}") from exc
    if first is None:
        return
    yield first
    yield from examples


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
        yield _check_value(record[src.field], src.field, where)
