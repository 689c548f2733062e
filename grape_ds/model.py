"""GPT-2 built from the model section; knows nothing of ranks or DeepSpeed."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from grape_ds.config import ModelConfig

__all__ = ["build_model", "gpt2_config"]


def gpt2_config(cfg: ModelConfig, vocab_size: int, eot_id: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
    )


def build_model(cfg: ModelConfig, vocab_size: int, eot_id: int, seed: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 (initialised from ``seed``), or the local checkpoint ``cfg.init_from``."""
    if cfg.init_from is not None:
        model = GPT2LMHeadModel.from_pretrained(cfg.init_from)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"model.init_from: {cfg.init_from} has vocab_size {model.config.vocab_size} "
                             f"but the tokenizer has {vocab_size}")
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(gpt2_config(cfg, vocab_size, eot_id))
    model.loss_type = "ForCausalLM"  # the mean next-token cross-entropy (named, so no warning)
    return model
