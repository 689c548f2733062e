"""Evaluation: per-unit validation loss, and multiple-choice accuracy scored as lm-evaluation-harness
scores it.

**Loss sweep.** Each rank takes windows ``rank, rank + world, ...`` of every domain's and task's
validation split (not a sample of them), sums token cross-entropy and token counts, and one
all-reduce gives the exact per-unit mean loss, independent of the number of ranks and of the batch size.

**Multiple choice.** Each choice of an item is one ``(context, continuation)`` request, the
continuation being the choice string with its leading space. Its log-likelihood is computed as the
harness's ``loglikelihood`` requests are for a causal Hugging Face model (``TemplateLM._encode_pair``,
``TemplateLM.loglikelihood`` and ``HFLM._loglikelihood_tokens`` in ``lm_eval/api/model.py`` and
``lm_eval/models/huggingface.py``):

- trailing whitespace of the context moves to the front of the continuation; the context and
  ``context + continuation`` are tokenised without special tokens, and the continuation's tokens are
  the tail of the whole string's encoding after the context's tokens; an empty context is replaced by
  the prefix token (BOS, else EOS);
- ``context + continuation`` is cut from the left to ``max_length + 1`` tokens (``max_length``: the
  model's ``n_positions``), the model reads all but the last token, and the log-probs of the
  continuation's tokens at the last ``len(continuation)`` positions are summed.

Per item (``ConfigurableTask.process_results`` in ``lm_eval/api/task.py``): ``acc`` is 1 when the
choice with the largest sum is the gold one; ``acc_norm`` is 1 when the choice with the largest sum
per character is (the length of the choice without the target delimiter, its leading space: the
harness's ``completion_len``). Both are reported (they can differ by many points: say which you quote).

Requests are right-padded (the model is causal, so no position sees the padding after it) to a
width fixed by the request's own length (rounded up to a multiple of ``PAD_MULTIPLE``), never by the
other requests in its batch, so a request's log-likelihood does not depend on the batch size, the
batch it lands in or the number of ranks. Each rank scores items ``rank, rank + world, ...``, and one
all-reduce of a ``[tasks, 3]`` tensor (correct, correct_norm and count per task) gives the accuracies.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from grape_ds.config import EvalConfig
from grape_ds.distributed import all_reduce_sum, is_collective_failure
from grape_ds.rundir import append_jsonl
from grape_ds.schedules import is_due

__all__ = ["Evaluator", "sweep_losses", "MCQuestion", "ChoiceRequest", "MCScore", "encode_pair", "prefix_token_id",
           "choice_request", "context_length", "request_loglikelihoods", "choice_loglikelihoods",
           "norm_length", "usable_items", "mc_predictions", "score_mc", "format_result",
           "PAD_MULTIPLE", "TARGET_DELIMITER"]

log = logging.getLogger(__name__)

PAD_MULTIPLE = 32        # a request is padded to its own length rounded up to this (batch-independent)
TARGET_DELIMITER = " "   # the harness's default target_delimiter, at the front of every choice string


# ----------------------------------------------------------------------------------------------
# Loss sweep
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sweep_losses(model: torch.nn.Module, windows_by_unit: dict[str, np.ndarray], batch_size: int,
                 rank: int = 0, world_size: int = 1, max_windows: int | None = None,
                 forward_context=contextlib.nullcontext) -> dict[str, float]:
    """Mean next-token loss per unit over its windows (``[n, seq_len]`` arrays), reduced over ranks.

    Sums stay on the model's device until the one all-reduce (no host sync per batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(len(windows_by_unit), 2, dtype=torch.float64, device=device)  # [units, (loss sum, tokens)]
    for u, windows in enumerate(windows_by_unit.values()):
        n = len(windows) if max_windows is None else min(len(windows), max_windows)
        mine = np.arange(rank, n, world_size)
        for start in range(0, len(mine), batch_size):
            x = torch.from_numpy(np.asarray(windows[mine[start:start + batch_size]], dtype=np.int64)).to(device)
            with forward_context():
                logits = model(input_ids=x).logits
            logits = logits.float()  # [B, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum")
            sums[u, 0] += loss
            sums[u, 1] += x[:, 1:].numel()
    all_reduce_sum(sums)
    model.train(was_training)
    return {name: loss / tokens if tokens > 0 else float("nan")
            for name, (loss, tokens) in zip(windows_by_unit, sums.tolist())}


# ----------------------------------------------------------------------------------------------
# Multiple choice: requests
# ----------------------------------------------------------------------------------------------

class MCQuestion(Protocol):
    """What scoring needs of a multiple-choice item (the data package's ``MCItem`` is one): each
    choice is scored as the continuation of ``context``; ``gold`` indexes the right one."""

    @property
    def context(self) -> str: ...

    @property
    def choices(self) -> Sequence[str]: ...

    @property
    def gold(self) -> int: ...


@dataclass(frozen=True)
class ChoiceRequest:
    """One continuation to score, as token ids.

    ``tokens`` is ``context + continuation`` cut from the left to at most ``max_length + 1`` tokens:
    the model reads ``tokens[:-1]``, and the last ``n_cont`` tokens are the continuation scored.
    """
    tokens: tuple[int, ...]
    n_cont: int

    @property
    def input_len(self) -> int:
        """Tokens the model reads."""
        return len(self.tokens) - 1


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced with: BOS, else EOS (the harness's ``prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as the harness splits them.

    Trailing whitespace of the context moves to the continuation; the continuation's ids are the tail
    of ``encode(context + continuation)`` after ``len(encode(context))`` ids. An empty context (or one
    of whitespace only) becomes the prefix token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix_token_id(tokenizer)], _encode(tokenizer, continuation)
    context_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


def choice_request(tokenizer, context: str, continuation: str, max_length: int) -> ChoiceRequest:
    """The request for one choice, truncated from the left to the model's context length."""
    context_ids, cont_ids = encode_pair(tokenizer, context, continuation)
    if not cont_ids:
        raise ValueError(f"the continuation {continuation!r} encodes to no tokens after the context "
                         f"{context[-80:]!r}; every choice must add at least one token")
    if len(cont_ids) > max_length:
        raise ValueError(f"the continuation {continuation[:80]!r}... has {len(cont_ids)} tokens, more than "
                         f"the model's context length {max_length}; it cannot be scored")
    return ChoiceRequest(tuple((context_ids + cont_ids)[-(max_length + 1):]), len(cont_ids))


def context_length(model: torch.nn.Module) -> int:
    """The model's context length, read from its config as the harness reads it."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if hasattr(model.config, attr):
            return int(getattr(model.config, attr))
    raise ValueError(f"{type(model).__name__}'s config names no context length (n_positions, "
                     "max_position_embeddings or n_ctx)")


def _padded_width(input_len: int, max_length: int) -> int:
    return min(math.ceil(input_len / PAD_MULTIPLE) * PAD_MULTIPLE, max_length)


# ----------------------------------------------------------------------------------------------
# Multiple choice: scoring
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def request_loglikelihoods(model: torch.nn.Module, requests: Sequence[ChoiceRequest],
                           batch_size: int, forward_context=contextlib.nullcontext) -> np.ndarray:
    """Summed log-prob of each request's continuation given its context: float64 ``[len(requests)]``.

    Requests are grouped by padded width (their own length rounded up to ``PAD_MULTIPLE``) and
    batched within a group, so each result is independent of ``batch_size`` and of the other requests.
    A batch is built on the host and moved to the model's device once; its sums come back once.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_length = context_length(model)
    out = np.empty(len(requests), dtype=np.float64)
    by_width: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        by_width.setdefault(_padded_width(req.input_len, max_length), []).append(i)
    for width, members in sorted(by_width.items(), reverse=True):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            x = np.zeros((len(chunk), width), dtype=np.int64)  # [B, width], right-padded with id 0
            for row, i in enumerate(chunk):
                x[row, :requests[i].input_len] = requests[i].tokens[:-1]
            with forward_context():
                logits = model(input_ids=torch.from_numpy(x).to(device)).logits  # [B, width, V]
            sums = torch.stack([_continuation_logprob(logits[row], requests[i]) for row, i in enumerate(chunk)])
            out[chunk] = sums.cpu().numpy()
    model.train(was_training)
    return out


def _continuation_logprob(logits: torch.Tensor, req: ChoiceRequest) -> torch.Tensor:
    """Sum of the continuation tokens' log-probs from one row of logits ``[width, V]``: a float64
    0-dim tensor on the logits' device."""
    end = req.input_len
    logprobs = F.log_softmax(logits[end - req.n_cont:end].float(), dim=-1)  # [n_cont, V]
    targets = torch.tensor(req.tokens[-req.n_cont:], device=logits.device)  # [n_cont]
    return logprobs.gather(1, targets[:, None]).double().sum()


def choice_loglikelihoods(model: torch.nn.Module, tokenizer, items: Sequence[MCQuestion],
                          batch_size: int, forward_context=contextlib.nullcontext) -> list[np.ndarray]:
    """Per item, the summed log-likelihood of each choice (float64 ``[len(item.choices)]``)."""
    max_length = context_length(model)
    requests = [choice_request(tokenizer, item.context, choice, max_length)
                for item in items for choice in item.choices]
    flat = request_loglikelihoods(model, requests, batch_size, forward_context)
    bounds = np.cumsum([0] + [len(item.choices) for item in items])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def usable_items(tokenizer, items_by_task: dict[str, Sequence[MCQuestion]], max_length: int
                 ) -> tuple[dict[str, list[MCQuestion]], dict[str, list[dict]]]:
    """Split each task's items into those whose every choice makes a scorable request and those that
    do not: ``(kept, skipped)``, ``skipped[task]`` a list of ``{"item": index, "error": message}``.

    A choice that encodes to no token after its context (an empty choice under a tokenizer that drops
    whitespace), or one longer than the model's context, cannot be scored; lm-evaluation-harness stops
    at such an item (``HFLM._loglikelihood_tokens`` asserts a non-empty continuation). Deterministic,
    so every rank keeps the same items without a collective."""
    kept: dict[str, list[MCQuestion]] = {}
    skipped: dict[str, list[dict]] = {}
    for task, items in items_by_task.items():
        kept[task] = []
        for index, item in enumerate(items):
            try:
                for choice in item.choices:
                    choice_request(tokenizer, item.context, choice, max_length)
            except ValueError as exc:
                skipped.setdefault(task, []).append({"item": index, "error": str(exc)})
                continue
            kept[task].append(item)
    return kept, skipped


def norm_length(choice: str) -> int:
    """The length ``acc_norm`` divides by: the choice's characters without the leading target
    delimiter (the harness's ``completion_len``), at least 1."""
    text = choice[len(TARGET_DELIMITER):] if choice.startswith(TARGET_DELIMITER) else choice
    return max(len(text), 1)


def mc_predictions(item: MCQuestion, loglikelihoods: np.ndarray) -> tuple[int, int]:
    """``(pred, pred_norm)``: the argmax of the sums, and of the sums over :func:`norm_length`."""
    lengths = np.array([norm_length(c) for c in item.choices], dtype=np.float64)
    return int(np.argmax(loglikelihoods)), int(np.argmax(loglikelihoods / lengths))


@dataclass(frozen=True)
class MCScore:
    """Accuracy of one task over its items, all ranks together."""
    acc: float
    acc_norm: float
    n: int


def score_mc(model: torch.nn.Module, tokenizer, items_by_task: dict[str, Sequence[MCQuestion]], batch_size: int,
             rank: int = 0, world_size: int = 1, forward_context=contextlib.nullcontext) -> dict[str, MCScore]:
    """``acc`` and ``acc_norm`` per task. Collective: every rank calls it with the same tasks; each
    scores items ``rank, rank + world, ...``, and one all-reduce (on the model's device) adds up the
    counts."""
    counts = np.zeros((len(items_by_task), 3))  # [tasks, (correct, correct_norm, n)]
    for t, items in enumerate(items_by_task.values()):
        mine = list(items)[rank::world_size]
        for item, lls in zip(mine, choice_loglikelihoods(model, tokenizer, mine, batch_size, forward_context)):
            pred, pred_norm = mc_predictions(item, lls)
            counts[t] += [pred == item.gold, pred_norm == item.gold, 1.0]
    device = next(model.parameters()).device
    total = all_reduce_sum(torch.from_numpy(counts).to(device)).tolist()
    return {name: MCScore(acc=c[0] / c[2], acc_norm=c[1] / c[2], n=int(c[2]))
            for name, c in zip(items_by_task, total)}


# ----------------------------------------------------------------------------------------------
# The evaluator and its output
# ----------------------------------------------------------------------------------------------

class Evaluator:
    """The loss sweep over every unit and, for tasks with items, multiple-choice accuracy.

    :meth:`evaluate` computes (collective: every rank calls it at the same step); :meth:`run` also
    logs to TensorBoard and appends the result to ``<run>/eval/eval.jsonl`` (rank 0). It runs every
    ``every`` steps (and at the end of training). ``forward_context`` (a callable returning a context
    manager) wraps every forward: the engine's autocast when DeepSpeed's ``torch_autocast`` is on.
    """

    @classmethod
    def from_config(cls, cfg: EvalConfig, data, rank: int, world_size: int, path: Path,
                    mc_items: dict[str, list[MCQuestion]] | None = None,
                    forward_context=contextlib.nullcontext) -> "Evaluator":
        """The ``eval:`` section's evaluator (``every``, ``batch_size``, ``max_windows``) of ``data``,
        appending its results to ``path`` (``RunPaths.eval``)."""
        return cls(data, cfg.every, cfg.batch_size, cfg.max_windows, rank, world_size, path, mc_items,
                   forward_context)

    def __init__(self, data, every: int, batch_size: int, max_windows: int | None, rank: int,
                 world_size: int, path: Path, mc_items: dict[str, list[MCQuestion]] | None = None,
                 forward_context=contextlib.nullcontext) -> None:
        self.data, self.every, self.batch_size, self.max_windows = data, every, batch_size, max_windows
        self.rank, self.world_size = rank, world_size
        self.forward_context = forward_context
        self.path = Path(path)
        self.mc_items = {task: items for task, items in (mc_items or {}).items() if items}
        for task in sorted(set(mc_items or {}) - set(self.mc_items)):
            log.warning("task %s has no multiple-choice items; its accuracy is not evaluated", task)
        self._tokenizer = None
        self.mc_skipped: dict[str, list[dict]] | None = None  # filled at the first scoring

    def due(self, step: int) -> bool:
        return is_due(step, self.every)

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        """The result row: per-unit losses (with average and worst) and, when there are items,
        ``mc_acc`` / ``mc_acc_norm`` per task with their averages."""
        domains = sweep_losses(model, {d: self.data.windows(d, "val") for d in self.data.domains},
                               self.batch_size, self.rank, self.world_size, self.max_windows,
                               self.forward_context)
        tasks = sweep_losses(model, {t: self.data.windows(t, "val") for t in self.data.tasks},
                             self.batch_size, self.rank, self.world_size, self.max_windows,
                             self.forward_context)
        result = {"step": step, "domain_loss": domains, "task_loss": tasks,
                  "domain_loss_avg": float(np.mean(list(domains.values()))),
                  "domain_loss_worst": float(np.max(list(domains.values())))}
        if tasks:
            result.update(task_loss_avg=float(np.mean(list(tasks.values()))),
                          task_loss_worst=float(np.max(list(tasks.values()))))
        if self.mc_items:
            result.update(self._multiple_choice(model))
        return result

    def _multiple_choice(self, model: torch.nn.Module) -> dict:
        if self._tokenizer is None:
            self._tokenizer = self.data.load_tokenizer()
        if self.mc_skipped is None:  # items no request can be made of are left out and reported
            self.mc_items, self.mc_skipped = usable_items(self._tokenizer, self.mc_items, context_length(model))
            for task, bad in self.mc_skipped.items():
                log.warning("task %s: %d multiple-choice item(s) cannot be scored and are left out "
                            "(listed under mc_skipped in eval.jsonl); the first, item %d: %s",
                            task, len(bad), bad[0]["item"], bad[0]["error"])
            self.mc_items = {t: items for t, items in self.mc_items.items() if items}
        out: dict = {"mc_skipped": self.mc_skipped} if self.mc_skipped else {}
        if not self.mc_items:
            return out
        scores = score_mc(model, self._tokenizer, self.mc_items, self.batch_size, self.rank, self.world_size,
                          self.forward_context)
        acc = {t: s.acc for t, s in scores.items()}
        acc_norm = {t: s.acc_norm for t, s in scores.items()}
        return out | {"mc_acc": acc, "mc_acc_norm": acc_norm, "mc_items": {t: s.n for t, s in scores.items()},
                      "mc_acc_avg": float(np.mean(list(acc.values()))),
                      "mc_acc_norm_avg": float(np.mean(list(acc_norm.values())))}

    def run(self, model: torch.nn.Module, step: int, monitor) -> dict:
        """Evaluate, log to TensorBoard (``eval/loss/<domain>``, ``eval/task_loss/<task>``,
        ``eval/acc/<task>``, ``eval/acc_norm/<task>``, averages and worst cases) and append to
        ``eval.jsonl``.

        An evaluation that fails (other than a collective failure, which is raised) does not stop
        training: the error is logged and recorded as ``{"step", "error"}`` in ``eval.jsonl``."""
        try:
            result = self.evaluate(model, step)
        except Exception as exc:  # noqa: BLE001 - an evaluation never makes a run unfinishable
            if is_collective_failure(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.error("evaluation at step %d failed, training goes on: %s", step, error, exc_info=True)
            result = {"step": step, "error": error}
            if self.rank == 0:
                append_jsonl(self.path, result)
            return result
        monitor.vector(step, "eval/loss", result["domain_loss"].keys(), result["domain_loss"].values())
        monitor.vector(step, "eval/task_loss", result["task_loss"].keys(), result["task_loss"].values())
        if "mc_acc" in result:
            monitor.vector(step, "eval/acc", result["mc_acc"].keys(), result["mc_acc"].values())
            monitor.vector(step, "eval/acc_norm", result["mc_acc_norm"].keys(), result["mc_acc_norm"].values())
        monitor.scalars(step, {k: v for k, v in result.items() if k.endswith(("_avg", "_worst"))})
        if self.rank == 0:
            append_jsonl(self.path, result)
        return result


def format_result(result: dict) -> str:
    """An evaluation result as a plain-text table (losses in nats per token, accuracies in [0, 1])."""
    lines = [f"{'unit':<24} {'loss':>10}"]
    for kind in ("domain", "task"):
        losses = result.get(f"{kind}_loss", {})
        lines += [f"{name:<24} {loss:>10.4f}" for name, loss in losses.items()]
        if losses:
            lines.append(f"{kind + ' average':<24} {result[f'{kind}_loss_avg']:>10.4f}")
            lines.append(f"{kind + ' worst':<24} {result[f'{kind}_loss_worst']:>10.4f}")
    if "mc_acc" in result:
        lines += ["", f"{'task':<24} {'items':>7} {'acc':>8} {'acc_norm':>9}"]
        lines += [f"{t:<24} {result['mc_items'][t]:>7d} {acc:>8.4f} {result['mc_acc_norm'][t]:>9.4f}"
                  for t, acc in result["mc_acc"].items()]
        lines.append(f"{'average':<24} {'':>7} {result['mc_acc_avg']:>8.4f} {result['mc_acc_norm_avg']:>9.4f}")
    return "\n".join(lines)
