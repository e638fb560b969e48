"""Batched generation: prompts in, ``Rollouts`` out.

Shared by the ``hf`` sampler and by evaluation (greedy), so both tokenise, pad and mask alike.

Decoder-only models with a ``transformers`` cache are decoded by ``_decode`` below, which samples exactly
as ``model.generate`` does (EOS suppressed before ``min_new_tokens``, then temperature, top-k and top-p,
then a multinomial draw; greedy takes the arg-max) and pads each row after its first EOS, but:

* runs each prompt's prefill once and shares its KV cache across the ``group_size`` completions of the
  prompt (the cache is repeated G times after the prefill instead of prefilling G copies);
* writes new keys/values into buffers allocated once for the whole completion, instead of concatenating
  the cache at every step (which copies the whole cache once per generated token);
* has none of ``generate``'s per-step logits-processor, stopping-criteria and input-preparation overhead.

Other models (encoder-decoders, caches of other kinds) use ``model.generate``; so does every model when
the environment sets ``RLCTL_GENERATE=hf``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from rlctl.rollouts import Prompt, Rollouts


_CONTENT = "rlctlpromptcontent7f3a"  # stands in for the prompt while the chat template is rendered


def encode_prompts(tokenizer: Any, texts: Sequence[str], chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and mask (optionally rendered through the tokenizer's chat template).

    Prompt text is data: special-token text inside it (``<|im_start|>system``) is encoded as plain text
    (``split_special_tokens``). With ``chat_template`` only the template's own markers are special tokens:
    the template is rendered around the prompt and each part is encoded on its own.
    """
    if not chat_template:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                        split_special_tokens=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    def ids(text: str, split: bool = False) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]) if text else []

    parts = render(_CONTENT).split(_CONTENT)  # the template's own text, around each place of the prompt
    rows = []
    for text in texts:
        if len(parts) == 1:  # the template ignores the prompt: nothing of the user's to encode
            rows.append(ids(parts[0]))
            continue
        if len(parts) == 2:
            rendered, (head, tail) = render(text), parts
            if len(rendered) >= len(head) + len(tail) and rendered.startswith(head) and rendered.endswith(tail):
                text = rendered[len(head):len(rendered) - len(tail)]  # the prompt as the template renders it
        row = ids(parts[0])
        for part in parts[1:]:
            row += ids(text, split=True) + ids(part)
        rows.append(row)
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def completion_mask(ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_token_ids), device=ids.device))
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@torch.no_grad()
def generate(policy: Any, prompts: Sequence[Prompt], group_size: int = 1, *, max_new_tokens: int,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0,
             record_logprobs: bool = False) -> Rollouts:
    """``group_size`` completions per prompt (group ``i`` = prompt ``i``), right-padded and masked.

    ``record_logprobs``: also return, as ``behavior_logprobs``, the log-probability of each sampled token
    under the distribution it was drawn from (temperature, EOS ban, top-k, top-p applied), taken from the
    decoding step itself. Only rlctl's own decoding loop records them; with ``model.generate`` they are None.

    Partial rollouts: when ``policy.refresh`` is set it is called between decoding steps; it may load newer
    weights into the model in place and returns the version now loaded. The completions then continue
    with the new weights (the cache of the tokens so far is computed again by them), and
    ``token_versions`` records the version that drew each token.
    """
    tok, model = policy.tokenizer, policy.model
    enc = encode_prompts(tok, [p.text for p in prompts], chat_template)
    device = policy.device
    unique_ids, unique_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    prompt_ids = unique_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = unique_mask.repeat_interleave(group_size, dim=0)
    eos = eos_token_ids(model, tok)
    per_call = batch_size or len(prompts)  # prompts per decoding call
    fast = use_fast_decoding(model)
    refresh = getattr(policy, "refresh", None)
    # ``model.generate`` cannot change weights part-way: the whole batch uses the newest ones at its start,
    # so that a worker scoring its behaviour log-probs afterwards scores it with the weights that drew it
    whole_batch_version = refresh() if refresh is not None and not fast else 0
    was_training = model.training
    model.eval()
    pieces, logp_pieces, version_pieces = [], [], []
    try:
        for start in range(0, len(prompts), per_call):
            rows = slice(start * group_size, (start + per_call) * group_size)
            if fast:
                ids_part, logp_part, version_part = _decode(
                    model, unique_ids[start:start + per_call], unique_mask[start:start + per_call], group_size,
                    max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos=eos, pad_token_id=tok.pad_token_id,
                    record_logprobs=record_logprobs, refresh=refresh)
                pieces.append(ids_part)
                logp_pieces.append(logp_part)
                version_pieces.append(version_part)
                continue
            sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
            out = model.generate(input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                                 do_sample=do_sample, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, pad_token_id=tok.pad_token_id,
                                 synced_gpus=_all_done is not None, **sampling)
            pieces.append(out[:, prompt_ids.shape[1]:])
            version_pieces.append(torch.full(pieces[-1].shape, whole_batch_version, dtype=torch.long,
                                             device=device))
    finally:
        model.train(was_training)
    width = max(1, max(p.shape[1] for p in pieces))
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=tok.pad_token_id)
                     for p in pieces])
    mask = completion_mask(ids, eos)
    if max(p.shape[1] for p in pieces) == 0:
        mask.zero_()
    truncated = (~torch.isin(ids, torch.as_tensor(eos, device=ids.device)).any(dim=1)).tolist()
    keep = max(1, int(mask.sum(dim=1).max().item()))  # drop columns that are padding in every row
    ids, mask = ids[:, :keep], mask[:, :keep]
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    behavior = None
    if record_logprobs and fast:
        behavior = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in logp_pieces])
        behavior = behavior[:, :keep].masked_fill(mask == 0, 0.0)
    versions = None
    if refresh is not None:
        versions = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in version_pieces])
        versions = versions[:, :keep].masked_fill(mask == 0, 0)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=ids,
        completion_mask=mask,
        group_ids=torch.arange(len(prompts), device=ids.device).repeat_interleave(group_size),
        prompts=[p.text for p in prompts for _ in range(group_size)],
        completions=tok.batch_decode(ids, skip_special_tokens=True),
        info=[{"answer": p.answer, **p.info, "truncated": truncated[i * group_size + j]}
              for i, p in enumerate(prompts) for j in range(group_size)],
        temperature=temperature if do_sample else 1.0,
        behavior_logprobs=behavior,
        token_versions=versions,
    )


# ---------------------------------------------------------------------------------- lockstep
# With a sharded model (FSDP2) every forward is a collective: all processes must decode the same number
# of steps. The engine installs ``all_done(local_done) -> bool`` (an all-reduce) for the whole run.
_all_done: Callable[[bool], bool] | None = None


def set_lockstep(all_done: Callable[[bool], bool] | None) -> None:
    """Decode in lockstep with the other processes (``None``: each process stops when it is done)."""
    global _all_done
    _all_done = all_done


def in_lockstep() -> bool:
    """Whether decoding runs in lockstep with other processes (a sharded model): a sampler whose
    processes make different numbers of decoding calls cannot run then."""
    return _all_done is not None


# ------------------------------------------------------------------------------- fast decoding
def use_fast_decoding(model: Any) -> bool:
    """Whether ``generate`` decodes ``model`` itself (else it calls ``model.generate``)."""
    if os.environ.get("RLCTL_GENERATE", "").lower() == "hf":
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:  # a transformers without per-layer caches
        return False
    try:
        cache = new_cache(model)
    except Exception:
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    # lazily built caches start empty; otherwise every layer must be one we know how to repeat
    return all(hasattr(layer, "batch_repeat_interleave") for layer in layers)


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model`` (decoding here, shared prompts in ``rlctl.models.logprobs``)."""
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes ``cache`` to ``model``'s forward: ``cache`` in transformers 5.23 and newer
    (where ``past_key_values`` is deprecated and warns), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes kwargs on
    forward = type(base).forward
    name = _CACHE_KWARG.get(forward)
    if name is None:
        import inspect

        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        _CACHE_KWARG[forward] = name
    return {name: cache, "use_cache": True}


_CACHE_KWARG: dict[Any, str] = {}


def _growing_layer_class() -> type:
    """A ``DynamicLayer`` that writes into buffers sized for the whole completion instead of concatenating."""
    global _GrowingLayer
    if _GrowingLayer is not None:
        return _GrowingLayer
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            b, h, n, d = keys.shape
            self.dtype, self.device = keys.dtype, keys.device
            self._k = keys.new_empty((b, h, capacity, d))
            self._v = values.new_empty((b, h, capacity, values.shape[-1]))
            self._k[:, :, :n].copy_(keys)
            self._v[:, :, :n].copy_(values)
            self._n = n
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            end = self._n + key_states.shape[-2]
            if end > self._k.shape[-2]:  # past the planned length: fall back to concatenation
                return super().update(key_states, value_states, *args, **kwargs)
            self._k[:, :, self._n:end].copy_(key_states)
            self._v[:, :, self._n:end].copy_(value_states)
            self._n = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the rows at ``indices`` (finished rows leave the batch), buffers and all."""
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    _GrowingLayer = GrowingLayer
    return GrowingLayer


_GrowingLayer: type | None = None


def _expand_cache(cache: Any, repeats: int, capacity: int) -> None:
    """Repeat every prompt's cache ``repeats`` times; plain layers move into preallocated buffers."""
    from transformers.cache_utils import DynamicLayer

    growing = _growing_layer_class()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            keys, values = layer.keys, layer.values
            if repeats > 1:
                keys, values = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
            cache.layers[i] = growing(keys, values, capacity)
        elif repeats > 1:
            layer.batch_repeat_interleave(repeats)


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row [B, 1] drawn from ``probs`` [B, V].

    On the CPU by inverting each row's cumulative distribution at one uniform number: ``torch.multinomial``
    there draws a random number per vocabulary entry (about 33 ms for 32 rows of 49,152 on one thread,
    against about 10 ms). The sums are float64, so that no token's share of [0, 1) is off by more than
    about 1e-11 (rounding over 49,152 additions); a token of probability 0 is never drawn (its interval
    is empty).
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, num_samples=1)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


def _next_tokens(logits: torch.Tensor, step: int, *, do_sample: bool, temperature: float, top_k: int,
                 top_p: float, min_new_tokens: int, eos: torch.Tensor,
                 record_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row from fp32 logits [B, V], with ``generate``'s processors in its order, and (if
    asked) its log-probability under the processed distribution it was drawn from."""
    if step < min_new_tokens:
        logits = logits.index_fill(1, eos, float("-inf"))
    if not do_sample:
        tokens = logits.argmax(dim=-1)
        return tokens, (torch.zeros(tokens.shape, device=logits.device) if record_logprobs else None)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[:, -1] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    tokens = _draw(probs)
    if not record_logprobs:
        return tokens.squeeze(1), None
    return tokens.squeeze(1), torch.log_softmax(logits, dim=-1).gather(1, tokens).squeeze(1)


def _decode(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, *,
            max_new_tokens: int, min_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
            top_p: float, eos: list[int], pad_token_id: int, record_logprobs: bool = False,
            refresh: Callable[[], int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Completion ids [P * G, steps] (pad after each row's first EOS) for P left-padded prompts, the
    sampled tokens' log-probs [P * G, steps] (zeros unless ``record_logprobs``) and, with ``refresh``
    (partial rollouts, see ``generate``), the weights' version that drew each token [P * G, steps]."""
    device = prompt_ids.device
    n_rows, p_len = prompt_ids.shape[0] * group_size, prompt_ids.shape[1]
    out = torch.full((n_rows, max(0, max_new_tokens)), pad_token_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((n_rows, max(0, max_new_tokens)), dtype=torch.float32, device=device)
    version = refresh() if refresh is not None else 0
    out_version = None if refresh is None else torch.full_like(out, version)
    if max_new_tokens <= 0:
        return out, out_logp, out_version
    padded = not bool(prompt_mask.all())
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    capacity = p_len + max_new_tokens
    cache, logits = _prefill(model, prompt_ids, prompt_mask if padded else None, positions, group_size, capacity)
    # the attention mask of every row for the whole completion, passed as growing views; with SDPA
    # attention it is already the [B, 1, 1, keys] boolean mask of one query, which the model uses as is
    full_mask = None
    if padded:
        as_4d = getattr(model.config, "_attn_implementation", None) == "sdpa"
        shape = (n_rows, 1, 1, p_len + max_new_tokens) if as_4d else (n_rows, p_len + max_new_tokens)
        full_mask = torch.ones(shape, dtype=torch.bool if as_4d else prompt_mask.dtype, device=device)
        full_mask[..., :p_len] = prompt_mask.repeat_interleave(group_size, dim=0).view(
            shape[:-1] + (p_len,)).to(full_mask.dtype)
    next_pos = positions[:, -1:].repeat_interleave(group_size, dim=0) + 1
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    unfinished = torch.ones(n_rows, dtype=torch.bool, device=device)
    # the rows still in the decoding batch (indices into the P * G rows); finished rows leave it
    active = torch.arange(n_rows, device=device)
    compact = os.environ.get("RLCTL_DECODE_COMPACT", "1") != "0" and _can_select_rows(cache)
    check_every = 1 if device.type == "cpu" else 8  # how often to look for "all rows finished" (a sync)
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "min_new_tokens": min_new_tokens, "eos": eos_t, "record_logprobs": record_logprobs}
    steps = max_new_tokens
    for step in range(max_new_tokens):
        tokens, logp = _next_tokens(logits, step, **sampling)
        tokens = torch.where(unfinished[active], tokens, pad_token_id)
        out[active, step] = tokens
        if logp is not None:
            out_logp[active, step] = logp
        if out_version is not None:
            out_version[:, step] = version
        unfinished[active] &= ~torch.isin(tokens, eos_t)
        if step + 1 == max_new_tokens:
            break
        if _all_done is not None:  # sharded model: every process runs each forward, until all are done
            if _all_done(not bool(unfinished.any())):
                steps = step + 1
                break
        elif (step + 1) % check_every == 0 and not bool(unfinished.any()):
            steps = step + 1
            break
        if compact and (step + 1) % check_every == 0 and _worth_compacting(unfinished[active]):
            # finished rows leave the batch and its cache: later steps compute only the rows still going
            keep = unfinished[active].nonzero().squeeze(-1)
            active, tokens, next_pos = active[keep], tokens[keep], next_pos[keep]
            full_mask = None if full_mask is None else full_mask[keep]
            for layer in cache.layers:
                layer.batch_select_indices(keep)
        if refresh is not None and (newest := refresh()) != version:
            # partial rollouts: newer weights were loaded. The cache of the tokens so far came from the
            # old ones; compute it again, so that every later token is drawn from exactly the new policy
            version = newest
            rows_ids = torch.cat([prompt_ids.repeat_interleave(group_size, dim=0)[active],
                                  out[active, :step + 1]], dim=1)
            rows_mask = None
            if padded:
                rows_mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0)[active],
                                       torch.ones_like(out[active, :step + 1], dtype=prompt_mask.dtype)], dim=1)
            rows_pos = torch.cat([positions.repeat_interleave(group_size, dim=0)[active],
                                  next_pos + torch.arange(step + 1, device=device)], dim=1)
            cache, logits = _prefill(model, rows_ids, rows_mask, rows_pos, 1, capacity)
            compact = compact and _can_select_rows(cache)
            continue
        mask = None if full_mask is None else full_mask[..., :p_len + step + 1]
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos + step,
                       logits_to_keep=1, **with_cache(model, cache)).logits[:, -1, :].float()
    return (out[:, :steps], out_logp[:, :steps], None if out_version is None else out_version[:, :steps])


def _can_select_rows(cache: Any) -> bool:
    """Whether every layer of ``cache`` can drop rows (finished completions) in place."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, "batch_select_indices") for layer in layers)


# drop finished rows once they are this fraction of the batch: each drop copies the cache of the others
COMPACT_FRACTION = 1 / 8


def _worth_compacting(unfinished: torch.Tensor) -> bool:
    """Enough rows finished to be worth dropping, and at least one still going (a batch never empties:
    in lockstep decoding every process runs every forward)."""
    going = int(unfinished.sum())
    done = unfinished.numel() - going
    return going > 0 and done >= max(1, COMPACT_FRACTION * unfinished.numel())


def _prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, repeats: int,
             capacity: int) -> tuple[Any, torch.Tensor]:
    """The cache of ``ids`` (each row repeated ``repeats`` times, in buffers of ``capacity`` tokens) and
    the fp32 logits of every row's next token [rows * repeats, V]."""
    cache = new_cache(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                   **with_cache(model, cache)).logits[:, -1, :]
    _expand_cache(cache, repeats, capacity)
    return cache, logits.float().repeat_interleave(repeats, dim=0)
