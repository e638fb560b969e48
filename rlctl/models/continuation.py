"""Continuing token sequences: the decoding call of a multi-turn sampler.

Each row is a context of token ids (prompt, earlier turns, observations) exactly as the trajectory holds
them; nothing is decoded to text and encoded again. The rows are left-padded into one batch and decoded
by the same loop as single-turn sampling (``rlctl.models.generation``), so one turn samples exactly as a
completion would (EOS suppression, temperature, top-k, top-p), and the log-probability of every sampled
token under the distribution it was drawn from comes back with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlctl.models.generation import _decode, eos_token_ids, use_fast_decoding


@dataclass
class Continuation:
    token_ids: list[int]  # up to and including the first EOS
    logprobs: list[float] | None  # behaviour log-probs of those tokens (None with ``model.generate``)
    finished: bool  # ended with EOS


@torch.no_grad()
def continue_contexts(policy: Any, contexts: Sequence[Sequence[int]], *, max_new_tokens: Sequence[int] | int,
                      do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, group_size: int = 1) -> list[Continuation]:
    """One continuation of each context (``group_size`` of each, consecutive, when it is > 1: their
    prompt is prefilled once). ``max_new_tokens`` may differ per output row (a trajectory's remaining
    budget): the batch decodes up to the largest and each row is cut at its own."""
    model, tok = policy.model, policy.tokenizer
    n_out = len(contexts) * group_size
    limits = [max_new_tokens] * n_out if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n_out:
        raise ValueError(f"max_new_tokens has {len(limits)} values for {n_out} rows")
    steps = max(limits, default=0)
    if n_out == 0 or steps <= 0:
        return [Continuation([], [], False) for _ in range(n_out)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, row in enumerate(contexts):
        ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    ids, mask = ids.to(policy.device), mask.to(policy.device)
    eos = eos_token_ids(model, tok)
    was_training = model.training
    model.eval()
    try:
        if use_fast_decoding(model):
            out, logp, _ = _decode(model, ids, mask, group_size, max_new_tokens=steps, min_new_tokens=0,
                                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos=eos, pad_token_id=pad, record_logprobs=True)
        else:
            sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
            generated = model.generate(input_ids=ids.repeat_interleave(group_size, 0),
                                       attention_mask=mask.repeat_interleave(group_size, 0), do_sample=do_sample,
                                       max_new_tokens=steps, pad_token_id=pad, **sampling)
            out, logp = generated[:, width:], None
    finally:
        model.train(was_training)
    results = []
    eos_set = set(eos)
    for r in range(n_out):
        row = out[r].tolist()[:limits[r]]
        end = next((k for k, t in enumerate(row) if t in eos_set), None)
        kept = row if end is None else row[:end + 1]
        results.append(Continuation(kept, None if logp is None else logp[r, :len(kept)].tolist(), end is not None))
    return results
