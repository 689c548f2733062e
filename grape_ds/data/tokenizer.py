"""The tokenizer: a Hugging Face tokenizer by name or path, or a byte-level BPE trained on the corpus.

A trained BPE is cached under ``<cache_dir>/tokenizers/<fingerprint>/`` (a ``save_pretrained``
folder, loadable with ``transformers.AutoTokenizer.from_pretrained``) and reused whenever the same
fingerprint (vocabulary size and training text) comes again. Its end-of-text token
``<|endoftext|>`` doubles as BOS, UNK and PAD, as in GPT-2. The vocabulary size a model must use is
``len(tokenizer)``, which can be below the requested size when the corpus has few distinct strings.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from grape_ds.config import TokenizerConfig

__all__ = ["load_or_train_tokenizer", "load_named", "train_bpe", "EOT_TOKEN", "MAX_TRAIN_CHARS"]

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
MAX_TRAIN_CHARS = 20_000_000  # text used to train a BPE is capped, so a huge corpus does not stall


def load_or_train_tokenizer(tok_cfg: TokenizerConfig, train_texts: Callable[[], Iterator[str]],
                            cache_dir: Path, fingerprint: str) -> tuple[PreTrainedTokenizerFast, int]:
    """Load the configured tokenizer, or train (once) and cache a byte-level BPE.

    Args:
        tok_cfg: ``name`` (a HF tokenizer name or local folder) or, when null, the BPE's ``vocab_size``.
        train_texts: returns a fresh iterator over training text; only called when a BPE is trained.
        cache_dir: root of the cache; a trained BPE goes to ``cache_dir/tokenizers/<fingerprint>/``.
        fingerprint: identifies the BPE's vocabulary size and training text (a file-name-safe string).

    Returns:
        The fast tokenizer and its end-of-text token id.

    Raises:
        ValueError: the named tokenizer is not a fast tokenizer or has no end-of-text (eos) token.
    """
    if tok_cfg.name is not None:
        return load_named(tok_cfg.name)
    folder = Path(cache_dir) / "tokenizers" / fingerprint
    if (folder / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    else:
        tokenizer = train_bpe(train_texts(), tok_cfg.vocab_size)
        _save_atomically(tokenizer, folder)
    eot_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    assert eot_id == tokenizer.eos_token_id, "the trained BPE's eos token is <|endoftext|>"
    return tokenizer, eot_id


def load_named(name: str, local_files_only: bool = False) -> tuple[PreTrainedTokenizerFast, int]:
    """A named tokenizer (hub name or local folder) and its end-of-text id. ``local_files_only``:
    a hub name only from the local cache (no network).

    Raises:
        ValueError: it cannot be loaded, is not a fast tokenizer, or has no eos token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - add what to do to whatever went wrong
        raise ValueError(
            f"data.tokenizer.name: cannot load tokenizer {name!r} ({type(exc).__name__}: {exc}). "
            "Give a local folder written by save_pretrained, or a hub name when online; "
            "or set it to null to train a BPE on the corpus.") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"data.tokenizer.name: {name!r} has no fast (Rust) tokenizer; grape-ds needs one")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"data.tokenizer.name: tokenizer {name!r} has no eos token, which grape-ds uses as the "
            "end-of-text token between documents; pick a tokenizer with an eos token (GPT-2's is "
            "<|endoftext|>) or set one in its tokenizer_config.json")
    return tokenizer, int(tokenizer.eos_token_id)


def _capped(texts: Iterator[str], max_chars: int) -> Iterator[str]:
    """The texts until ``max_chars`` characters in total (the last one cut to fit)."""
    left = max_chars
    if left <= 0:
        return
    for text in texts:
        yield text[:left]
        left -= len(text)
        if left <= 0:
            return


def train_bpe(texts: Iterator[str], vocab_size: int,
              max_chars: int = MAX_TRAIN_CHARS) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE with ``<|endoftext|>`` as its only special token.

    Args:
        texts: training documents; only the first ``max_chars`` characters in total are used.
        vocab_size: target vocabulary size, special token and 256 byte symbols included.
        max_chars: cap on the training text.

    Returns:
        The BPE wrapped as a ``PreTrainedTokenizerFast`` with eos/bos/unk/pad = ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT_TOKEN, bos_token=EOT_TOKEN,
                                   unk_token=EOT_TOKEN, pad_token=EOT_TOKEN,
                                   clean_up_tokenization_spaces=False)


def _save_atomically(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write a ``save_pretrained`` folder next to ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
            log.info("tokenizer %s was written by another process; keeping that one", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
