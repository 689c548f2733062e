"""Where documents come from: JSONL, plain text, Parquet, ``save_to_disk`` folders and the HF hub.

:func:`iter_documents` streams one source's documents, one at a time, never loading a whole corpus
into memory. A document is either text (``str``) or, for pre-tokenised corpora such as ClimbLab (GPT-2
ids), a ``list[int]`` of token ids that is passed through unchanged. :func:`source_files` lists the
files a local source reads, so that packed data can be keyed on their paths, sizes and mtimes.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from grape_ds.config import SourceConfig

__all__ = ["Document", "iter_documents", "source_files", "SUFFIXES"]

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
        src: the source: ``type`` is one of ``jsonl``, ``text``, ``parquet``, ``disk``, ``hub``.

    Yields:
        Each document: a string, or a list of token ids for pre-tokenised data.

    Raises:
        ValueError: the field/column ``src.field`` is missing (the message names the file and the
            fields that exist), a value is neither text nor a list of ints, or the type is unknown.
        FileNotFoundError: the path matches no file.
        RuntimeError: a hub data set cannot be loaded (e.g. offline, or it does not exist).
    """
    readers = {"jsonl": _iter_jsonl, "text": _iter_text, "parquet": _iter_parquet,
               "disk": _iter_disk, "hub": _iter_hub}
    if src.type not in readers:
        raise ValueError(f"unknown source type {src.type!r}; choose from {sorted(readers)}")
    return readers[src.type](src)


def source_files(src: SourceConfig) -> list[Path]:
    """The files a local source reads, sorted (for ``disk``: every file of the saved folder).

    For a ``hub`` source this is empty unless ``hub_id`` names a local folder or file.

    Raises:
        FileNotFoundError: the path matches no file.
    """
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
def _open_text(path: Path) -> Iterator[IO[str]]:
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


def _check_value(value: Any, field: str, where: str) -> Document:
    """A document value must be text, or a list of ints (pre-tokenised ids)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value[:8]):
        return value
    raise ValueError(f"{where}: field {field!r} holds {type(value).__name__}, "
                     "expected text or a list of token ids")


def _missing_field(field: str, where: str, present: list[str]) -> ValueError:
    return ValueError(f"{where}: no field {field!r}; the fields present are {sorted(present)}. "
                      f"Set the source's 'field' to one of them.")


def _iter_jsonl(src: SourceConfig) -> Iterator[Document]:
    for path in source_files(src):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
                if src.field not in record:
                    raise _missing_field(src.field, where, list(record))
                yield _check_value(record[src.field], src.field, where)


def _iter_text(src: SourceConfig) -> Iterator[Document]:
    """Plain text: documents are separated by one or more blank lines."""
    for path in source_files(src):
        with _open_text(path) as f:
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
    import pyarrow.parquet as pq

    for path in source_files(src):
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if src.field not in names:
            raise _missing_field(src.field, str(path), names)
        for group in range(pf.num_row_groups):
            column = pf.read_row_group(group, columns=[src.field]).column(0)
            for value in column.to_pylist():
                yield _check_value(value, src.field, f"{path} (row group {group})")


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
        raise _missing_field(src.field, str(path), ds.column_names)
    for batch in ds.select_columns([src.field]).iter(batch_size=1000):
        for value in batch[src.field]:
            yield _check_value(value, src.field, str(path))


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


def _hub_error(src: SourceConfig, exc: BaseException) -> RuntimeError:
    what = src.hub_id + (f" (config {src.hub_config!r})" if src.hub_config else "")
    return RuntimeError(
        f"hub source: cannot load data set {what}, split {src.split!r}"
        + (f", revision {src.revision!r}" if src.revision else "")
        + f": {type(exc).__name__}: {exc}. Without network access, provide a local copy instead: "
        "save it with datasets' save_to_disk and use 'type: disk, path: <folder>', or export it to "
        "files and use 'type: jsonl' / 'type: parquet' with a 'path'.")


def _iter_hub(src: SourceConfig) -> Iterator[Document]:
    import datasets

    if not src.hub_id:
        raise ValueError("a hub source needs a hub_id")
    is_local = Path(src.hub_id).exists()
    # Offline, huggingface_hub retries for ~25 s before failing; a quick probe avoids that wait
    # while still letting a cached copy load.
    force_offline = not is_local and not datasets.config.HF_HUB_OFFLINE and not _hub_reachable()
    with _offline_mode(force_offline):
        try:
            ds = datasets.load_dataset(src.hub_id, src.hub_config, split=src.split,
                                       revision=src.revision, streaming=True)
            examples = iter(ds)
            first = next(examples, None)
        except Exception as exc:  # noqa: BLE001 - every loader failure gets the same advice
            raise _hub_error(src, exc) from exc
    if first is None:
        return
    if src.field not in first:
        raise _missing_field(src.field, f"hub data set {src.hub_id!r}", list(first))
    yield _check_value(first[src.field], src.field, src.hub_id)
    for example in examples:
        yield _check_value(example[src.field], src.field, src.hub_id)
