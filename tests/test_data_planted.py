"""The planted corpus: deterministic, built as its ground truth says, and learnable in the way the
ground truth promises (kept as evidence: a tiny GPT-2 trained on a uniform mixture of the domains)."""

import dataclasses

import numpy as np
import pytest
import torch

from grape_ds.config import DataConfig, PlantedConfig
from grape_ds.data import ground_truth, prepare_data
from grape_ds.data.planted import (EASY_WORDS, HARD_SHARE, domain_letters, domain_lexicon,
                                   generate)

SMALL = PlantedConfig(docs_per_domain=60, docs_per_task=20)


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b = generate(SMALL), generate(SMALL)
    assert a == b
    other = generate(dataclasses.replace(SMALL, seed=1))
    assert all(other[u] != a[u] for u in a)
    # Units draw from their own streams: more task documents leave the domains unchanged.
    more_tasks = generate(dataclasses.replace(SMALL, docs_per_task=30))
    assert all(more_tasks[d] == a[d] for d in ground_truth(SMALL).domains)


def test_sizes_and_document_lengths():
    corpus = generate(SMALL)
    truth = ground_truth(SMALL)
    assert list(corpus) == [*truth.domains, *truth.tasks]
    for name, docs in corpus.items():
        assert len(docs) == (SMALL.docs_per_domain if name.startswith("domain") else SMALL.docs_per_task)
        assert all(100 <= len(d.split(" ")) <= 200 for d in docs)


@pytest.mark.parametrize("k,n", [(6, 3), (3, 2), (9, 2), (12, 3), (13, 5), (26, 4)])
def test_relevance_bound_and_structure(k, n):
    truth = ground_truth(PlantedConfig(num_domains=k, num_tasks=n))
    assert truth.domains == tuple(f"domain_{i}" for i in range(k))
    assert truth.tasks == tuple(f"task_{i}" for i in range(n))
    assert truth.hard_task == f"task_{n - 1}"
    for task in truth.tasks:
        assert 1 <= len(truth.relevant[task]) <= k / 3, "no more than a third of the domains per task"
    used = {d for ds in truth.relevant.values() for d in ds}
    assert used == set(truth.relevant_domains) == set(truth.domains[:max(1, k // 3)])
    assert set(truth.irrelevant_domains) == set(truth.domains) - used


def test_default_ground_truth():
    truth = ground_truth(PlantedConfig())
    assert truth.relevant == {"task_0": ("domain_0",), "task_1": ("domain_1",), "task_2": ("domain_0",)}
    assert truth.relevant_domains == ("domain_0", "domain_1") and truth.hard_task == "task_2"


def test_disjoint_vocabularies_and_task_sources():
    truth = ground_truth(SMALL)
    corpus = generate(SMALL)
    letters = {d: set(domain_letters(SMALL, k)) for k, d in enumerate(truth.domains)}
    for i, a in enumerate(truth.domains):
        used = set("".join(corpus[a])) - {" "}
        assert used <= letters[a]
        for b in truth.domains[i + 1:]:
            assert not letters[a] & letters[b]
    index = {d: k for k, d in enumerate(truth.domains)}
    for task in truth.tasks:
        (source,) = truth.relevant[task]
        lexicon = domain_lexicon(SMALL, index[source])
        # Easy tasks speak the easy words of their domain, the hard task its hard words.
        allowed = set(lexicon[EASY_WORDS:] if task == truth.hard_task else lexicon[:EASY_WORDS])
        assert {w for doc in corpus[task] for w in doc.split(" ")} <= allowed
    hard_words = set(domain_lexicon(SMALL, 0)[EASY_WORDS:])
    hard_share = np.mean([doc.split(" ")[0] in hard_words for doc in corpus["domain_0"]])
    assert abs(hard_share - HARD_SHARE) < 0.15


# ----------------------------------------------------------------------------------------------
# The learning check: a tiny GPT-2, plain torch, a uniform mixture of the domains.
# ----------------------------------------------------------------------------------------------

STEPS, BATCH, EVAL_WINDOWS, GRAD_WINDOWS = 100, 16, 32, 96


def _loss(model, windows: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(windows, dtype=np.int64))  # [B, T]
    return model(input_ids=x, labels=x).loss


def _flat_grad(model, windows: np.ndarray) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    _loss(model, windows).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # [P]


@pytest.fixture(scope="module")
def learning(data_cache):
    """Train on a uniform mixture of the planted domains; measure task losses and gradient alignment."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = PlantedConfig()
    data = prepare_data(DataConfig(cache_dir=str(data_cache), seq_len=128, planted=cfg))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=data.vocab_size,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=data.eot_id, eos_token_id=data.eot_id))
    tasks = {t: data.windows(t, "train")[:EVAL_WINDOWS] for t in data.tasks}  # never trained on

    def task_losses() -> dict[str, float]:
        with torch.no_grad():
            return {t: _loss(model, w).item() for t, w in tasks.items()}

    before = task_losses()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    train = [data.windows(d, "train") for d in data.domains]
    for _ in range(STEPS):
        domains = rng.integers(len(train), size=BATCH)  # [B] uniform mixture, one domain per sequence
        batch = np.stack([train[d][rng.integers(len(train[d]))] for d in domains])  # [B, T]
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = task_losses()

    grads = {d: _flat_grad(model, data.windows(d, "val")) for d in data.domains}  # ~90 held-out windows
    grads |= {t: _flat_grad(model, data.windows(t, "train")[EVAL_WINDOWS:EVAL_WINDOWS + GRAD_WINDOWS])
              for t in data.tasks}
    dots = {t: {d: float(grads[t] @ grads[d]) for d in data.domains} for t in data.tasks}
    cos = {t: {d: float(torch.nn.functional.cosine_similarity(grads[t], grads[d], dim=0))
               for d in data.domains} for t in data.tasks}
    rel = {t: (before[t] - after[t]) / before[t] for t in data.tasks}
    print("\nplanted learning check:")
    for t in data.tasks:
        print(f"  {t}: loss {before[t]:.3f} -> {after[t]:.3f} (relative decrease {rel[t]:.3f}); "
              f"grad dots {[round(v, 4) for v in dots[t].values()]}; cos {[round(v, 3) for v in cos[t].values()]}")
    return {"truth": ground_truth(cfg), "data": data, "before": before, "after": after, "rel": rel,
            "dots": dots, "cos": cos}


@pytest.mark.slow  # the learning check trains a model (~25 s)
def test_domains_share_no_token_but_eot(learning):
    data = learning["data"]
    seen = {d: set(np.unique(data.windows(d, "train")).tolist()) for d in data.domains}
    for i, a in enumerate(data.domains):
        for b in data.domains[i + 1:]:
            assert seen[a] & seen[b] <= {data.eot_id}, (a, b)


@pytest.mark.slow  # the learning check trains a model (~25 s)
def test_every_task_loss_decreases(learning):
    for task, before in learning["before"].items():
        assert learning["after"][task] < before - 1.0, task


@pytest.mark.slow  # the learning check trains a model (~25 s)
def test_hard_task_improves_least(learning):
    rel, hard = learning["rel"], learning["truth"].hard_task
    easy = [r for t, r in rel.items() if t != hard]
    assert rel[hard] < min(easy) - 0.1, rel


@pytest.mark.slow  # the learning check trains a model (~25 s)
def test_gradients_align_with_relevant_domains_only(learning):
    truth, dots, cos = learning["truth"], learning["dots"], learning["cos"]
    for task in truth.tasks:
        relevant = truth.relevant[task]
        floor = min(dots[task][d] for d in relevant)
        assert floor > 0 and min(cos[task][d] for d in relevant) > 0.25, (task, cos[task])
        for domain, dot in dots[task].items():
            if domain not in relevant:
                assert dot < 0.35 * floor, (task, domain, dots[task])
