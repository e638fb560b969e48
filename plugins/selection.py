"""Prompt selection: samplers that choose which prompts to train on (and how many completions each gets)
from per-prompt statistics learnt online from the rewards.

Each sampler sets ``candidates_per_prompt`` (option ``candidates``): the trainer hands it ``candidates``
times ``prompts_per_step`` candidate prompts and it generates completions for ``prompts_per_step`` of them.
After rewards and advantages are computed the trainer shows it the trained batch (``observe``), and it
updates the statistics of each prompt, keyed by the prompt's text. Statistics and the selection RNG are
saved in checkpoints (``state_dict`` / ``load_state_dict``, plain JSON).

A completion counts as a success when its reward (the weighted sum of the ``[[reward]]`` tables) is at
least ``success_threshold`` (default 1.0, the trainer's accuracy threshold).

- ``mopps``: Beta posterior of each prompt's success rate, Thompson sampling toward a target rate
  ("Can Prompt Difficulty be Online Predicted for Accelerating RL Finetuning of Reasoning Models?").
- ``variance_aware``: the prompts with the largest outcome variance p(1 - p), plus an optional
  trajectory-diversity bonus (MMR1's variance-aware sampling).
- ``knapsack``: rollout counts per prompt from a knapsack over learning value and cost under the step's
  budget of ``prompts_per_step * group_size`` completions ("Knapsack RL").
- ``history_resampling``: prompts that a whole group answered correctly are not drawn again (SRPO).

Generation is ``rlctl.generation.generate`` through the ``hf`` sampler, with the same options.
"""

from __future__ import annotations

import heapq
from typing import Any, Sequence

import numpy as np
import torch

from rlctl.generation import generate
from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.rollouts import Prompt, Rollouts
from rlctl_plugins.samplers import HFGenerateSampler


# ------------------------------------------------------------------------------------- helpers
def variance_score(p: float) -> float:
    """Outcome variance of a Bernoulli success rate: p (1 - p). p = .5 -> .25, p = 1 -> 0."""
    return p * (1.0 - p)


def knapsack_value(n: int, p: float) -> float:
    """Knapsack RL's value of ``n`` rollouts on a prompt of success rate ``p``.

    P(the group has both a success and a failure, so a non-zero GRPO gradient) times the approximate
    information gain of one update: (1 - p^n - (1 - p)^n) * p (1 - p)^2. Concave in ``n``.
    """
    if n <= 0:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def allocate_rollouts(rates: Sequence[float], solved: Sequence[bool], budget: int, min_rollouts: int = 2,
                      max_rollouts: int = 0) -> list[int]:
    """Rollouts per prompt maximising sum_i knapsack_value(n_i, p_i) under sum_i n_i = ``budget``.

    Every prompt gets at least ``min_rollouts`` (lowered to ``budget // len(rates)`` when the budget
    cannot pay for it) and at most ``max_rollouts`` (0: no cap). Solved prompts keep the minimum. The
    value is concave in n, so handing out one rollout at a time to the largest marginal gain is optimal
    (the same optimum as the paper's dynamic programme). Budget that no prompt can use with a positive
    gain (e.g. every prompt solved) is spread round-robin, unsolved prompts first.
    """
    k = len(rates)
    if k == 0:
        return []
    if budget < k:
        raise ValueError(f"a budget of {budget} rollouts cannot give each of {k} prompts one")
    low = max(1, min(min_rollouts, budget // k))
    cap = max_rollouts if max_rollouts > 0 else budget
    cap = max(cap, low, -(-budget // k))  # a cap that cannot hold the budget is raised just enough
    counts = [low] * k
    left = budget - low * k
    heap = [(-(knapsack_value(low + 1, p) - knapsack_value(low, p)), i)
            for i, (p, s) in enumerate(zip(rates, solved)) if not s and low < cap]
    heapq.heapify(heap)
    while left > 0 and heap:
        gain, i = heapq.heappop(heap)
        if gain >= 0:  # no positive gain is left (ties broken by index)
            heapq.heappush(heap, (gain, i))
            break
        counts[i] += 1
        left -= 1
        if counts[i] < cap:
            p = rates[i]
            heapq.heappush(heap, (-(knapsack_value(counts[i] + 1, p) - knapsack_value(counts[i], p)), i))
    order = [i for i in range(k) if not solved[i]] + [i for i in range(k) if solved[i]]
    while left > 0:  # spread what has no use, unsolved prompts first
        for i in order:
            if left and counts[i] < cap:
                counts[i] += 1
                left -= 1
    return counts


def groups_of(rollouts: Rollouts) -> list[tuple[str, list[float], list[str]]]:
    """(prompt text, rewards, completions) for each group of a scored batch, in group order."""
    if rollouts.rewards is None:
        raise ValueError("the batch has no rewards; prompt selection needs a [[reward]] table")
    rewards = rollouts.rewards.detach().float().cpu()
    if rewards.dim() == 2:  # process rewards: the completion's total
        rewards = rewards.sum(dim=1)
    ids = rollouts.group_ids.detach().cpu()
    out = []
    for g in torch.unique(ids, sorted=True).tolist():
        idx = (ids == g).nonzero().flatten().tolist()
        out.append((rollouts.prompts[idx[0]], [float(rewards[i]) for i in idx],
                    [rollouts.completions[i] if rollouts.completions else "" for i in idx]))
    return out


# ------------------------------------------------------------------------------------ the base
class _SelectingSampler:
    """Shared machinery: generation options, candidates, success counting, RNG and checkpoint state."""

    requires: tuple[str, ...] = ("rewards",)
    provides: tuple[str, ...] = ()

    def _setup(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int, min_new_tokens: int,
               chat_template: bool, batch_size: int, candidates: int, success_threshold: float,
               seed: int) -> None:
        if candidates < 1:
            raise ValueError(f"candidates = {candidates}: must be >= 1 (candidate prompts per trained prompt)")
        self.generator = HFGenerateSampler(max_new_tokens, temperature, top_p, top_k, min_new_tokens,
                                           chat_template, batch_size)
        self.chat_template = chat_template  # evaluation renders prompts the same way
        self.candidates_per_prompt = candidates
        self.success_threshold = success_threshold
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    # selection ------------------------------------------------------------------------------
    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Priority of each candidate (higher is picked first)."""
        raise NotImplementedError

    def select(self, prompts: Sequence[Prompt], n: int) -> list[int]:
        """Indices of the ``n`` candidates to train on (distinct texts while there are enough)."""
        texts = [p.text for p in prompts]
        scores = np.asarray(self.scores(texts), dtype=np.float64)
        shuffled = self.rng.permutation(len(texts))  # random tie-breaking
        order = shuffled[np.argsort(-scores[shuffled], kind="stable")].tolist()
        return _take_distinct(order, texts, n)

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        n = max(1, len(prompts) // self.candidates_per_prompt)
        picked = self.select(prompts, n)
        return self.generator.sample(policy, [prompts[i] for i in picked], group_size)

    # statistics -----------------------------------------------------------------------------
    def observe(self, rollouts: Rollouts) -> None:
        for text, rewards, completions in groups_of(rollouts):
            successes = sum(r >= self.success_threshold for r in rewards)
            self.update(text, successes, len(rewards), completions)

    def update(self, text: str, successes: int, trials: int, completions: Sequence[str]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "stats": self._stats_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._load_stats(state["stats"])

    def _stats_state(self) -> Any:
        return {text: list(values) for text, values in self.stats.items()}

    def _load_stats(self, stats: Any) -> None:
        self.stats = {text: list(values) for text, values in stats.items()}


def _take_distinct(order: Sequence[int], texts: Sequence[str], n: int) -> list[int]:
    picked, seen = [], set()
    for i in order:
        if len(picked) < n and texts[i] not in seen:
            picked.append(i)
            seen.add(texts[i])
    for i in order:  # fewer distinct prompts than wanted: repeat the best ones
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    while len(picked) < n:
        picked.append(order[len(picked) % len(order)])
    return picked


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} = {value}: accepted values are in [0, 1]")


def _check_decay(decay: float) -> None:
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay = {decay}: accepted values are in (0, 1] (1 = never forget)")


# --------------------------------------------------------------------------------------- MoPPS
class MoPPSSampler(_SelectingSampler):
    """MoPPS ("Can Prompt Difficulty be Online Predicted for Accelerating RL Finetuning of Reasoning
    Models?"): each prompt's success rate has a Beta(alpha, beta) posterior, starting from the prior
    Beta(``prior_alpha``, ``prior_beta``). After a group of k completions with s successes:

        alpha <- decay * alpha + (1 - decay) * prior_alpha + s
        beta  <- decay * beta  + (1 - decay) * prior_beta  + (k - s)

    (``decay`` < 1 forgets old evidence as the policy changes). Selection is Thompson sampling: draw
    p ~ Beta(alpha, beta) for every candidate and keep the ``prompts_per_step`` candidates whose draw is
    closest to ``target`` (0.5: the prompts of most uncertain outcome carry the most signal). No extra
    generation is spent on estimating difficulty.
    """

    def __init__(self, target: float = 0.5, prior_alpha: float = 1.0, prior_beta: float = 1.0,
                 decay: float = 1.0, success_threshold: float = 1.0, candidates: int = 4, seed: int = 0,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0):
        _check_rate("target", target)
        _check_decay(decay)
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"prior_alpha = {prior_alpha}, prior_beta = {prior_beta}: both must be > 0")
        self._setup(max_new_tokens, temperature, top_p, top_k, min_new_tokens, chat_template, batch_size,
                    candidates, success_threshold, seed)
        self.target = target
        self.prior = (prior_alpha, prior_beta)
        self.decay = decay
        self.stats: dict[str, list[float]] = {}  # text -> [alpha, beta]

    def posterior(self, text: str) -> tuple[float, float]:
        alpha, beta = self.stats.get(text, self.prior)
        return float(alpha), float(beta)

    def mean(self, text: str) -> float:
        alpha, beta = self.posterior(text)
        return alpha / (alpha + beta)

    def update(self, text: str, successes: int, trials: int, completions: Sequence[str]) -> None:
        alpha, beta = self.posterior(text)
        a0, b0 = self.prior
        lam = self.decay
        self.stats[text] = [lam * alpha + (1 - lam) * a0 + successes,
                            lam * beta + (1 - lam) * b0 + (trials - successes)]

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        params = np.array([self.posterior(t) for t in texts], dtype=np.float64).reshape(-1, 2)
        draws = self.rng.beta(params[:, 0], params[:, 1])
        return -np.abs(draws - self.target)


# -------------------------------------------------------------------------------- variance_aware
class VarianceAwareSampler(_SelectingSampler):
    """Variance-aware sampling (MMR1, "MMR1: Enhancing Multimodal Reasoning with Variance-Aware Sampling
    and Open Resources"): score each candidate by its outcome variance p (1 - p), p the running success
    rate (successes / trials, both multiplied by ``decay`` before each update), plus
    ``diversity_coef`` times its trajectory diversity (the share of distinct completions in its last
    group, (unique - 1) / (k - 1)), and keep the highest scores. A prompt never seen scores the maximum
    0.25 (+ ``diversity_coef``), so new prompts are tried first. ``uniform_fraction`` of the picks are
    drawn uniformly from the remaining candidates instead (MMR1 mixes both).
    """

    def __init__(self, diversity_coef: float = 0.0, uniform_fraction: float = 0.0, decay: float = 1.0,
                 success_threshold: float = 1.0, candidates: int = 4, seed: int = 0,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0):
        if diversity_coef < 0:
            raise ValueError(f"diversity_coef = {diversity_coef}: must be >= 0")
        _check_rate("uniform_fraction", uniform_fraction)
        _check_decay(decay)
        self._setup(max_new_tokens, temperature, top_p, top_k, min_new_tokens, chat_template, batch_size,
                    candidates, success_threshold, seed)
        self.diversity_coef = diversity_coef
        self.uniform_fraction = uniform_fraction
        self.decay = decay
        self.stats: dict[str, list[float]] = {}  # text -> [successes, trials, diversity]

    def rate(self, text: str) -> float | None:
        """Running success rate, or None for a prompt never seen."""
        stats = self.stats.get(text)
        return None if stats is None or stats[1] <= 0 else stats[0] / stats[1]

    def score(self, text: str) -> float:
        p = self.rate(text)
        if p is None:
            return variance_score(0.5) + self.diversity_coef
        return variance_score(p) + self.diversity_coef * self.stats[text][2]

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.score(t) for t in texts], dtype=np.float64)

    def update(self, text: str, successes: int, trials: int, completions: Sequence[str]) -> None:
        s, n, _ = self.stats.get(text, [0.0, 0.0, 0.0])
        k = len(completions)
        diversity = (len(set(completions)) - 1) / (k - 1) if k > 1 else 0.0
        self.stats[text] = [self.decay * s + successes, self.decay * n + trials, diversity]

    def select(self, prompts: Sequence[Prompt], n: int) -> list[int]:
        uniform = int(round(self.uniform_fraction * n))
        picked = super().select(prompts, n - uniform)
        if uniform:
            rest = [i for i in self.rng.permutation(len(prompts)).tolist() if i not in picked]
            texts = [p.text for p in prompts]
            chosen = {texts[i] for i in picked}
            fresh = [i for i in rest if texts[i] not in chosen]
            picked += (fresh + [i for i in rest if i not in fresh])[:uniform]
        return picked


# ------------------------------------------------------------------------------------- knapsack
class KnapsackSampler(_SelectingSampler):
    """Knapsack RL ("Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation"): the
    step's budget of ``prompts_per_step * group_size`` completions is shared unevenly between prompts.

    A prompt with estimated success rate p given n rollouts is worth
    (1 - p^n - (1 - p)^n) * p (1 - p)^2 (the chance of a non-zero GRPO gradient times the information
    gain of an update) and costs n. The counts maximise the total value under the budget, each between
    ``min_rollouts`` and ``max_rollouts`` (0: no cap); they always add up to the budget. Hard prompts get
    large groups, prompts solved by their whole last group get ``min_rollouts``. p is the posterior mean
    of a Beta(``prior_alpha``, ``prior_beta``) updated as in ``mopps`` (0.5 for a prompt never seen).

    The ``prompts_per_step`` prompts are the candidates of highest value at ``group_size`` rollouts
    (``candidates = 1`` keeps the stream's prompts and only allocates, as in the paper). Groups have
    different sizes; each prompt's completions share one group id.
    """

    def __init__(self, min_rollouts: int = 2, max_rollouts: int = 0, prior_alpha: float = 1.0,
                 prior_beta: float = 1.0, decay: float = 1.0, success_threshold: float = 1.0,
                 candidates: int = 4, seed: int = 0, max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_new_tokens: int = 0, chat_template: bool = False,
                 batch_size: int = 0):
        if min_rollouts < 1:
            raise ValueError(f"min_rollouts = {min_rollouts}: must be >= 1")
        if max_rollouts and max_rollouts < min_rollouts:
            raise ValueError(f"max_rollouts = {max_rollouts}: must be 0 (no cap) or >= min_rollouts "
                             f"({min_rollouts})")
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"prior_alpha = {prior_alpha}, prior_beta = {prior_beta}: both must be > 0")
        _check_decay(decay)
        self._setup(max_new_tokens, temperature, top_p, top_k, min_new_tokens, chat_template, batch_size,
                    candidates, success_threshold, seed)
        self.min_rollouts = min_rollouts
        self.max_rollouts = max_rollouts
        self.prior = (prior_alpha, prior_beta)
        self.decay = decay
        self.stats: dict[str, list[float]] = {}  # text -> [alpha, beta, solved (1.0 / 0.0)]
        self.last_counts: list[int] = []
        self._group_size = 8

    def rate(self, text: str) -> float:
        alpha, beta = self.stats.get(text, [*self.prior, 0.0])[:2]
        return alpha / (alpha + beta)

    def solved(self, text: str) -> bool:
        return bool(self.stats.get(text, [0.0, 0.0, 0.0])[2])

    def update(self, text: str, successes: int, trials: int, completions: Sequence[str]) -> None:
        alpha, beta = self.stats.get(text, [*self.prior, 0.0])[:2]
        a0, b0 = self.prior
        lam = self.decay
        self.stats[text] = [lam * alpha + (1 - lam) * a0 + successes,
                            lam * beta + (1 - lam) * b0 + (trials - successes), float(successes == trials)]

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([-1.0 if self.solved(t) else knapsack_value(self._group_size, self.rate(t))
                         for t in texts], dtype=np.float64)

    def allocate(self, texts: Sequence[str], budget: int) -> list[int]:
        return allocate_rollouts([self.rate(t) for t in texts], [self.solved(t) for t in texts], budget,
                                 self.min_rollouts, self.max_rollouts)

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        self._group_size = group_size
        n = max(1, len(prompts) // self.candidates_per_prompt)
        chosen = [prompts[i] for i in self.select(prompts, n)]
        counts = self.allocate([p.text for p in chosen], n * group_size)
        self.last_counts = counts
        expanded = [p for p, c in zip(chosen, counts) for _ in range(c)]
        g = self.generator
        batch = generate(policy, expanded, 1, max_new_tokens=g.max_new_tokens, do_sample=True,
                         temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                         min_new_tokens=g.min_new_tokens, chat_template=g.chat_template,
                         batch_size=g.batch_size * group_size)
        batch.group_ids = torch.repeat_interleave(torch.arange(len(chosen)), torch.tensor(counts)).to(
            batch.group_ids.device)
        for info, count in zip(batch.info, (c for c in counts for _ in range(c))):
            info["rollouts"] = count
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "group_size": self._group_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._group_size = int(state.get("group_size", self._group_size))


# ---------------------------------------------------------------------------- history resampling
class HistoryResamplingSampler(_SelectingSampler):
    """History resampling (SRPO, "SRPO: A Cross-Domain Implementation of Large-Scale Reasoning
    Reinforcement Learning"): a prompt whose whole group was answered correctly (every completion's
    reward >= ``success_threshold``) is too easy to teach anything and is not drawn again; prompts with
    mixed or all-wrong groups stay. Among the candidates the sampler takes prompts that were never
    fully solved, in random order; only when too few remain does it fall back on solved ones.
    """

    def __init__(self, success_threshold: float = 1.0, candidates: int = 4, seed: int = 0,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0):
        self._setup(max_new_tokens, temperature, top_p, top_k, min_new_tokens, chat_template, batch_size,
                    candidates, success_threshold, seed)
        self.excluded: set[str] = set()

    def is_excluded(self, text: str) -> bool:
        return text in self.excluded

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([0.0 if t in self.excluded else 1.0 for t in texts], dtype=np.float64)

    def update(self, text: str, successes: int, trials: int, completions: Sequence[str]) -> None:
        if trials and successes == trials:
            self.excluded.add(text)

    def _stats_state(self) -> Any:
        return sorted(self.excluded)

    def _load_stats(self, stats: Any) -> None:
        self.excluded = set(stats)


@hookimpl
def rlctl_register_samplers(register):
    register("mopps", MoPPSSampler)
    register("variance_aware", VarianceAwareSampler)
    register("knapsack", KnapsackSampler)
    register("history_resampling", HistoryResamplingSampler)
