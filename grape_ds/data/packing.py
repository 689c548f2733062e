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
once and reused until any of those change.

Preparing (``grape-ds prepare``, or a training job's local rank 0 for a small experiment): one process
at a time, under the lock ``<cache_dir>/packed/.<hash>.prepare/run.lock``, so on a shared file system
one preparation serves every node; everyone else waits for the manifest (:func:`wait_for_packed`: no
fixed timeout, a line a minute, and an error only once no live process holds the lock). The work
goes on in ``.<hash>.partial/``: each unit is cut into shards of ``shard_docs`` documents in stream
order, tokenised by ``num_proc`` processes (at most two shards each in flight: bounded memory), each
shard's ids written to its own file with a ``.json`` record once complete; the shards are then joined
into the unit's files. A restart keeps every complete shard and unit (their documents are read past,
not tokenised again; ``.<hash>.prepare/shards.jsonl`` logs which process tokenised which shard), and
the folder is renamed into place when every unit is done: the result is byte-identical whatever the
shard size, the number of processes or the restarts. Bad data (an error that names a file and line)
removes the partial work, since fixing the data changes the hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grape_ds.config import CORPUS_TYPES, DataConfig, SourceConfig
from grape_ds.data import corpora, planted
from grape_ds.data.readers import Document, check_text
from grape_ds.data.sources import iter_documents, source_files
from grape_ds.data.tokenizer import MAX_TRAIN_CHARS, load_or_train_tokenizer
from grape_ds.lockfile import LockBusy, LockFile, live_holder

__all__ = ["prepare_data", "wait_for_packed", "prepare_lock_dir", "PackedData", "FORMAT_VERSION", "MANIFEST",
           "SPLITS", "SHARD_DOCS"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1          # bump when the packed layout or the packing rule changes
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
TOKENIZE_BATCH_DOCS = 512   # documents per batch-encode call
SHARD_DOCS = 8 * TOKENIZE_BATCH_DOCS  # documents per shard: the unit of parallel work and of resuming
PACK_IN_PLACE_MAX_BYTES = 1 << 30     # larger experiments are prepared beforehand (`grape-ds prepare`)
PARTIAL_META = "partial.json"         # in .<hash>.partial/: what the shards there were cut with
SHARD_JOURNAL = "shards.jsonl"        # in .<hash>.prepare/: one line per shard tokenised
# seconds to sleep after each shard: the tests make a preparation slow with it (never needed otherwise)
SHARD_DELAY_ENV = "GRAPE_DS_PREPARE_SHARD_DELAY_S"
_COPY_CHUNK_TOKENS = 1 << 22


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

    def batch(self, units: str | Sequence[str], windows: Sequence[int] | np.ndarray,
              split: str = "train") -> torch.Tensor:
        """Windows stacked into one batch: int64 ``[len(windows), seq_len]``, on the host.

        Args:
            units: the unit every row comes from (one name), or one unit name per row.
            windows: ``[rows]`` window indices, row ``i`` window ``windows[i]`` of its unit in ``split``.
            split: ``train`` or ``val``.

        Raises:
            KeyError: an unknown unit.
            ValueError: an unknown split, or ``units`` a sequence of another length than ``windows``.
            IndexError: a window index outside ``[0, num_windows(unit, split))``.
        """
        names = [units] * len(windows) if isinstance(units, str) else list(units)
        if len(names) != len(windows):
            raise ValueError(f"{len(names)} unit names for {len(windows)} windows: give one name, or one per row")
        rows = []
        for name, index in zip(names, windows):
            w = self.windows(name, split)
            if not 0 <= index < len(w):
                raise IndexError(f"window {index} of unit {name!r} ({split}): it has {len(w)} windows")
            rows.append(w[index])
        x = np.stack(rows) if rows else np.empty((0, self.seq_len), dtype=np.int64)
        return torch.from_numpy(x.astype(np.int64))

    def load_tokenizer(self):
        """The tokenizer the windows were made with (a ``PreTrainedTokenizerFast``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def prepare_data(cfg: DataConfig, local_rank: int = 0, num_proc: int = 1,
                 in_place_max_bytes: int | None = PACK_IN_PLACE_MAX_BYTES,
                 shard_docs: int = SHARD_DOCS) -> PackedData:
    """Pack the configured units (or reuse the packed folder when it exists), and open it.

    One process prepares a folder at a time, under a lock next to it (``.<hash>.prepare/run.lock``):
    on a shared file system one preparation serves every node. Any other process waits for the
    folder's ``manifest.json`` with no fixed timeout, logging once a minute, and gives up only when no
    live process holds the lock (:func:`wait_for_packed`). Preparation is resumable: it works in
    ``.<hash>.partial/``, unit by unit and shard by shard (:data:`SHARD_DOCS` documents), and a
    restart keeps every shard and unit that was fully written (:func:`_pack_unit`).

    Args:
        cfg: the data section: units (``domains``/``tasks`` or ``planted``), tokenizer, ``seq_len``,
            ``val_fraction``, ``max_tokens_per_domain`` (a per-unit cap) and ``cache_dir``.
        local_rank: the process's rank on its node; local rank 0 may prepare, the others wait.
        num_proc: tokenising processes (``grape-ds prepare --num-proc``); 1 tokenises in this process.
        in_place_max_bytes: the largest experiment (bytes of local source files) a training job may
            pack itself; a larger one, or one that streams from the hub, must be prepared beforehand
            with ``grape-ds prepare``. None: no limit (``grape-ds prepare`` itself).
        shard_docs: documents per shard, the unit of parallel work and of resuming (the packed
            result does not depend on it; a restart with another value starts the partial work over).

    Returns:
        The opened packed folder.

    Raises:
        ValueError: the units are misconfigured, a unit has fewer than 2 windows, a record is bad
            (named by file and line or row), or the experiment is too large to pack in place.
        RuntimeError: this process waited for a preparation whose process is gone.
    """
    units = _units(cfg)
    cache_dir = Path(cfg.cache_dir).resolve()
    identity = _identity(cfg, units)
    digest = _hash(identity)[:16]
    root = cache_dir / "packed" / digest
    if (root / MANIFEST).is_file():
        log.info("reusing packed data %s", root)
    elif local_rank == 0:
        if in_place_max_bytes is not None:
            _check_small_enough(identity, in_place_max_bytes, root)
        _build_locked(cfg, units, identity, digest, root, cache_dir, num_proc, shard_docs)
    else:
        wait_for_packed(root, f"local rank {local_rank}")
    return PackedData.open(root)


def prepare_lock_dir(root: Path) -> Path:
    """The folder whose ``run.lock`` the preparing process holds (beside the packed folder)."""
    return root.parent / f".{root.name}.prepare"


def _check_small_enough(identity: dict, limit: int, root: Path) -> None:
    """A training job packs only small experiments itself (the demo, tests); the rest is prepared
    ahead with ``grape-ds prepare`` (one job, in parallel, resumable)."""
    hub = [u["name"] for u in identity["units"] if u["source"].get("type") == "hub"
           or (u["source"].get("type") in CORPUS_TYPES and not u["source"].get("path"))]
    size = sum(f[1] for u in identity["units"] for f in u["source"].get("files", []))
    if hub or size > limit:
        why = (f"units {hub} stream from the hub" if hub else
               f"its sources hold {size / 2**20:.0f} MiB, more than a training job packs itself "
               f"({limit / 2**20:.0f} MiB)")
        raise ValueError(f"the data of this experiment is not prepared ({root} does not exist) and {why}: "
                         "run `grape-ds prepare <config> [--set ...] [--num-proc N]` first (or "
                         "launchers/slurm_prepare.sbatch), with the same data settings")


WAIT_POLL_S = 0.5         # how often a waiting process looks for the manifest
WAIT_LOG_EVERY_S = 60.0   # a "still waiting" line this often
WAIT_GRACE_S = 120.0      # time for the preparing process to start and take its lock


def wait_for_packed(root: Path, who: str) -> None:
    """Wait until ``root/manifest.json`` exists. No fixed timeout: a line is logged every
    :data:`WAIT_LOG_EVERY_S` naming who prepares it, and this gives up only when no live process holds
    the preparation lock, :data:`WAIT_GRACE_S` after the wait began.

    Raises:
        RuntimeError: nobody is preparing ``root`` any more and it is not complete.
    """
    poll_s, log_every_s, grace_s = WAIT_POLL_S, WAIT_LOG_EVERY_S, WAIT_GRACE_S
    lock_dir = prepare_lock_dir(root)
    start = last = time.monotonic()
    log.info("%s: waiting for %s to be prepared", who, root)
    while not (root / MANIFEST).is_file():
        holder = live_holder(lock_dir)
        now = time.monotonic()
        if holder is None and now - start > grace_s and not (root / MANIFEST).is_file():
            raise RuntimeError(
                f"{who} waited for {root}, but no process is preparing it (the preparing process is gone; "
                f"see its log). Run `grape-ds prepare <config>` with the same data settings, then launch again.")
        if now - last >= log_every_s:
            last = now
            by = (f"host {holder.get('host')}, process id {holder.get('pid')}" if holder else "nobody yet")
            log.info("%s: still waiting for %s (%.0f s so far; prepared by %s)", who, root, now - start, by)
        time.sleep(poll_s)


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

def _file_stem(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a unit name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "unit"
    candidate, i = stem, 1
    while candidate.lower() in taken:
        candidate, i = f"{stem}_{i}", i + 1
    taken.add(candidate.lower())
    return candidate


def _build_locked(cfg: DataConfig, units: list[_Unit], identity: dict, digest: str, root: Path,
                  cache_dir: Path, num_proc: int, shard_docs: int) -> None:
    """Prepare ``root`` under its lock, or wait for the process that holds it."""
    try:
        lock = LockFile.acquire(prepare_lock_dir(root))
    except LockBusy:  # another node's local rank 0, or a `grape-ds prepare` job
        wait_for_packed(root, f"process {os.getpid()}")
        return
    except OSError as exc:
        raise OSError(f"data.cache_dir {root.parent.parent}: cannot lock {prepare_lock_dir(root)} to prepare "
                      f"the data there ({exc.strerror or exc}); set data.cache_dir to a folder you can write") from None
    try:
        if not (root / MANIFEST).is_file():
            _build(cfg, units, identity, digest, root, cache_dir, num_proc, shard_docs)
    except ValueError:
        # bad data: fixing it changes the content hash, so nothing of this attempt can be reused
        shutil.rmtree(root.parent / f".{digest}.partial", ignore_errors=True)
        lock.release()
        shutil.rmtree(prepare_lock_dir(root), ignore_errors=True)
        raise
    finally:
        lock.release()


def _build(cfg: DataConfig, units: list[_Unit], identity: dict, digest: str, root: Path,
           cache_dir: Path, num_proc: int = 1, shard_docs: int = SHARD_DOCS) -> None:
    """Pack every unit into ``.<digest>.partial/`` beside ``root`` (kept across restarts: units and
    shards already written are not redone), then rename it into place. Call under the lock."""
    if root.exists():
        raise RuntimeError(f"{root} exists but has no {MANIFEST}: it is not a folder grape-ds finished "
                           "writing. Delete it and run again.")
    partial = root.parent / f".{digest}.partial"
    meta = {"format_version": FORMAT_VERSION, "content_hash": digest, "shard_docs": shard_docs}
    if partial.exists() and _read_json(partial / PARTIAL_META) != meta:
        shutil.rmtree(partial)  # another shard size or format: nothing in it can be reused
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / PARTIAL_META, meta)
    log.info("packing %d units into %s", len(units), root)
    corpus = planted.generate(cfg.planted) if cfg.planted is not None else None

    def documents(unit: _Unit) -> Iterator[Document]:
        return iter(corpus[unit.name]) if corpus is not None else _named(unit, iter_documents(unit.source))

    tok_id = identity["tokenizer"]
    fingerprint = f"bpe{tok_id.get('bpe_vocab_size')}-{tok_id.get('training_text')}"
    _check_gpt2_id_units(units, cfg.tokenizer.name)
    tokenizer, eot_id = load_or_train_tokenizer(
        cfg.tokenizer, lambda: _bpe_training_texts(units, documents), cache_dir, fingerprint)
    if not (partial / "tokenizer").is_dir():
        tmp_tok = partial / f".tokenizer-{uuid.uuid4().hex[:8]}"
        tokenizer.save_pretrained(str(tmp_tok))
        os.rename(tmp_tok, partial / "tokenizer")
    vocab_size = len(tokenizer)
    _check_gpt2_id_units(units, cfg.tokenizer.name, (vocab_size, eot_id))
    dtype = np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    coder = _Coder(str(partial / "tokenizer"), eot_id, vocab_size, cfg.tokenizer.name is not None, dtype.name)
    entries: dict[str, dict] = {}
    taken: set[str] = set()
    journal = prepare_lock_dir(root) / SHARD_JOURNAL
    with _Tokenisers(coder, num_proc) as pool:
        for unit, spec in zip(units, identity["units"]):
            stem = _file_stem(unit.name, taken)
            done = partial / f"{stem}.done.json"
            if done.is_file():
                entries[unit.name] = _read_json(done)
                log.info("unit %s was packed before this start: kept", unit.name)
            else:
                entry = _pack_unit(unit, documents(unit), pool, dtype, cfg, partial, stem, journal, shard_docs)
                entries[unit.name] = {**entry, "source": spec["source"]}
                _write_json(done, entries[unit.name])
            for path in partial.glob(f"{glob.escape(stem)}.shard[0-9][0-9][0-9][0-9][0-9][0-9].*"):
                path.unlink()  # joined into the unit's files (a restart may find some left)
    manifest = {
        "format_version": FORMAT_VERSION, "content_hash": digest, "seq_len": cfg.seq_len,
        "vocab_size": vocab_size, "eot_id": eot_id, "dtype": dtype.name,
        "tokenizer_dir": "tokenizer", "tokenizer": identity["tokenizer"],
        "val_fraction": cfg.val_fraction, "max_tokens_per_unit": cfg.max_tokens_per_domain,
        "planted": identity["planted"],
        "domains": [u.name for u in units if u.kind == "domain"],
        "tasks": [u.name for u in units if u.kind == "task"],
        "units": entries,
    }
    for path in [partial / PARTIAL_META, *partial.glob("*.done.json")]:  # bookkeeping of the build only
        path.unlink()
    for path in partial.glob(".*"):  # temporary files of writes an earlier, killed start left behind
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _write_json(partial / MANIFEST, manifest)
    os.rename(partial, root)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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


@dataclass(frozen=True)
class _Coder:
    """What a tokenising process needs to rebuild the encoder (picklable)."""
    tokenizer_dir: str
    eot_id: int
    vocab_size: int
    allow_ids: bool
    dtype: str

    def build(self) -> _Encode:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.tokenizer_dir)
        return _encoder(tokenizer, self.eot_id, self.vocab_size, self.allow_ids)


_WORKER_ENCODE: _Encode | None = None


def _worker_init(coder: _Coder) -> None:
    global _WORKER_ENCODE
    _WORKER_ENCODE = coder.build()


def _encode_shard(docs: list[Document], unit: str, path: str, dtype: str) -> list[int]:
    """In a tokenising process: encode one shard, write its ids to ``path`` (atomically), and return
    the documents' lengths (EOT included)."""
    ids, lengths = _WORKER_ENCODE(docs, unit)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(ids.astype(dtype).tobytes())
    os.replace(tmp, path)
    return lengths.tolist()


class _Tokenisers:
    """``num_proc`` tokenising processes (spawned; each loads the tokenizer once), or this process
    when ``num_proc <= 1``. ``submit(docs, unit, path)`` returns a future of the lengths."""

    def __init__(self, coder: _Coder, num_proc: int) -> None:
        self.coder, self.num_proc, self.pool, self.encode = coder, num_proc, None, None

    def __enter__(self) -> "_Tokenisers":
        if self.num_proc > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(self.num_proc, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(self.coder,))
        else:
            self.encode = self.coder.build()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _closable(docs: Iterator[Document]) -> Iterator[Document]:
    """``docs`` as a generator, so that stopping early (at the token cap) closes the files it reads."""
    yield from docs


def _shard_path(folder: Path, stem: str, k: int) -> Path:
    return folder / f"{stem}.shard{k:06d}.bin"


def _pack_unit(unit: _Unit, docs: Iterator[Document], pool: _Tokenisers, dtype: np.dtype, cfg: DataConfig,
               folder: Path, stem: str, journal: Path, shard_docs: int = SHARD_DOCS) -> dict:
    """Tokenise one unit shard by shard (``shard_docs`` documents each, in stream order) into
    ``<stem>.shard<k>.bin`` files, each with a ``.json`` record written once the shard is complete;
    then join them into ``<stem>.train.bin`` and move the last windows to ``<stem>.val.bin``.

    A restart keeps the complete shards: their documents are read past, not tokenised again, and
    every shard tokenised is logged to ``journal`` (``{"unit", "shard", "tokens", "pid"}`` lines). The
    token cap ends the unit inside the shard that reaches it. The result does not depend on the shard
    size, the number of processes or the restarts: the same stream is cut into the same windows.
    """
    seq_len, cap = cfg.seq_len, cfg.max_tokens_per_domain
    done: list[dict] = []  # the complete shards, in order
    while (record := _read_json(_shard_path(folder, stem, len(done)).with_suffix(".json"))) is not None:
        done.append(record)
    n_tokens = sum(r["tokens"] for r in done)
    capped = any(r.get("capped") for r in done)
    if done:
        log.info("unit %s: %d shard(s) (%d tokens) were packed before this start: kept, not tokenised again",
                 unit.name, len(done), n_tokens)
    with contextlib.closing(_closable(docs)) as stream, \
            tqdm(total=cap, initial=n_tokens, unit="tok", unit_scale=True, desc=f"packing {unit.name}") as bar:
        if not capped:
            read_before = sum(r["docs_read"] for r in done)
            skipped = sum(1 for _ in itertools.islice(stream, read_before))
            if skipped != read_before:
                raise RuntimeError(f"unit {unit.name!r}: its source now holds fewer documents than the "
                                   f"shards packed before this start ({skipped}); delete {folder} and prepare again")
            delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
            left = (lambda: cap - n_tokens) if cap is not None else (lambda: None)
            for k, batch in enumerate(_run_shards(stream, shard_docs, left, pool, unit, folder, stem, dtype,
                                                  first=len(done)), start=len(done)):
                docs_read, lengths = batch
                tokens = int(sum(lengths))
                record = {"docs_read": docs_read, "tokens": tokens, "docs": len(lengths)}
                if cap is not None and n_tokens + tokens >= cap:  # the cap falls in this shard
                    keep = cap - n_tokens
                    starts = np.cumsum(lengths) - np.asarray(lengths)
                    record.update(tokens=keep, docs=int((starts < keep).sum()), capped=True)
                    os.truncate(_shard_path(folder, stem, k), keep * dtype.itemsize)
                _write_json(_shard_path(folder, stem, k).with_suffix(".json"), record)
                with journal.open("a") as f:
                    f.write(json.dumps({"unit": unit.name, "shard": k, "tokens": record["tokens"],
                                        "pid": os.getpid()}) + "\n")
                done.append(record)
                n_tokens += record["tokens"]
                bar.update(record["tokens"])
                if record.get("capped"):
                    break
                time.sleep(delay)
    return _join_shards(unit, folder, stem, dtype, done, seq_len, cfg.val_fraction)


def _run_shards(stream: Iterator[Document], shard_docs: int, left: Callable[[], int | None], pool: _Tokenisers,
                unit: _Unit, folder: Path, stem: str, dtype: np.dtype, first: int) -> Iterator[tuple[int, list[int]]]:
    """Cut ``stream`` into shards of ``shard_docs`` documents and tokenise them in order; yields
    ``(documents read, lengths)`` per shard once its file is written. In this process: batch by batch,
    and a shard ends early once it holds the ``left()`` tokens the cap still allows, so a capped unit
    reads no further. With tokenising processes: at most ``2 x num_proc`` shards in flight. ``first``:
    the index of the first shard to write (those before it are complete)."""
    if pool.pool is None:
        for k in itertools.count(first):
            path, lengths, read, budget = _shard_path(folder, stem, k), [], 0, left()
            with open(f"{path}.tmp", "wb") as f:
                while read < shard_docs and (budget is None or sum(lengths) < budget):
                    batch = list(itertools.islice(stream, min(TOKENIZE_BATCH_DOCS, shard_docs - read)))
                    if not batch:
                        break
                    ids, lens = pool.encode(batch, unit.name)
                    f.write(ids.astype(dtype).tobytes())
                    lengths += lens.tolist()
                    read += len(batch)
            if not read:
                os.unlink(f"{path}.tmp")
                return
            os.replace(f"{path}.tmp", path)
            yield read, lengths
    from collections import deque
    window: deque = deque()  # (k, documents, future), in order
    try:
        for k in itertools.count(first):
            shard = list(itertools.islice(stream, shard_docs))
            if not shard:
                break
            window.append((k, len(shard), pool.pool.submit(_encode_shard, shard, unit.name,
                                                           str(_shard_path(folder, stem, k)), dtype.name)))
            if len(window) >= 2 * pool.num_proc:
                _, n, future = window.popleft()
                yield n, future.result()
        while window:
            _, n, future = window.popleft()
            yield n, future.result()
    finally:  # stopped early (the cap, an error): no shard file may appear after this returns
        for k, _, future in window:
            if not future.cancel():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - its error, if any, is not the one being raised
                    pass
            _shard_path(folder, stem, k).unlink(missing_ok=True)


def _join_shards(unit: _Unit, folder: Path, stem: str, dtype: np.dtype, shards: list[dict], seq_len: int,
                 val_fraction: float) -> dict:
    """Join the shard files into ``<stem>.train.bin`` / ``<stem>.val.bin`` (the caller removes them
    once the unit is recorded as done)."""
    n_tokens = sum(r["tokens"] for r in shards)
    n_windows = n_tokens // seq_len
    if n_windows < 2:
        raise ValueError(
            f"unit {unit.name!r} ({unit.kind}) has {n_tokens} tokens, fewer than 2 windows of "
            f"seq_len={seq_len} (one to train on, one to validate); give it more text or lower data.seq_len")
    n_val = max(1, math.ceil(val_fraction * n_windows))
    n_train = n_windows - n_val
    assert n_train >= 1, "val_fraction <= 0.5 leaves at least one training window"
    train_path, val_path = folder / f"{stem}.train.bin", folder / f"{stem}.val.bin"
    bounds = [(0, n_train * seq_len, train_path), (n_train * seq_len, n_windows * seq_len, val_path)]
    out, written, split = None, 0, 0
    try:
        for k, record in enumerate(shards):
            tokens = np.memmap(_shard_path(folder, stem, k), mode="r", dtype=dtype, shape=(record["tokens"],)) \
                if record["tokens"] else np.zeros(0, dtype)
            pos = 0
            while pos < len(tokens) and split < len(bounds):
                lo, hi, path = bounds[split]
                if out is None:
                    out = open(f"{path}.tmp", "wb")
                take = min(len(tokens) - pos, hi - written)
                for start in range(pos, pos + take, _COPY_CHUNK_TOKENS):
                    out.write(np.asarray(tokens[start:min(start + _COPY_CHUNK_TOKENS, pos + take)]).tobytes())
                pos, written = pos + take, written + take
                if written == hi:
                    out.close()
                    out = None
                    os.replace(f"{path}.tmp", path)
                    split += 1
            del tokens
    finally:
        if out is not None:
            out.close()
    n_docs = sum(r["docs"] for r in shards)
    return {"kind": unit.kind, "files": {"train": train_path.name, "val": val_path.name},
            "train_windows": n_train, "val_windows": n_val, "tokens": n_tokens,
            "packed_tokens": n_windows * seq_len, "documents": n_docs}
