"""Packed data: every unit's documents tokenised, joined and cut into memory-mapped windows.

A *unit* is a source domain or a target task. For each unit, :func:`prepare_data` tokenises the
documents in batches, appends the end-of-text token to every document (it is trained on: nothing is
masked), concatenates them, cuts the stream into non-overlapping ``seq_len`` windows (dropping the
remainder) and holds out the last windows for validation. Pre-tokenised documents (lists of ids)
are packed as they are, which needs ``data.tokenizer.name`` to be the tokenizer that made them; one
that already ends with the end-of-text token gets no second one. Empty documents are skipped. The
result lives in

    <cache_dir>/packed/<content_hash>/
        manifest.json                 what is in the folder (written last: its presence = complete)
        tokenizer/                    save_pretrained folder of the tokenizer used
        <unit>.train.bin, <unit>.val.bin   raw uint16 (uint32 for vocabularies > 65535) token ids

Units of a corpus stored as GPT-2 token ids (ClimbLab) need ``data.tokenizer.name`` to be a GPT-2
tokenizer (vocabulary 50257, end-of-text id 50256); anything else is an error before packing starts.
A unit stops reading its source as soon as the token cap is reached, so a cap on a huge streamed
corpus reads only what it keeps. The local rank that packs shows a progress bar per unit.

The content hash covers the format version, every source (type, resolved path, and every file's
path, size and mtime; hub id/config/split/revision; corpus subset; benchmark name), the planted
config, the tokenizer identity, ``seq_len``, ``val_fraction`` and the token cap, so a folder is built
once and reused until any of those change. Local rank 0 builds it in a temporary sibling folder and
renames it into place; the other local ranks wait for its ``manifest.json``. A build that is killed
can leave a ``.<hash>.tmp-*`` folder behind; it is never read and can be deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from grape_ds.config import CORPUS_TYPES, DataConfig, SourceConfig
from grape_ds.data import corpora, planted
from grape_ds.data.sources import Document, check_text, iter_documents, source_files
from grape_ds.data.tokenizer import MAX_TRAIN_CHARS, load_or_train_tokenizer

__all__ = ["prepare_data", "PackedData", "FORMAT_VERSION", "MANIFEST", "SPLITS"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1          # bump when the packed layout or the packing rule changes
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
TOKENIZE_BATCH_DOCS = 512   # documents per batch-encode call
_COPY_CHUNK_TOKENS = 1 << 22
_POLL_S = 0.25


@dataclass(frozen=True)
class _Unit:
    name: str
    kind: str                    # "domain" or "task"
    source: SourceConfig | None  # None: the planted corpus


# ----------------------------------------------------------------------------------------------
# The packed folder
# ----------------------------------------------------------------------------------------------

@dataclass
class PackedData:
    """A packed folder: per-unit train/validation windows of ``seq_len`` token ids.

    Attributes:
        root: the packed folder.
        content_hash: the folder's name, a hash of everything that determines its content.
        seq_len: tokens per window.
        vocab_size: ``len(tokenizer)``; the model's vocabulary must be at least this large.
        eot_id: the end-of-text token id, appended to every document.
        domains: source domain names, in config order.
        tasks: target task names, in config order.
        tokenizer_dir: ``save_pretrained`` folder of the tokenizer.
        manifest: the parsed ``manifest.json``.
    """

    root: Path
    content_hash: str
    seq_len: int
    vocab_size: int
    eot_id: int
    domains: list[str]
    tasks: list[str]
    tokenizer_dir: Path
    manifest: dict
    _windows: dict[tuple[str, str], np.memmap] = field(default_factory=dict, init=False,
                                                        repr=False, compare=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> PackedData:
        """Open a complete packed folder (one with a ``manifest.json``)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a complete packed folder: {MANIFEST} is missing")
        manifest = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{root}: packed format version {manifest.get('format_version')}, "
                             f"this grape-ds reads version {FORMAT_VERSION}; delete the folder to rebuild it")
        return cls(root=root, content_hash=manifest["content_hash"], seq_len=manifest["seq_len"],
                   vocab_size=manifest["vocab_size"], eot_id=manifest["eot_id"],
                   domains=list(manifest["domains"]), tasks=list(manifest["tasks"]),
                   tokenizer_dir=root / manifest["tokenizer_dir"], manifest=manifest)

    @property
    def units(self) -> list[str]:
        """Domains then tasks."""
        return self.domains + self.tasks

    def _entry(self, unit: str, split: str) -> dict:
        if unit not in self.manifest["units"]:
            raise KeyError(f"unknown unit {unit!r}; the units are {self.units}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
        return self.manifest["units"][unit]

    def num_windows(self, unit: str, split: str) -> int:
        """Number of ``seq_len`` windows of ``unit`` in ``split`` (``train`` or ``val``)."""
        return int(self._entry(unit, split)[f"{split}_windows"])

    def windows(self, unit: str, split: str) -> np.ndarray:
        """The windows of ``unit`` in ``split``: a read-only memmap ``[n_windows, seq_len]``.

        Opened once and cached.
        """
        key = (unit, split)
        if key not in self._windows:
            entry = self._entry(unit, split)
            shape = (entry[f"{split}_windows"], self.seq_len)
            self._windows[key] = np.memmap(self.root / entry["files"][split], mode="r",
                                           dtype=np.dtype(self.manifest["dtype"]), shape=shape)
        return self._windows[key]

    def load_tokenizer(self):
        """The tokenizer the windows were made with (a ``PreTrainedTokenizerFast``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def prepare_data(cfg: DataConfig, local_rank: int = 0, wait_timeout_s: float = 3600) -> PackedData:
    """Pack the configured units (or reuse the packed folder when it exists), and open it.

    Args:
        cfg: the data section: units (``domains``/``tasks`` or ``planted``), tokenizer, ``seq_len``,
            ``val_fraction``, ``max_tokens_per_domain`` (a per-unit cap) and ``cache_dir``.
        local_rank: the process's rank on its node; local rank 0 builds, the others wait for it.
        wait_timeout_s: how long a non-zero local rank waits for local rank 0's ``manifest.json``.

    Returns:
        The opened packed folder.

    Raises:
        ValueError: the units are misconfigured, or a unit has fewer than 2 windows.
        TimeoutError: a non-zero local rank waited ``wait_timeout_s`` without seeing the manifest.
    """
    units = _units(cfg)
    cache_dir = Path(cfg.cache_dir).resolve()
    identity = _identity(cfg, units)
    digest = _hash(identity)[:16]
    root = cache_dir / "packed" / digest
    if (root / MANIFEST).is_file():
        log.info("reusing packed data %s", root)
    elif local_rank == 0:
        _build(cfg, units, identity, digest, root, cache_dir)
    else:
        _wait_for(root / MANIFEST, wait_timeout_s, local_rank)
    return PackedData.open(root)


def _units(cfg: DataConfig) -> list[_Unit]:
    if cfg.planted is not None:
        if cfg.domains or cfg.tasks:
            raise ValueError("data: set either data.planted or data.domains/data.tasks, not both")
        truth = planted.ground_truth(cfg.planted)
        return ([_Unit(d, "domain", None) for d in truth.domains]
                + [_Unit(t, "task", None) for t in truth.tasks])
    if not cfg.domains:
        raise ValueError("data.domains: no source domains (or set data.planted for the built-in corpus)")
    units = ([_Unit(u.name, "domain", u.source) for u in cfg.domains]
             + [_Unit(u.name, "task", u.source) for u in cfg.tasks])
    seen: set[str] = set()
    for unit in units:
        if not unit.name:
            raise ValueError(f"data: a {unit.kind} has no name")
        if unit.name in seen:
            raise ValueError(f"data: unit name {unit.name!r} is used twice; domain and task names "
                             "must all be distinct")
        seen.add(unit.name)
    return units


# ----------------------------------------------------------------------------------------------
# Content identity
# ----------------------------------------------------------------------------------------------

def _file_stats(files: Iterable[Path]) -> list[list[Any]]:
    out = []
    for path in files:
        st = path.stat()
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def _source_spec(src: SourceConfig) -> dict:
    """The resolved source: what it is, where, and the stats of every file it reads."""
    if src.type == "hub":
        spec: dict[str, Any] = {"type": "hub", "hub_id": src.hub_id, "hub_config": src.hub_config,
                                "split": src.split, "revision": src.revision, "field": src.field}
    elif src.type in CORPUS_TYPES or src.type == "benchmark":
        spec = {"type": src.type, "path": os.path.abspath(src.path) if src.path else None,
                "hub_id": src.hub_id, "hub_config": src.hub_config, "split": src.split,
                "revision": src.revision, "subset": src.subset, "benchmark": src.benchmark}
    else:
        spec = {"type": src.type, "path": os.path.abspath(src.path or ""), "field": src.field}
        if src.type == "disk":
            spec["split"] = src.split
    spec["files"] = _file_stats(source_files(src))
    return spec


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _identity(cfg: DataConfig, units: list[_Unit]) -> dict:
    """Everything that determines the packed content (hashed into the folder name)."""
    sources = [{"name": u.name, "kind": u.kind,
                "source": _source_spec(u.source) if u.source is not None else {"type": "planted"}}
               for u in units]
    planted_spec = None
    if cfg.planted is not None:
        planted_spec = dataclasses.asdict(cfg.planted) | {"generator_version": planted.GENERATOR_VERSION}
    if cfg.tokenizer.name is not None:
        tokenizer: dict[str, Any] = {"name": cfg.tokenizer.name}
        if Path(cfg.tokenizer.name).is_dir():  # a local folder: its files are its identity
            files = sorted(p for p in Path(cfg.tokenizer.name).rglob("*") if p.is_file())
            tokenizer["files"] = _file_stats(files)
    else:
        text = _hash({"units": sources, "planted": planted_spec, "max_chars": MAX_TRAIN_CHARS})[:16]
        tokenizer = {"bpe_vocab_size": cfg.tokenizer.vocab_size, "training_text": text}
    return {"format_version": FORMAT_VERSION, "units": sources, "planted": planted_spec,
            "tokenizer": tokenizer, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
            "max_tokens_per_unit": cfg.max_tokens_per_domain}


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _wait_for(path: Path, timeout_s: float, local_rank: int) -> None:
    deadline = time.monotonic() + timeout_s
    log.info("local rank %d: waiting for local rank 0 to pack the data (%s)", local_rank, path.parent)
    while not path.is_file():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"local rank {local_rank} waited {timeout_s:g} s for {path}, which local rank 0 writes "
                "when it has packed the data. Did local rank 0 fail (see its log)? For a large corpus, "
                "pack it once beforehand (e.g. a single process) or raise the wait timeout.")
        time.sleep(min(_POLL_S, left))


def _file_stem(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a unit name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "unit"
    candidate, i = stem, 1
    while candidate.lower() in taken:
        candidate, i = f"{stem}_{i}", i + 1
    taken.add(candidate.lower())
    return candidate


def _build(cfg: DataConfig, units: list[_Unit], identity: dict, digest: str, root: Path,
           cache_dir: Path) -> None:
    """Pack every unit into a temporary sibling of ``root``, then rename it into place."""
    if root.exists():
        if (root / MANIFEST).is_file():  # another process renamed its copy into place meanwhile
            return
        raise RuntimeError(f"{root} exists but has no {MANIFEST}: it is not a folder grape-ds finished "
                           "writing. Delete it and run again.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    log.info("packing %d units into %s", len(units), root)
    try:
        corpus = planted.generate(cfg.planted) if cfg.planted is not None else None

        def documents(unit: _Unit) -> Iterator[Document]:
            return iter(corpus[unit.name]) if corpus is not None else _named(unit, iter_documents(unit.source))

        tok_id = identity["tokenizer"]
        fingerprint = f"bpe{tok_id.get('bpe_vocab_size')}-{tok_id.get('training_text')}"
        _check_gpt2_id_units(units, cfg.tokenizer.name)
        tokenizer, eot_id = load_or_train_tokenizer(
            cfg.tokenizer, lambda: _bpe_training_texts(units, documents), cache_dir, fingerprint)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        vocab_size = len(tokenizer)
        _check_gpt2_id_units(units, cfg.tokenizer.name, (vocab_size, eot_id))
        dtype = np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
        encode = _encoder(tokenizer, eot_id, vocab_size, allow_ids=cfg.tokenizer.name is not None)
        entries: dict[str, dict] = {}
        taken: set[str] = set()
        for unit, spec in zip(units, identity["units"]):
            stem = _file_stem(unit.name, taken)
            entries[unit.name] = _pack_unit(unit, documents(unit), encode, dtype, cfg, tmp, stem)
            entries[unit.name]["source"] = spec["source"]
        manifest = {
            "format_version": FORMAT_VERSION, "content_hash": digest, "seq_len": cfg.seq_len,
            "vocab_size": vocab_size, "eot_id": eot_id, "dtype": dtype.name,
            "tokenizer_dir": "tokenizer", "tokenizer": identity["tokenizer"],
            "val_fraction": cfg.val_fraction, "max_tokens_per_unit": cfg.max_tokens_per_domain,
            "planted": identity["planted"],
            "domains": [u.name for u in units if u.kind == "domain"],
            "tasks": [u.name for u in units if u.kind == "task"],
            "units": entries, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            log.info("another process packed %s first; using its copy", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _named(unit: _Unit, docs: Iterator[Document]) -> Iterator[Document]:
    """``docs``, with the unit (domain or task) named in front of any error reading them raises."""
    try:
        yield from docs
    except (ValueError, OSError, RuntimeError) as exc:
        exc.args = (f"{unit.kind} {unit.name!r}: {exc}",)
        raise


def _check_gpt2_id_units(units: list[_Unit], tokenizer_name: str | None,
                         vocab_and_eot: tuple[int, int] | None = None) -> None:
    """Units of a corpus stored as GPT-2 ids (ClimbLab) need a GPT-2 tokenizer: a named one (not a BPE
    trained here) and, once it is loaded, one with GPT-2's vocabulary size and end-of-text id."""
    gpt2 = (corpora.GPT2_VOCAB_SIZE, corpora.GPT2_EOT_ID)
    for unit in units:
        if unit.source is None or unit.source.type not in corpora.TOKEN_ID_CORPORA:
            continue
        advice = ("set data.tokenizer.name to gpt2 (or a local folder holding GPT-2's tokenizer, e.g. one "
                  "written by AutoTokenizer.from_pretrained('gpt2').save_pretrained(<folder>))")
        if tokenizer_name is None:
            raise ValueError(f"unit {unit.name!r} ({unit.source.type}) holds GPT-2 token ids, which are packed "
                             f"as they are, so the tokenizer must be GPT-2's, not a BPE trained here: {advice}")
        if vocab_and_eot is not None and vocab_and_eot != gpt2:
            raise ValueError(
                f"unit {unit.name!r} ({unit.source.type}) holds GPT-2 token ids (vocabulary {gpt2[0]}, "
                f"end-of-text id {gpt2[1]}), but data.tokenizer.name={tokenizer_name!r} has vocabulary "
                f"{vocab_and_eot[0]} and end-of-text id {vocab_and_eot[1]}: {advice}")


def _bpe_training_texts(units: list[_Unit],
                        documents: Callable[[_Unit], Iterator[Document]]) -> Iterator[str]:
    """Training text for the BPE: an equal share of the character budget from every unit."""
    budget = MAX_TRAIN_CHARS // len(units)
    for unit in units:
        used = 0
        for doc in documents(unit):
            if not isinstance(doc, str):
                raise ValueError(
                    f"unit {unit.name!r} holds pre-tokenised documents (lists of token ids): set "
                    "data.tokenizer.name to the tokenizer that made them (e.g. gpt2, or a local copy)")
            check_text(doc, f"unit {unit.name!r}, a document starting {doc[:40]!r}")
            yield doc[:budget - used]
            used += len(doc)
            if used >= budget:
                break


_Encode = Callable[[list[Document], str], tuple[np.ndarray, np.ndarray]]


def _encoder(tokenizer, eot_id: int, vocab_size: int, allow_ids: bool) -> _Encode:
    """A function ``(documents, unit name) -> (ids, lengths)``.

    ``ids`` ([tokens] int64) holds every non-empty document's tokens followed by ``eot_id``;
    ``lengths`` ([documents kept] int64) the length of each, EOT included.
    """
    backend = tokenizer.backend_tokenizer
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode(batch: list[Document], unit: str) -> tuple[np.ndarray, np.ndarray]:
        texts = [d for d in batch if isinstance(d, str)]
        for text in texts:  # any reader (corpus and benchmark adapters too): name the unit, not a raw error
            check_text(text, f"unit {unit!r}, a document starting {text[:40]!r}")
        encoded = iter(encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        flat: list[int] = []
        lengths: list[int] = []
        for doc in batch:
            if isinstance(doc, str):
                ids = next(encoded).ids
            else:
                if not allow_ids:
                    raise ValueError(
                        f"unit {unit!r} holds pre-tokenised documents (lists of token ids): set "
                        "data.tokenizer.name to the tokenizer that made them (e.g. gpt2, or a local copy)")
                ids = doc
                if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                    raise ValueError(
                        f"unit {unit!r}: a pre-tokenised document has token ids in [{min(ids)}, {max(ids)}], "
                        f"outside the tokenizer's vocabulary [0, {vocab_size}); is data.tokenizer.name the "
                        "tokenizer that made them?")
                if ids and ids[-1] == eot_id:  # already terminated: do not double the EOT
                    ids = ids[:-1]
            if not ids:
                continue  # an empty document adds nothing, not even an EOT
            flat.extend(ids)
            flat.append(eot_id)
            lengths.append(len(ids) + 1)
        return np.asarray(flat, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    return encode


def _closable(docs: Iterator[Document]) -> Iterator[Document]:
    """``docs`` as a generator, so that stopping early (at the token cap) closes the files it reads."""
    yield from docs


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pack_unit(unit: _Unit, docs: Iterator[Document], encode: _Encode, dtype: np.dtype, cfg: DataConfig,
               folder: Path, stem: str) -> dict:
    """Tokenise one unit into ``<stem>.train.bin``, then move its last windows to ``<stem>.val.bin``."""
    seq_len, cap = cfg.seq_len, cfg.max_tokens_per_domain
    train_path, val_path = folder / f"{stem}.train.bin", folder / f"{stem}.val.bin"
    n_tokens = n_docs = 0
    with open(train_path, "wb") as f, contextlib.closing(_closable(docs)) as stream, \
            tqdm(total=cap, unit="tok", unit_scale=True, desc=f"packing {unit.name}") as bar:
        for batch in _batches(stream, TOKENIZE_BATCH_DOCS):
            ids, lengths = encode(batch, unit.name)  # [tokens], [docs]
            if cap is not None and n_tokens + len(ids) >= cap:
                keep = cap - n_tokens
                starts = np.cumsum(lengths) - lengths  # [docs] offset of each document
                ids, n_batch_docs = ids[:keep], int((starts < keep).sum())
            else:
                n_batch_docs = len(lengths)
            f.write(ids.astype(dtype).tobytes())
            n_tokens += len(ids)
            n_docs += n_batch_docs
            bar.update(len(ids))
            if cap is not None and n_tokens >= cap:
                break
    n_windows = n_tokens // seq_len
    if n_windows < 2:
        raise ValueError(
            f"unit {unit.name!r} ({unit.kind}) has {n_tokens} tokens, fewer than 2 windows of "
            f"seq_len={seq_len} (one to train on, one to validate); give it more text or lower data.seq_len")
    n_val = max(1, math.ceil(cfg.val_fraction * n_windows))
    n_train = n_windows - n_val
    assert n_train >= 1, "val_fraction <= 0.5 leaves at least one training window"
    tokens = np.memmap(train_path, mode="r", dtype=dtype, shape=(n_tokens,))  # [n_tokens]
    with open(val_path, "wb") as f:
        for start in range(n_train * seq_len, n_windows * seq_len, _COPY_CHUNK_TOKENS):
            stop = min(start + _COPY_CHUNK_TOKENS, n_windows * seq_len)
            f.write(np.asarray(tokens[start:stop]).tobytes())
    del tokens
    os.truncate(train_path, n_train * seq_len * dtype.itemsize)
    return {"kind": unit.kind, "files": {"train": train_path.name, "val": val_path.name},
            "train_windows": n_train, "val_windows": n_val, "tokens": n_tokens,
            "packed_tokens": n_windows * seq_len, "documents": n_docs}
