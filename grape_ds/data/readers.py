"""Record readers, shared by every source type: files (JSON lines, JSON, plain text, Parquet; ``.gz``
and ``.zst`` compressed) read as records, one at a time, and one split of a hub data set streamed.

A leaf of the data package: :mod:`~grape_ds.data.sources` (the generic source types and the type
table), :mod:`~grape_ds.data.corpora` and :mod:`~grape_ds.data.benchmarks` read through it, and it
imports none of them. :func:`check_text` and :func:`check_value` are the checks every document passes
(text that UTF-8 can encode, or a list of token ids); :func:`missing_field` is the one error for a
record without the field asked for.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

__all__ = ["Document", "ZSTD", "open_text", "iter_json_records", "numbered_json_records", "iter_parquet_rows",
           "check_text", "check_value", "missing_field", "hub_records"]

Document = str | list[int]  # text, or the token ids of a pre-tokenised document

try:  # optional: .jsonl.zst support
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the environment
    _zstd = None

ZSTD = _zstd is not None  # whether .zst files can be read here
_HUB_PROBE_TIMEOUT_S = 3.0


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_text(path: Path) -> Iterator[IO[str]]:
    """Open a possibly compressed (.gz, .zst) file as UTF-8 text.

    Raises:
        ValueError: a ``.zst`` file without the ``zstandard`` package.
    """
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


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

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


def check_value(value: Any, field: str, where: str) -> Document:
    """``value`` (field ``field`` of the record at ``where``) as a document: text that UTF-8 can
    encode (see :func:`check_text`), or a list of ints (pre-tokenised ids), returned unchanged.

    Raises:
        ValueError: anything else, or text :func:`check_text` refuses; the message names ``where``,
            ``field`` and what the value holds.
    """
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
