"""The GPT-2 model from the config: vocabulary padding, attention implementation, and the size and
FLOPs figures ``grape-ds bench throughput`` reports."""

from __future__ import annotations

import pytest
import torch

from grape_ds.bench import MODEL_SIZES, flops_per_token, peak_flops
from grape_ds.config import ModelConfig
from grape_ds.model import build_model, gpt2_config


def test_vocab_padding_and_its_floor():
    model = build_model(ModelConfig(vocab_size=1088), vocab_size=1024, eot_id=1023, seed=0)
    assert model.transformer.wte.weight.shape[0] == 1088
    assert model.lm_head.weight is model.transformer.wte.weight
    assert build_model(ModelConfig(), 1024, 1023, seed=0).config.vocab_size == 1024  # null: the tokenizer's
    with pytest.raises(ValueError, match="model.vocab_size: 1000 is smaller than the tokenizer's vocabulary"):
        build_model(ModelConfig(vocab_size=1000), 1024, 1023, seed=0)


def test_sdpa_attention_by_default_and_eager_computes_the_same():
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    sdpa = build_model(ModelConfig(), 256, 255, seed=0)
    eager = build_model(ModelConfig(attn_implementation="eager"), 256, 255, seed=0)
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    a, b = (m(input_ids=x, labels=x).loss for m in (sdpa, eager))
    assert torch.allclose(a, b, atol=1e-5)


def test_gpt2_124m_size_and_flops():
    size = MODEL_SIZES["124m"]
    cfg = ModelConfig(n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head,
                      n_positions=size.seq_len, vocab_size=size.vocab_size)
    with torch.device("meta"):
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(gpt2_config(cfg, 1024, 1023))
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    assert 123.5e6 < n < 124.0e6  # GPT-2 small with the padded 50304 vocabulary, no position table
    # 6N + 12 L H Q T with L=12, H=12, Q=64, T=1024 (PaLM appendix B; nanoGPT's estimate_mfu)
    assert flops_per_token(n, 12, 12, 64, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert peak_flops("NVIDIA H200", "bf16") == 989e12 == peak_flops("NVIDIA H200", "bf16_autocast")
    assert peak_flops("cpu (x86_64, 2 cores)", "bf16") is None
