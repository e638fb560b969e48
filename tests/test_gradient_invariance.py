"""The gradient of one optimizer step does not depend on how its mini-batch is split.

For every built-in loss, one training step through the real ``Trainer`` records the gradient that the
optimizer receives; micro-batches of unequal token counts (and left/right padding that differs between
them) must give the same gradient as one pass over the whole mini-batch. The 2-process half of the
invariance is in ``test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch

import rlctl.train.learner as learner_module
from rlctl import testing
from rlctl.hookspecs import hookimpl
from rlctl.ops import aggregate
from rlctl.rollouts import Rollouts
from rlctl.train.learner import Learner
from rlctl_plugins.samplers import HFGenerateSampler


class RaggedSampler(HFGenerateSampler):
    """``hf`` sampling, then each completion cut to a random length (seeded): batches whose rows hold
    very different token counts, as natural EOS gives on a trained model."""

    def __init__(self, max_new_tokens: int = 8, seed: int = 0):
        super().__init__(max_new_tokens=max_new_tokens)
        self.rng = torch.Generator().manual_seed(seed)

    def sample(self, policy, prompts, group_size) -> Rollouts:
        batch = super().sample(policy, prompts, group_size)
        n, t = batch.completion_ids.shape
        keep = torch.randint(1, t + 1, (n,), generator=self.rng)
        cut = torch.arange(t).unsqueeze(0) >= keep.unsqueeze(1)
        batch.completion_mask = batch.completion_mask.masked_fill(cut.to(batch.completion_mask.device), 0)
        batch.completion_ids = batch.completion_ids.masked_fill(cut.to(batch.completion_ids.device),
                                                                policy.tokenizer.pad_token_id)
        return batch


class LengthReward:
    """Completion length in tokens: rewards that differ inside every group (a random tiny model never
    answers correctly, so a correctness reward would leave every advantage, and gradient, at zero)."""

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return rollouts.completion_mask.sum(-1).float()


class _Plugin:
    @hookimpl
    def rlctl_register_samplers(self, register):
        register("ragged", RaggedSampler)

    @hookimpl
    def rlctl_register_rewards(self, register):
        register("test_length", LengthReward)


PLUGIN = _Plugin()

RL = '[sampler]\nuse = "ragged"\n\n[[reward]]\nuse = "test_length"\n\n[advantage]\nuse = "grpo"\n'
CASES = {
    "ppo_clip token-mean": RL + '[loss]\nuse = "ppo_clip"\n',
    "ppo_clip seq-mean-token-mean": RL + '[loss]\nuse = "ppo_clip"\naggregation = "seq-mean-token-mean"\n',
    "ppo_clip seq-mean-token-sum": RL + '[loss]\nuse = "ppo_clip"\naggregation = "seq-mean-token-sum"\n',
    "ppo_clip constant (Dr. GRPO)": RL + '[loss]\nuse = "ppo_clip"\naggregation = "constant"\nnormalizer = 8\n',
    "ppo_clip with KL and entropy": RL + '[loss]\nuse = "ppo_clip"\nkl_coef = 0.1\nentropy_coef = 0.01\n',
    "gspo": RL + '[loss]\nuse = "gspo"\n',
    "ngrpo_clip": RL.replace('"grpo"', '"ngrpo"') + '[loss]\nuse = "ngrpo_clip"\n',
    "ppo (value loss)": RL.replace('"grpo"', '"gae"') + '[loss]\nuse = "ppo"\n',
    "sft": '[sampler]\nuse = "demonstrations"\n\n[loss]\nuse = "sft"\n',
    "nested_is": ('[sampler]\nuse = "nested"\nmax_new_tokens = 24\nskip_ratio = 0.5\n\n[[reward]]\nuse = "test_length"\n\n'
                  '[advantage]\nuse = "grpo"\n\n[loss]\nuse = "nested_is"\n'),
    "prefix_pg": ('[sampler]\nuse = "prefix"\nmax_new_tokens = 8\nmin_ratio = 0.0\nmax_ratio = 1.0\n\n'
                  '[[reward]]\nuse = "test_length"\n\n[advantage]\nuse = "grpo"\n\n[loss]\nuse = "prefix_pg"\n'),
    "mixed": ('[sampler]\nuse = "mixed"\nmax_new_tokens = 8\n\n[[reward]]\nuse = "test_length"\n\n'
              '[advantage]\nuse = "grpo"\n\n[loss]\nuse = "mixed"\n'),
}
for _loss in ("dpo", "ipo", "simpo", "rdpo"):
    CASES[_loss] = f'[sampler]\nuse = "pairs"\n\n[[reward]]\nuse = "test_length"\n\n[loss]\nuse = "{_loss}"\n'
CASES["margin_dpo"] = ('[sampler]\nuse = "pairs"\n\n[[reward]]\nuse = "test_length"\n\n[loss]\nuse = "margin_dpo"\n'
                       'margin_key = "chosen"\nmargin_scale = 0.01\n')


def _recipe(model_dir, body: str) -> str:
    return f"""
[model]
name = "{model_dir}"

[data]
source = "arithmetic"
num_train = 64
num_eval = 4
max_operand = 999
pairs = true

{body}
[train]
steps = 1
lr = 1e-3
prompts_per_step = 6
group_size = 3
seed = 3
max_grad_norm = 0.0
save_final = false
"""


def _first_step_gradient(model_dir, body, micro_batch_size, tmp_path, monkeypatch, name):
    """The flat gradient (policy and value head) the optimizer receives at the first step."""
    seen: list[tuple[torch.Tensor, list[int]]] = []
    original_clip, original_micro = Learner.clip, learner_module.micro_batches
    splits: list[int] = []  # micro-batches per mini-batch

    def clip(self, max_norm):
        grads = [p.grad.detach().flatten().clone() for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        seen.append((torch.cat(grads), list(splits)))
        return original_clip(self, max_norm)

    def micro_batches(group_ids, size):
        chunks = original_micro(group_ids, size)
        splits.append(len(chunks))
        return chunks

    monkeypatch.setattr(Learner, "clip", clip)
    monkeypatch.setattr(learner_module, "micro_batches", micro_batches)
    testing.run_recipe(_recipe(model_dir, body), steps=1, plugins=[PLUGIN], output_dir=tmp_path / name,
                       overrides=[f"train.micro_batch_size={micro_batch_size}"])
    monkeypatch.undo()
    assert seen, "no optimizer step was taken"
    return seen[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_micro_batches_do_not_change_the_gradient(case, tiny_model_dir, tmp_path, monkeypatch):
    body = CASES[case]
    whole, splits_whole = _first_step_gradient(tiny_model_dir, body, 0, tmp_path, monkeypatch, "whole")
    split, splits = _first_step_gradient(tiny_model_dir, body, 2, tmp_path, monkeypatch, "split")
    assert splits_whole == [1] and splits[0] >= 2, (splits_whole, splits)  # the split really happened
    assert whole.abs().max() > 0
    torch.testing.assert_close(split, whole, rtol=2e-4, atol=2e-6)


def test_micro_batch_shares_add_up_to_the_whole_batch_loss():
    """By hand: two rows of 3 and 1 tokens with per-token losses 1, 2, 3 | 10. Token-mean over the batch is
    16 / 4 = 4; a micro-batch of the first row alone must contribute 6 / 4 (not 6 / 3), the second 10 / 4."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    totals = {"tokens": 4.0, "sequences": 2.0}
    assert aggregate(per_token, mask).item() == pytest.approx(4.0)
    first = aggregate(per_token[:1], mask[:1], totals=totals)
    second = aggregate(per_token[1:], mask[1:], totals=totals)
    assert first.item() == pytest.approx(1.5) and second.item() == pytest.approx(2.5)
    # seq-mean-token-mean: (2 + 10) / 2 = 6 = 2 / 2 + 10 / 2
    assert aggregate(per_token[:1], mask[:1], "seq-mean-token-mean", totals=totals).item() == pytest.approx(1.0)
    assert aggregate(per_token[1:], mask[1:], "seq-mean-token-mean", totals=totals).item() == pytest.approx(5.0)
    # constant, normalizer 3: 16 / (2 * 3); the first row's share 6 / 6 = 1
    assert aggregate(per_token[:1], mask[:1], "constant", 3, totals=totals).item() == pytest.approx(1.0)
