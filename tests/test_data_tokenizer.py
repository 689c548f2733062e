"""Tokenizer: a BPE trained once per fingerprint, cached, reloadable by transformers; named tokenizers."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from grape_ds.config import TokenizerConfig
from grape_ds.data import tokenizer as tok_mod
from grape_ds.data.tokenizer import EOT_TOKEN, load_or_train_tokenizer, train_bpe

TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
         "ünïcode ✓ and digits 0123456789"] * 20


def corpus():
    return iter(TEXTS)


def never_called():
    raise AssertionError("the cached tokenizer should have been reused, not retrained")


def test_bpe_is_trained_cached_and_reused(tmp_path):
    tokenizer, eot = load_or_train_tokenizer(TokenizerConfig(vocab_size=300), corpus, tmp_path, "fp1")
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == EOT_TOKEN
    assert eot == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    assert 259 <= len(tokenizer) <= 300
    folder = tmp_path / "tokenizers" / "fp1"
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    again, eot2 = load_or_train_tokenizer(TokenizerConfig(vocab_size=300), never_called, tmp_path, "fp1")
    assert eot2 == eot and again.get_vocab() == tokenizer.get_vocab()


def test_cached_bpe_loads_with_autotokenizer_and_round_trips(tmp_path):
    tokenizer, eot = load_or_train_tokenizer(TokenizerConfig(vocab_size=300), corpus, tmp_path, "fp")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizers" / "fp"))
    text = "  the lazy  fox ✓\n\nnew paragraph . ,"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.eos_token_id == eot and len(loaded) == len(tokenizer)


def test_training_text_is_capped():
    seen = []

    def texts():
        for t in ["a" * 40, "b" * 40, "c" * 40]:
            seen.append(t)
            yield t

    assert list(tok_mod._capped(texts(), 50)) == ["a" * 40, "b" * 10]
    assert len(seen) == 2, "text beyond the cap is not even read"
    assert len(train_bpe(iter(TEXTS), 280, max_chars=100)) <= 280


def test_named_tokenizer_from_local_folder(tmp_path):
    bpe = train_bpe(iter(TEXTS), 300)
    bpe.save_pretrained(str(tmp_path / "mytok"))
    tokenizer, eot = load_or_train_tokenizer(TokenizerConfig(name=str(tmp_path / "mytok")), never_called,
                                             tmp_path / "cache", "unused")
    assert eot == tokenizer.eos_token_id and len(tokenizer) == len(bpe)
    assert not (tmp_path / "cache").exists(), "a named tokenizer is not cached again"


def test_named_tokenizer_without_eos_is_an_error(tmp_path):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=train_bpe(iter(TEXTS), 300).backend_tokenizer)
    no_eos.save_pretrained(str(tmp_path / "noeos"))
    with pytest.raises(ValueError, match="no eos token"):
        load_or_train_tokenizer(TokenizerConfig(name=str(tmp_path / "noeos")), never_called, tmp_path, "x")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_or_train_tokenizer(TokenizerConfig(name=str(tmp_path / "missing")), never_called, tmp_path, "x")
