"""Multiple-choice scoring against log-probs computed by hand, batch-size and rank independence, and
the Evaluator's multiple-choice output (a tiny random GPT-2 and a small trained BPE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from common.distributed import run_distributed
from grape_ds.data.benchmarks import MCItem
from grape_ds.data.tokenizer import train_bpe
from grape_ds.evaluation import (Evaluator, choice_loglikelihoods, choice_request, encode_pair, mc_predictions,
                                 norm_length, score_mc)

N_POSITIONS = 64
WORDS = "the cat sat on a mat and the dog ran to the old red barn while birds sang".split()


def _texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny random GPT-2 and a trained BPE, saved to one folder (spawned ranks load the same)."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_bpe(iter(_texts()), vocab_size=300)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=32,
                                       n_layer=2, n_head=4, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(str(folder))
    return folder


def _load(folder: Path):
    return GPT2LMHeadModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def lm(saved):
    return _load(saved)


def _items() -> list[MCItem]:
    """Short one-token choices against long, many-character ones (so acc and acc_norm disagree);
    a context with trailing spaces, an empty context, and one longer than the model's context."""
    long_context = " ".join(_texts(12, seed=1))
    return [
        MCItem("the cat sat on", (" a", " the mat and the old red barn"), gold=1),
        MCItem("birds sang while the dog ran to", (" the old red barn and the mat", " a"), gold=1),
        MCItem("Question: where did the cat sit? Answer:  ", (" mat", " on the old red mat", " barn"), gold=0),
        MCItem("", (" the", " birds sang"), gold=1),
        MCItem(long_context, (" the dog", " a cat sat on the mat"), gold=0),
    ]


def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The harness's recipe written out: move the context's trailing spaces, split the tokens, cut
    from the left to n_positions + 1, then one forward per continuation token (no padding, no batch)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if stripped:
        context_ids = tokenizer.encode(stripped, add_special_tokens=False)
        cont_ids = tokenizer.encode(stripped + continuation, add_special_tokens=False)[len(context_ids):]
    else:
        context_ids = [tokenizer.bos_token_id]
        cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
    window = (context_ids + cont_ids)[-(N_POSITIONS + 1):]
    first = len(window) - len(cont_ids)
    total = 0.0
    with torch.no_grad():
        for k in range(first, len(window)):
            logits = model(input_ids=torch.tensor([window[:k]])).logits[0, -1]
            total += F.log_softmax(logits.float(), dim=-1)[window[k]].item()
    return total


def test_encode_pair_moves_trailing_spaces_to_the_continuation(lm):
    _, tokenizer = lm
    context_ids, cont_ids = encode_pair(tokenizer, "the cat sat on  ", " a mat")
    assert context_ids == tokenizer.encode("the cat sat on", add_special_tokens=False)
    assert context_ids + cont_ids == tokenizer.encode("the cat sat on   a mat", add_special_tokens=False)
    assert encode_pair(tokenizer, "", " a")[0] == [tokenizer.bos_token_id]


def test_truncation_keeps_the_continuation_and_refuses_one_too_long(lm):
    _, tokenizer = lm
    context = " ".join(_texts(12, seed=1))
    req = choice_request(tokenizer, context, " the dog", N_POSITIONS)
    assert len(req.tokens) == N_POSITIONS + 1
    assert list(req.tokens[-req.n_cont:]) == encode_pair(tokenizer, context, " the dog")[1]
    with pytest.raises(ValueError, match="context length"):
        choice_request(tokenizer, "the", " " + context, N_POSITIONS)


def test_norm_length_is_the_choice_without_the_target_delimiter():
    assert norm_length(" abc") == 3
    assert norm_length("abc") == 3
    assert norm_length(" ") == 1  # never a division by zero
    # -2/1 < -5.5/3 picks choice 1; dividing by the lengths with the space (-2/2 > -5.5/4) would pick 0
    item = MCItem("q", (" a", " bcd"), gold=1)
    assert mc_predictions(item, np.array([-2.0, -5.5])) == (0, 1)


def test_scores_equal_hand_computed_log_probs_and_argmaxes(lm):
    model, tokenizer = lm
    items = _items()
    scored = choice_loglikelihoods(model, tokenizer, items, batch_size=4)
    hand_acc, hand_norm, disagree = [], [], 0
    for item, lls in zip(items, scored):
        hand = np.array([_hand_loglikelihood(model, tokenizer, item.context, c) for c in item.choices])
        np.testing.assert_allclose(lls, hand, atol=1e-5, rtol=0)
        pred = int(np.argmax(hand))
        pred_norm = int(np.argmax(hand / np.array([len(c) - 1 for c in item.choices])))
        assert mc_predictions(item, lls) == (pred, pred_norm)
        hand_acc.append(pred == item.gold)
        hand_norm.append(pred_norm == item.gold)
        disagree += pred != pred_norm
    assert disagree >= 2, "the items must make acc and acc_norm pick different choices"
    score = score_mc(model, tokenizer, {"t": items}, batch_size=4)["t"]
    assert (score.acc, score.acc_norm, score.n) == (np.mean(hand_acc), np.mean(hand_norm), len(items))


def test_scores_do_not_depend_on_the_batch_size(lm):
    model, tokenizer = lm
    items = _items() + [MCItem(t[:30], (" a", t[30:60], " the dog ran to the barn"), gold=2) for t in _texts(6, seed=3)]
    one = choice_loglikelihoods(model, tokenizer, items, batch_size=1)
    eight = choice_loglikelihoods(model, tokenizer, items, batch_size=8)
    for a, b in zip(one, eight):
        assert np.array_equal(a, b), (a, b)
    assert score_mc(model, tokenizer, {"t": items}, 1) == score_mc(model, tokenizer, {"t": items}, 8)


def _tasks() -> dict[str, list[MCItem]]:
    texts = _texts(9, seed=4)
    return {"short": _items(), "more": [MCItem(t[:25], (" a", t[25:50], " birds"), gold=i % 3)
                                         for i, t in enumerate(texts)]}


def _score_on_rank(rank: int, world_size: int, folder: Path):
    model, tokenizer = _load(folder)
    tasks = _tasks()
    scores = score_mc(model, tokenizer, tasks, batch_size=3, rank=rank, world_size=world_size)
    mine = {t: choice_loglikelihoods(model, tokenizer, items[rank::world_size], 3) for t, items in tasks.items()}
    return scores, mine


@pytest.mark.slow  # 2 real processes on gloo
def test_two_ranks_score_what_one_rank_scores(saved, lm):
    model, tokenizer = lm
    tasks = _tasks()
    single = score_mc(model, tokenizer, tasks, batch_size=5)
    (s0, lls0), (s1, lls1) = run_distributed(_score_on_rank, world_size=2, args=(saved,))
    assert s0 == s1 == single
    for task, items in tasks.items():
        whole = choice_loglikelihoods(model, tokenizer, items, 5)
        merged = [None] * len(items)
        merged[0::2], merged[1::2] = lls0[task], lls1[task]
        for a, b in zip(merged, whole):
            assert np.array_equal(a, b)


class _Data:
    """Just what the Evaluator reads of PackedData."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.domains, self.tasks, self._tokenizer = ["d0"], ["t0"], tokenizer
        rng = np.random.default_rng(0)
        self._windows = {u: rng.integers(0, vocab_size, size=(5, 16)) for u in ("d0", "t0")}

    def windows(self, unit: str, split: str) -> np.ndarray:
        return self._windows[unit]

    def load_tokenizer(self):
        return self._tokenizer


class _Monitor:
    def __init__(self) -> None:
        self.tags: dict[str, float] = {}

    def vector(self, step, prefix, names, values) -> None:
        self.tags.update({f"{prefix}/{n}": float(v) for n, v in zip(names, values)})

    def scalars(self, step, values) -> None:
        self.tags.update(values)


def test_evaluator_adds_accuracy_to_the_json_line_and_tensorboard(lm, tmp_path):
    model, tokenizer = lm
    tasks = _tasks()
    monitor = _Monitor()
    evaluator = Evaluator(_Data(tokenizer, len(tokenizer)), every=1, batch_size=4, max_windows=None, rank=0,
                          world_size=1, path=tmp_path / "eval" / "eval.jsonl", mc_items={**tasks, "empty": []})
    result = evaluator.run(model, step=3, monitor=monitor)
    expected = score_mc(model, tokenizer, tasks, batch_size=4)
    assert result["mc_acc"] == {t: s.acc for t, s in expected.items()}
    assert result["mc_acc_norm"] == {t: s.acc_norm for t, s in expected.items()}
    assert result["mc_items"] == {"short": 5, "more": 9}
    assert result["mc_acc_avg"] == pytest.approx(np.mean([s.acc for s in expected.values()]))
    for task, score in expected.items():
        assert monitor.tags[f"eval/acc/{task}"] == score.acc
        assert monitor.tags[f"eval/acc_norm/{task}"] == score.acc_norm
    assert {"mc_acc_avg", "mc_acc_norm_avg", "eval/loss/d0", "eval/task_loss/t0"} <= set(monitor.tags)
    (line,) = (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()
    assert json.loads(line) == result


def test_an_item_that_cannot_be_scored_is_left_out_and_reported(lm, tmp_path):
    """An empty choice encodes to no token: lm-evaluation-harness stops at such an item; the evaluator
    leaves it out, scores the rest as before and names it in eval.jsonl."""
    model, tokenizer = lm
    good = _tasks()
    bad = MCItem("the cat sat on", (" a", ""), gold=0)
    items = {"short": [*good["short"][:2], bad, *good["short"][2:]], "more": good["more"]}
    evaluator = Evaluator(_Data(tokenizer, len(tokenizer)), every=1, batch_size=4, max_windows=None, rank=0,
                          world_size=1, path=tmp_path / "eval" / "eval.jsonl", mc_items=items)
    result = evaluator.run(model, step=3, monitor=_Monitor())
    expected = score_mc(model, tokenizer, good, batch_size=4)
    assert result["mc_acc"] == {t: s.acc for t, s in expected.items()}
    assert result["mc_items"] == {"short": 5, "more": 9}
    (skipped,) = result["mc_skipped"]["short"]
    assert skipped["item"] == 2 and "encodes to no tokens" in skipped["error"]
    assert json.loads((tmp_path / "eval" / "eval.jsonl").read_text())["mc_skipped"] == result["mc_skipped"]


def test_an_evaluation_that_fails_is_recorded_and_does_not_raise(lm, tmp_path):
    model, tokenizer = lm

    class Broken(_Data):
        def windows(self, unit, split):
            raise OSError(f"the validation file of {unit} is gone")

    evaluator = Evaluator(Broken(tokenizer, len(tokenizer)), every=1, batch_size=4, max_windows=None, rank=0,
                          world_size=1, path=tmp_path / "eval" / "eval.jsonl")
    result = evaluator.run(model, step=5, monitor=_Monitor())
    assert result == {"step": 5, "error": "OSError: the validation file of d0 is gone"}
    assert json.loads((tmp_path / "eval" / "eval.jsonl").read_text()) == result

