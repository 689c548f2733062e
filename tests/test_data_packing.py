"""Packing: text round-trips through the windows, splits and caps are right, windows stack into
batches, folders are reused by content hash, and non-zero local ranks wait for local rank 0."""

import json
import logging
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

from grape_ds.config import DataConfig, SourceConfig, TokenizerConfig, UnitConfig
from grape_ds.data import PackedData, packing, prepare_data
from grape_ds.data.tokenizer import EOT_TOKEN, train_bpe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for _ in range(n)]
    docs[0] = "ünïcode ✓ " + docs[0]  # multi-byte characters survive the byte-level round trip
    return docs


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def unit(name, path, type_="jsonl", field="text"):
    return UnitConfig(name=name, source=SourceConfig(type=type_, path=str(path), field=field))


@pytest.fixture
def corpus(tmp_path):
    """Two domains and one task as JSONL files; returns (DataConfig, {unit: docs})."""
    docs = {"web": make_docs(0, 120), "code": make_docs(1, 90), "qa": make_docs(2, 60)}
    paths = {name: write_jsonl(tmp_path / f"{name}.jsonl", d) for name, d in docs.items()}
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=32, val_fraction=0.1,
                     tokenizer=TokenizerConfig(vocab_size=300),
                     domains=[unit("web", paths["web"]), unit("code", paths["code"])],
                     tasks=[unit("qa", paths["qa"])])
    return cfg, docs


def test_windows_round_trip_the_text(corpus):
    cfg, docs = corpus
    data = prepare_data(cfg)
    tok = data.load_tokenizer()
    assert data.domains == ["web", "code"] and data.tasks == ["qa"]
    assert data.eot_id == tok.convert_tokens_to_ids(EOT_TOKEN) and data.vocab_size == len(tok)
    for name, unit_docs in docs.items():
        train, val = data.windows(name, "train"), data.windows(name, "val")  # [n, seq_len] each
        assert train.dtype == np.uint16 and train.shape[1] == val.shape[1] == cfg.seq_len
        ids = np.concatenate([train, val]).reshape(-1)  # [n_windows * seq_len]
        joined = "".join(d + EOT_TOKEN for d in unit_docs)
        decoded = tok.decode(ids.tolist())
        assert joined.startswith(decoded)
        # Only the remainder (< seq_len tokens) of the whole token stream was dropped.
        entry = data.manifest["units"][name]
        assert entry["tokens"] == len(tok(joined, add_special_tokens=False)["input_ids"])
        assert 0 <= entry["tokens"] - ids.size == entry["tokens"] - entry["packed_tokens"] < cfg.seq_len
        # The end-of-text token follows every packed document: one per document boundary.
        assert int((ids == data.eot_id).sum()) == decoded.count(EOT_TOKEN) >= len(unit_docs) - 3


def test_split_counts_manifest_and_files(corpus):
    cfg, docs = corpus
    data = prepare_data(cfg)
    m = data.manifest
    assert m["content_hash"] == data.content_hash == data.root.name
    assert m["seq_len"] == 32 and m["dtype"] == "uint16" and m["tokenizer_dir"] == "tokenizer"
    for name in data.units:
        entry = m["units"][name]
        n = entry["tokens"] // cfg.seq_len
        assert data.num_windows(name, "val") == max(1, math.ceil(0.1 * n)) == entry["val_windows"]
        assert data.num_windows(name, "train") == n - entry["val_windows"]
        assert entry["documents"] == len(docs[name])
        assert entry["kind"] == ("task" if name == "qa" else "domain")
        assert entry["source"]["files"][0][0].endswith(f"{name}.jsonl")
        size = os.path.getsize(data.root / entry["files"]["train"])
        assert size == data.num_windows(name, "train") * cfg.seq_len * 2
    assert data.windows("web", "train") is data.windows("web", "train"), "opened once, cached"
    with pytest.raises(ValueError):
        data.windows("web", "train")[0, 0] = 1  # read-only
    with pytest.raises(KeyError, match="web"):
        data.windows("nope", "train")
    with pytest.raises(ValueError, match="train"):
        data.num_windows("web", "test")


def test_batch_stacks_windows_of_one_unit_or_one_unit_per_row(corpus):
    cfg, _ = corpus
    data = prepare_data(cfg)
    web, code = data.windows("web", "train"), data.windows("code", "train")
    x = data.batch("web", [2, 0, 2])  # one unit for every row
    assert x.dtype == torch.int64 and x.device.type == "cpu" and x.shape == (3, cfg.seq_len)
    assert np.array_equal(x.numpy(), web[[2, 0, 2]])
    mixed = data.batch(["code", "web"], np.array([1, 3]))  # one unit per row
    assert np.array_equal(mixed.numpy(), np.stack([code[1], web[3]]))
    val = data.batch("qa", [data.num_windows("qa", "val") - 1], split="val")
    assert np.array_equal(val.numpy(), data.windows("qa", "val")[-1:])
    assert data.batch("web", []).shape == (0, cfg.seq_len)
    with pytest.raises(ValueError, match="2 unit names for 3 windows"):
        data.batch(["web", "code"], [0, 1, 2])
    with pytest.raises(IndexError, match="window -1 of unit 'web'"):
        data.batch("web", [-1])
    with pytest.raises(IndexError, match=f"it has {len(web)} windows"):
        data.batch("web", [len(web)])
    with pytest.raises(KeyError, match="nope"):
        data.batch("nope", [0])
    with pytest.raises(ValueError, match="test"):
        data.batch("web", [0], split="test")


def test_reuse_does_not_retokenise(corpus, monkeypatch):
    cfg, _ = corpus
    first = prepare_data(cfg)

    def fail(*args, **kwargs):
        raise AssertionError("packed data should have been reused")

    monkeypatch.setattr(packing, "_pack_unit", fail)
    monkeypatch.setattr(packing, "load_or_train_tokenizer", fail)
    again = prepare_data(cfg)
    assert again.root == first.root and again.manifest == first.manifest


def test_new_hash_on_seq_len_or_source_change(corpus, tmp_path):
    cfg, docs = corpus
    base = prepare_data(cfg).content_hash
    cfg.seq_len = 16
    assert prepare_data(cfg).content_hash != base
    cfg.seq_len = 32
    assert prepare_data(cfg).content_hash == base
    write_jsonl(tmp_path / "qa.jsonl", docs["qa"][:-1])
    changed = prepare_data(cfg)
    assert changed.content_hash != base and changed.manifest["units"]["qa"]["documents"] == 59
    # The BPE's training text changed, so it was trained again, under a new fingerprint.
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_token_cap(corpus):
    cfg, _ = corpus
    cfg.max_tokens_per_domain = 200
    data = prepare_data(cfg)
    for name in data.units:
        entry = data.manifest["units"][name]
        assert entry["tokens"] == 200 and entry["packed_tokens"] == 192  # 6 windows of 32
        assert data.num_windows(name, "train") == 5 and data.num_windows(name, "val") == 1
        assert entry["documents"] < 60


def test_unit_too_small_is_an_error(corpus, tmp_path):
    cfg, _ = corpus
    cfg.tasks = [unit("tiny", write_jsonl(tmp_path / "tiny.jsonl", ["alpha beta gamma"]))]
    with pytest.raises(ValueError, match=r"unit 'tiny' \(task\) has \d+ tokens.*seq_len=32"):
        prepare_data(cfg)
    leftovers = list((tmp_path / "cache" / "packed").iterdir())
    assert leftovers == [], f"a failed build leaves nothing behind: {leftovers}"


def test_duplicate_unit_names_are_an_error(corpus):
    cfg, _ = corpus
    cfg.tasks = [unit("web", cfg.domains[0].source.path)]
    with pytest.raises(ValueError, match="'web' is used twice"):
        prepare_data(cfg)


def test_a_waiting_rank_has_no_fixed_timeout_and_gives_up_only_when_nobody_prepares(corpus, monkeypatch, caplog):
    cfg, _ = corpus
    monkeypatch.setattr(packing, "WAIT_POLL_S", 0.02)
    monkeypatch.setattr(packing, "WAIT_GRACE_S", 0.3)
    monkeypatch.setattr(packing, "WAIT_LOG_EVERY_S", 0.1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"local rank 1 waited for .*no process is preparing it.*grape-ds prepare"):
        prepare_data(cfg, local_rank=1)
    assert 0.3 <= time.monotonic() - start < 5
    # While local rank 0 prepares (slowly: it holds the lock for longer than the grace), local rank 1
    # waits, saying every WAIT_LOG_EVERY_S who prepares, then opens the same folder.
    monkeypatch.setenv(packing.SHARD_DELAY_ENV, "0.2")
    builder = threading.Timer(0.1, prepare_data, args=(cfg,))
    builder.start()
    try:
        with caplog.at_level(logging.INFO, logger="grape_ds.data.packing"):
            waited = prepare_data(cfg, local_rank=1)
    finally:
        builder.join()
    assert waited.num_windows("web", "train") > 0 and (waited.root / "manifest.json").is_file()
    assert time.monotonic() - start > 0.3 + 0.6  # it outwaited the grace: 3+ shards of 0.2 s
    assert f"still waiting for {waited.root}" in caplog.text and f"process id {os.getpid()}" in caplog.text


def test_pretokenised_ids_pass_through(tmp_path):
    """Pre-tokenised documents (e.g. ClimbLab's GPT-2 ids) are packed as they are, EOT appended."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    named = train_bpe(iter(make_docs(3, 50)), 300)
    named.save_pretrained(str(tmp_path / "tok"))
    eot = named.eos_token_id
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 250, size=int(rng.integers(10, 30))).tolist() for _ in range(40)]
    docs[1].append(eot)  # an already terminated document does not get a second EOT
    pq.write_table(pa.table({"ids": docs}), tmp_path / "ids.parquet")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=16,
                     tokenizer=TokenizerConfig(name=str(tmp_path / "tok")),
                     domains=[unit("climb", tmp_path / "ids.parquet", "parquet", "ids")])
    data = prepare_data(cfg)
    stream = [t for d in docs for t in (d if d[-1] == eot else d + [eot])]
    ids = np.concatenate([data.windows("climb", "train"), data.windows("climb", "val")]).reshape(-1)
    assert ids.tolist() == stream[:len(ids)]
    # Without a named tokenizer the ids would be meaningless: that is an error.
    cfg.tokenizer = TokenizerConfig(vocab_size=300)
    with pytest.raises(ValueError, match="pre-tokenised.*tokenizer.name"):
        prepare_data(cfg)


def test_packed_folder_reopens(corpus):
    cfg, _ = corpus
    data = prepare_data(cfg)
    again = PackedData.open(data.root)
    assert again.content_hash == data.content_hash
    assert np.array_equal(again.windows("qa", "val"), data.windows("qa", "val"))
