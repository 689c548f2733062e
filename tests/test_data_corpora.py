"""Corpus adapters on local copies in each corpus's real schema: ClimbLab token ids pass through, a
SlimPajama domain is one redpajama_set_name of .jsonl.zst or Parquet files, a Wiki40B article becomes
plain text; mistakes name the valid choices; offline without a copy fails fast with the layout; and a
mixture of corpus domains and benchmark tasks packs, reading no further than the token cap."""

import time

import numpy as np
import pytest
from common.real_schema import (
    slimpajama_record, wiki40b_markup, write_benchmark, write_climblab,
    write_gpt2_shaped_tokenizer, write_slimpajama_6b, write_slimpajama_627b, write_wiki40b)

from grape_ds.config import DataConfig, SourceConfig, TokenizerConfig, UnitConfig
from grape_ds.data import corpora, packing, prepare_data, readers, sources
from grape_ds.data.corpora import wiki40b_plain_text
from grape_ds.data.sources import iter_documents, source_files
from grape_ds.data.tokenizer import train_bpe

CLUSTER_3 = [[464, 3290, 318, 257, 922, 13], [50256], [15496, 11, 995, 0, 50256], [1, 2, 3, 4, 5, 6, 7]]
CLUSTER_7 = [[40, 588, 19235, 13]]
SLIM_TRAIN = [slimpajama_record("def main():\n    pass", "RedPajamaGithub"),
              slimpajama_record("The weather was mild.", "RedPajamaC4"),
              slimpajama_record("import numpy as np", "RedPajamaGithub"),
              slimpajama_record("Abstract. We study graphs.", "RedPajamaArXiv")]
SLIM_VALIDATION = [slimpajama_record("SELECT * FROM t;", "RedPajamaGithub"),
                   slimpajama_record("A quiet morning.", "RedPajamaC4")]
ARTICLE = wiki40b_markup("Ada Lovelace", [(None, ["Ada Lovelace was a mathematician."]),
                                          ("Early life", ["She was born in London.\nHer father was Byron.",
                                                          "She studied mathematics."])])


def corpus(type_, path=None, subset=None, split="train", **kw):
    return SourceConfig(type=type_, path=str(path) if path else None, subset=subset, split=split, **kw)


# ----------------------------------------------------------------------------------------------
# ClimbLab
# ----------------------------------------------------------------------------------------------

def test_climblab_cluster_yields_gpt2_ids_unchanged(tmp_path):
    root = write_climblab(tmp_path / "ClimbLab", {3: CLUSTER_3, 7: CLUSTER_7})
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet")) == [
        "cluster_3/cluster_3_001.tokenized.parquet", "cluster_3/cluster_3_002.tokenized.parquet",
        "cluster_7/cluster_7_001.tokenized.parquet", "cluster_7/cluster_7_002.tokenized.parquet"]
    for subset in ("3", "cluster_3"):
        docs = list(iter_documents(corpus("climblab", root, subset)))
        assert docs == CLUSTER_3 and all(type(t) is int for d in docs for t in d)
    assert list(iter_documents(corpus("climblab", root, "7"))) == CLUSTER_7
    assert [p.name for p in source_files(corpus("climblab", root, "3"))] == [
        "cluster_3_001.tokenized.parquet", "cluster_3_002.tokenized.parquet"]


def test_climblab_mistakes_name_the_valid_choices(tmp_path):
    root = write_climblab(tmp_path / "ClimbLab", {3: CLUSTER_3})
    with pytest.raises(ValueError, match=r"unknown cluster '21'; the clusters are 1 to 20"):
        list(iter_documents(corpus("climblab", root, "21")))
    with pytest.raises(ValueError, match=r"unknown split 'validation'; the splits are \['train'\]"):
        list(iter_documents(corpus("climblab", root, "3", split="validation")))
    with pytest.raises(FileNotFoundError) as err:
        list(iter_documents(corpus("climblab", root, "5")))
    assert "cluster_5" in str(err.value) and "cluster_<k>_<nnn>.tokenized.parquet" in str(err.value)
    assert "['cluster_3']" in str(err.value)  # what the copy does hold
    with pytest.raises(ValueError, match="hub_config is not used"):
        list(iter_documents(corpus("climblab", root, "3", hub_config="default")))


def test_climblab_without_tokens_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "cluster_2").mkdir()
    pq.write_table(pa.table({"text": ["decoded"], "token_count": [1]}), tmp_path / "cluster_2" / "x.parquet")
    with pytest.raises(ValueError, match=r"no field 'tokens'; the fields present are \['text', 'token_count'\]"):
        list(iter_documents(corpus("climblab", tmp_path, "2")))


# ----------------------------------------------------------------------------------------------
# SlimPajama
# ----------------------------------------------------------------------------------------------

def test_slimpajama_627b_zstd_jsonl_one_set_per_domain(tmp_path):
    root = write_slimpajama_627b(tmp_path / "SlimPajama-627B", {"train": SLIM_TRAIN, "validation": SLIM_VALIDATION})
    train_file = root / "train" / "chunk1" / "example_train_0.jsonl.zst"
    assert train_file.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a real zstd frame
    assert (root / "validation" / "chunk1" / "example_holdout_0.jsonl.zst").is_file()
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaGithub"))) == [
        "def main():\n    pass", "import numpy as np"]
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaArXiv"))) == ["Abstract. We study graphs."]
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaC4", split="validation"))) == ["A quiet morning."]
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaBook"))) == []
    assert source_files(corpus("slimpajama", root, "RedPajamaC4")) == [train_file.resolve()]


def test_slimpajama_6b_parquet_layout(tmp_path):
    root = write_slimpajama_6b(tmp_path / "SlimPajama-6B", {"train": SLIM_TRAIN, "test": SLIM_VALIDATION})
    assert [p.name for p in (root / "data").iterdir()] and all(
        p.name.endswith("-00000-of-00001-9f769cf7ce219017.parquet") for p in (root / "data").iterdir())
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaGithub"))) == [
        "def main():\n    pass", "import numpy as np"]
    assert list(iter_documents(corpus("slimpajama", root, "RedPajamaGithub", split="test"))) == ["SELECT * FROM t;"]


def test_slimpajama_mistakes(tmp_path):
    root = write_slimpajama_627b(tmp_path / "sp", {"train": SLIM_TRAIN})
    with pytest.raises(ValueError) as err:
        list(iter_documents(corpus("slimpajama", root, "CommonCrawl")))
    assert "unknown set name 'CommonCrawl'" in str(err.value)
    assert all(name in str(err.value) for name in corpora.SLIMPAJAMA_SETS) and len(corpora.SLIMPAJAMA_SETS) == 7
    with pytest.raises(FileNotFoundError) as err:
        list(iter_documents(corpus("slimpajama", root, "RedPajamaC4", split="test")))
    assert "example_<train|holdout>_<j>.jsonl.zst" in str(err.value) and "'train'" in str(err.value)
    bad = write_slimpajama_627b(tmp_path / "bad", {"train": [{"text": "x", "meta": {"source": "c4"}}]})
    with pytest.raises(ValueError, match="redpajama_set_name"):
        list(iter_documents(corpus("slimpajama", bad, "RedPajamaC4")))


# ----------------------------------------------------------------------------------------------
# Wiki40B
# ----------------------------------------------------------------------------------------------

def test_wiki40b_markup_becomes_plain_text():
    assert ARTICLE == ("\n_START_ARTICLE_\nAda Lovelace\n_START_PARAGRAPH_\nAda Lovelace was a mathematician.\n"
                       "_START_SECTION_\nEarly life\n_START_PARAGRAPH_\nShe was born in London._NEWLINE_Her father "
                       "was Byron.\n_START_PARAGRAPH_\nShe studied mathematics.\n")
    assert wiki40b_plain_text(ARTICLE) == (
        "Ada Lovelace\n\nAda Lovelace was a mathematician.\n\nEarly life\n\n"
        "She was born in London.\nHer father was Byron.\n\nShe studied mathematics.")


def test_wiki40b_language_domain(tmp_path):
    second = wiki40b_markup("Rome", [(None, ["Rome is a city."])])
    root = write_wiki40b(tmp_path / "wiki40b", "en", {"train": [ARTICLE, second], "test": [second]})
    write_wiki40b(root, "uk", {"train": [wiki40b_markup("Київ", [(None, ["Київ — столиця України."])])]})
    docs = list(iter_documents(corpus("wiki40b", root, "en")))
    assert docs == [wiki40b_plain_text(ARTICLE), "Rome\n\nRome is a city."]
    assert list(iter_documents(corpus("wiki40b", root, "uk"))) == ["Київ\n\nКиїв — столиця України."]
    assert list(iter_documents(corpus("wiki40b", root, "en", split="test"))) == ["Rome\n\nRome is a city."]
    assert [p.relative_to(root.resolve()).as_posix() for p in source_files(corpus("wiki40b", root, "en"))] == [
        "en/train-00000-of-00001.parquet"]
    with pytest.raises(ValueError, match="unknown language 'english'") as err:
        list(iter_documents(corpus("wiki40b", root, "english")))
    assert "'uk'" in str(err.value) and len(corpora.WIKI40B_LANGUAGES) == 41
    with pytest.raises(FileNotFoundError, match="split 'validation'") as err:
        list(iter_documents(corpus("wiki40b", root, "en", split="validation")))
    assert "holds: ['en/test-00000-of-00001.parquet', 'en/train-00000-of-00001.parquet'" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Offline, no local copy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_, subset, expected", [
    ("climblab", "3", ["nvidia/ClimbLab", "data_dir 'cluster_3'", "split 'train'", "--include 'cluster_3/*'",
                       "cluster_<k>/cluster_<k>_<nnn>.tokenized.parquet"]),
    ("slimpajama", "RedPajamaC4", ["cerebras/SlimPajama-627B", "split 'train'", "--include 'train/*'",
                                   "example_<train|holdout>_<j>.jsonl.zst"]),
    ("wiki40b", "en", ["google/wiki40b", "config 'en'", "split 'train'", "--include 'en/train-*'",
                       "<language>/<split>-<nnnnn>-of-<nnnnn>.parquet"]),
])
def test_offline_without_a_copy_fails_fast_and_says_what_to_do(monkeypatch, type_, subset, expected):
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)  # as on a machine without network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        next(iter_documents(corpus(type_, subset=subset)))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "path is not set" in message and "set path: <folder>" in message
    for part in expected:
        assert part in message, (part, message)


# ----------------------------------------------------------------------------------------------
# Packing corpus domains and benchmark tasks
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    return str(write_gpt2_shaped_tokenizer(tmp_path_factory.mktemp("tok") / "gpt2_shaped"))


def unit(name, **source):
    return UnitConfig(name=name, source=SourceConfig(**source))


def test_packing_corpus_domains_and_benchmark_tasks(tmp_path, gpt2_shaped):
    climb = write_climblab(tmp_path / "ClimbLab", {3: [list(range(100 + i, 140 + i)) for i in range(8)]})
    slim = write_slimpajama_627b(tmp_path / "sp", {"train": SLIM_TRAIN * 6})
    wiki = write_wiki40b(tmp_path / "wiki", "en", {"train": [ARTICLE] * 4})
    arc, gsm = write_benchmark("arc_easy", tmp_path / "arc"), write_benchmark("gsm8k", tmp_path / "gsm8k")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=16, val_fraction=0.1,
                     tokenizer=TokenizerConfig(name=gpt2_shaped),
                     domains=[unit("climb_3", type="climblab", path=str(climb), subset="3"),
                              unit("github", type="slimpajama", path=str(slim), subset="RedPajamaGithub"),
                              unit("wiki_en", type="wiki40b", path=str(wiki), subset="en")],
                     tasks=[unit("arc", type="benchmark", path=str(arc), benchmark="arc_easy"),
                            unit("gsm8k", type="benchmark", path=str(gsm), benchmark="gsm8k")])
    data = prepare_data(cfg)
    assert data.domains == ["climb_3", "github", "wiki_en"] and data.tasks == ["arc", "gsm8k"]
    assert data.vocab_size == 50257 and data.eot_id == 50256
    # ClimbLab ids are packed as they are, each document followed by the end-of-text id.
    climb_ids = np.concatenate([data.windows("climb_3", s) for s in ("train", "val")]).reshape(-1)
    expected = np.concatenate([np.r_[range(100 + i, 140 + i), 50256] for i in range(8)])
    assert np.array_equal(climb_ids, expected[:climb_ids.size])
    tok = data.load_tokenizer()
    arc_text = tok.decode(np.concatenate([data.windows("arc", s) for s in ("train", "val")]).reshape(-1).tolist())
    assert arc_text.startswith("Which of these animals is a mammal? whale<|endoftext|>What is 2 plus 2? 4<|endoftext|>")
    source = data.manifest["units"]["climb_3"]["source"]
    assert source["type"] == "climblab" and source["subset"] == "3" and len(source["files"]) == 2
    assert data.manifest["units"]["arc"]["source"]["benchmark"] == "arc_easy"
    # Another subset of the same copy is other content: another packed folder.
    cfg.domains[1] = unit("github", type="slimpajama", path=str(slim), subset="RedPajamaC4")
    assert prepare_data(cfg).content_hash != data.content_hash


def test_packing_stops_reading_a_source_at_the_token_cap(tmp_path, gpt2_shaped, monkeypatch):
    n_docs = 3 * packing.TOKENIZE_BATCH_DOCS
    climb = write_climblab(tmp_path / "ClimbLab", {1: [[7, 8, 9]] * n_docs, 2: [[4, 5]] * 40})
    read = {"docs": 0, "closed": False}  # of cluster 1

    def counting(src):
        if src.subset != "1":
            yield from sources.iter_documents(src)
            return
        try:
            for doc in sources.iter_documents(src):
                read["docs"] += 1
                yield doc
        finally:
            read["closed"] = True

    monkeypatch.setattr(packing, "iter_documents", counting)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=8, val_fraction=0.1, max_tokens_per_domain=64,
                     tokenizer=TokenizerConfig(name=gpt2_shaped),
                     domains=[unit("c1", type="climblab", path=str(climb), subset="1"),
                              unit("c2", type="climblab", path=str(climb), subset="2")])
    data = prepare_data(cfg)
    assert data.manifest["units"]["c1"]["tokens"] == 64
    assert read["docs"] <= packing.TOKENIZE_BATCH_DOCS < n_docs and read["closed"]


def test_climblab_needs_a_gpt2_tokenizer(tmp_path):
    climb = write_climblab(tmp_path / "ClimbLab", {3: CLUSTER_3 * 10})
    domains = [unit("climb_3", type="climblab", path=str(climb), subset="3")]
    with pytest.raises(ValueError, match="tokenizer must be GPT-2's, not a BPE trained here"):
        prepare_data(DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=8, domains=domains))
    small = tmp_path / "small_bpe"
    train_bpe(iter(["some words to learn from"] * 20), vocab_size=300).save_pretrained(str(small))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=8, domains=domains,
                     tokenizer=TokenizerConfig(name=str(small)))
    with pytest.raises(ValueError) as err:
        prepare_data(cfg)
    assert "vocabulary 50257, end-of-text id 50256" in str(err.value) and "gpt2" in str(err.value)
