"""GPT-2 built from the model section; knows nothing of ranks or DeepSpeed."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from grape_ds.config import ModelConfig

__all__ = ["build_model", "gpt2_config", "model_vocab_size"]


def model_vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """Rows of the embedding: ``model.vocab_size`` when set (padding the tokenizer's), else the
    tokenizer's vocabulary.

    Raises:
        ValueError: ``model.vocab_size`` is smaller than the tokenizer's vocabulary.
    """
    if cfg.vocab_size is None:
        return tokenizer_vocab
    if cfg.vocab_size < tokenizer_vocab:
        raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab}); use at least that (or null)")
    return cfg.vocab_size


def gpt2_config(cfg: ModelConfig, vocab_size: int, eot_id: int) -> GPT2Config:
    """The transformers config; ``vocab_size`` is the tokenizer's (padded by ``model.vocab_size``)."""
    return GPT2Config(
        vocab_size=model_vocab_size(cfg, vocab_size), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout, bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
        attn_implementation=cfg.attn_implementation,
    )


def build_model(cfg: ModelConfig, vocab_size: int, eot_id: int, seed: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 (initialised from ``seed``), or the local checkpoint ``cfg.init_from``.

    ``vocab_size`` is the tokenizer's; the model's is :func:`model_vocab_size`. Attention is
    ``model.attn_implementation`` (PyTorch SDPA by default)."""
    if cfg.init_from is not None:
        model = GPT2LMHeadModel.from_pretrained(cfg.init_from, attn_implementation=cfg.attn_implementation)
        if model.config.vocab_size != model_vocab_size(cfg, vocab_size):
            raise ValueError(f"model.init_from: {cfg.init_from} has vocab_size {model.config.vocab_size} "
                             f"but the tokenizer has {vocab_size}")
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(gpt2_config(cfg, vocab_size, eot_id))
    model.loss_type = "ForCausalLM"  # the mean next-token cross-entropy (named, so no warning)
    return model
