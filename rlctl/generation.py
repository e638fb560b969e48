"""Batched generation with ``transformers``' ``generate``: prompts in, ``Rollouts`` out.

Shared by the ``hf`` sampler and by evaluation (greedy), so both tokenise, pad and mask alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlctl.rollouts import Prompt, Rollouts


def encode_prompts(tokenizer: Any, texts: Sequence[str], chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and mask (optionally rendered through the tokenizer's chat template)."""
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts
        ]
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=not chat_template)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


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
             min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0) -> Rollouts:
    """``group_size`` completions per prompt (group ``i`` = prompt ``i``), right-padded and masked."""
    tok, model = policy.tokenizer, policy.model
    enc = encode_prompts(tok, [p.text for p in prompts], chat_template)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0).to(policy.device)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0).to(policy.device)
    chunk = (batch_size or len(prompts)) * group_size
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    was_training = model.training
    model.eval()
    pieces = []
    for start in range(0, prompt_ids.shape[0], chunk):
        out = model.generate(
            input_ids=prompt_ids[start:start + chunk],
            attention_mask=prompt_mask[start:start + chunk],
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
        pieces.append(out[:, prompt_ids.shape[1]:])
    model.train(was_training)
    width = max(1, max(p.shape[1] for p in pieces))
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=tok.pad_token_id)
                     for p in pieces])
    eos = eos_token_ids(model, tok)
    mask = completion_mask(ids, eos)
    if pieces[0].shape[1] == 0:
        mask.zero_()
    truncated = (~torch.isin(ids, torch.as_tensor(eos, device=ids.device)).any(dim=1)).tolist()
    keep = max(1, int(mask.sum(dim=1).max().item()))  # drop columns that are padding in every row
    ids, mask = ids[:, :keep], mask[:, :keep]
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
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
    )
