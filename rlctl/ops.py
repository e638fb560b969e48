"""Small tensor helpers shared by components: masked reductions, group statistics, loss aggregation.

Conventions: masks are float or bool ``[N, T]``; groups are given by ``group_ids`` ``[N]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor,
                   unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and std of its group (population std unless ``unbiased``). Shapes ``[N]``."""
    _, dense = torch.unique(group_ids, return_inverse=True)
    k = int(dense.max().item()) + 1 if dense.numel() else 0
    v = values.double()
    count = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, dense, torch.ones_like(v))
    total = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, dense, v)
    mean = total / count
    sq = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, dense, (v - mean[dense]) ** 2)
    denom = (count - 1).clamp(min=1) if unbiased else count
    std = (sq / denom).sqrt()
    return mean[dense].to(values.dtype), std[dense].to(values.dtype)


def batch_std(values: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    return values.std(unbiased=unbiased) if values.numel() > 1 else values.new_zeros(())


def broadcast_to_tokens(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Repeat a ``[N]`` value on every completion token, zero on padding."""
    return per_sample.unsqueeze(-1).to(torch.float32) * mask.to(torch.float32)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: float | None = None, totals: Mapping[str, float] | None = None,
              key: str = "") -> torch.Tensor:
    """Reduce a per-token loss ``[N, T]`` to a scalar.

    token-mean:           sum over all tokens / number of tokens (long answers weigh more)
    seq-mean-token-mean:  mean over sequences of each sequence's token mean (GRPO's original)
    seq-mean-token-sum:   mean over sequences of each sequence's token sum
    constant:             sum over all tokens / (N * normalizer) (Dr. GRPO; normalizer = max tokens)

    The counts (tokens, sequences) are those of ``totals`` when given: ``rollouts.totals``, which the
    trainer fills with the counts of the whole mini-batch over all processes. Each micro-batch then
    returns its share of the mini-batch loss, and the shares add up to exactly the loss of the whole
    batch, however it is split. ``key`` picks the counts of one term (``totals[key + "tokens"]``,
    ``totals[key + "sequences"]``); without ``totals`` the counts are this batch's own.
    """
    m = mask.to(per_token.dtype)
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; accepted: {', '.join(AGGREGATIONS)}")
    if totals is not None:
        tokens, sequences = float(totals[key + "tokens"]), float(totals[key + "sequences"])
    else:
        tokens, sequences = m.sum(), float(per_token.shape[0])
    if mode == "token-mean":
        return (per_token * m).sum() / _at_least_one(tokens, per_token)
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(sequences, 1.0)
    if mode == "seq-mean-token-sum":
        return (per_token * m).sum() / max(sequences, 1.0)
    if not normalizer:
        raise ValueError("aggregation 'constant' needs a positive normalizer")
    return (per_token * m).sum() / (max(sequences, 1.0) * normalizer)


def batch_mean(values: torch.Tensor, totals: Mapping[str, float] | None = None, key: str = "sequences") -> torch.Tensor:
    """Mean of per-unit values ``[K]`` (e.g. one per preference pair) over the whole mini-batch:
    ``sum / totals[key]`` when ``totals`` is given (see ``aggregate``), else the plain mean."""
    if totals is None:
        return values.mean()
    return values.sum() / max(float(totals[key]), 1.0)


def default_totals(rollouts: Any) -> dict[str, float]:
    """The counts every loss gets in ``rollouts.totals``: ``tokens`` (of ``loss_mask``, else
    ``completion_mask``) and ``sequences`` (rows). Summed over processes by the trainer."""
    mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
    return {"tokens": float(mask.float().sum().item()), "sequences": float(len(rollouts))}


def _at_least_one(count: Any, like: torch.Tensor) -> Any:
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1.0)
    return max(float(count), 1.0)


KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = log pi/pi_ref; k2 = 0.5 (log pi/pi_ref)^2; k3 = (rho - 1) - log rho with rho = pi_ref/pi.
    Straight-through variants: "k1+" and "k3+" have the value of k1 / k3 and the gradient of k2 (whose
    expected gradient on policy is that of KL(pi || pi_ref)), so the logged penalty is the unbiased (k1)
    or non-negative (k3) estimate while the update follows the reverse KL.
    """
    if estimator.endswith("+") and estimator in KL_ESTIMATORS:
        value = kl_penalty(logprobs, ref_logprobs, estimator[:-1])
        k2 = kl_penalty(logprobs, ref_logprobs, "k2")
        return k2 + (value - k2).detach()  # value of k1/k3, gradient of k2
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_rho = -log_ratio.clamp(-20.0, 20.0)
        return log_rho.exp() - 1 - log_rho
    raise ValueError(f"unknown KL estimator {estimator!r}; accepted: {', '.join(KL_ESTIMATORS)}")


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False,
                  eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) with mean and std over the masked entries (population std unless
    ``unbiased``); zero where ``mask`` is zero."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count.clamp(min=1.0)
    denom = (count - 1).clamp(min=1.0) if unbiased else count.clamp(min=1.0)
    std = ((((x - mean) * m) ** 2).sum() / denom).sqrt()
    return (x - mean) / (std + eps) * m


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: logsumexp(z) - sum softmax(z) z (uniform -> log V)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
