"""Prompt selection, budgets and curricula (ALGORITHMS.md section 6): MoPPS, variance-aware sampling,
Knapsack RL, SRPO's history resampling, SFT/RL mixing by step, staged data, and the GSM8K recipe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conftest import grpo_recipe, write_recipe
from rlctl import plugins, testing
from rlctl.errors import RecipeError
from rlctl.metrics import TIMING_FIELDS, read_metrics
from rlctl.recipe import load_recipe
from rlctl.rollouts import Prompt
from rlctl.state import TrainState
from rlctl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = ("mopps", "variance_aware", "knapsack", "history_resampling")


def sampler(name: str, **options):
    return plugins.get("sampler", name)(**options)


def group(text: str, rewards, completions=None):
    """One scored group of completions of the prompt ``text``."""
    return testing.fake_rollouts(rewards=rewards, prompts=[text] * len(rewards), completions=completions)


def prompts(*texts: str) -> list[Prompt]:
    return [Prompt(text=t, answer="1") for t in texts]


# ------------------------------------------------------------------------------------------ MoPPS
def test_mopps_hand_check_beta_posterior():
    s = sampler("mopps")
    assert s.posterior("q") == (1.0, 1.0)
    s.observe(group("q", [1, 1, 1, 0]))
    assert s.posterior("q") == (4.0, 2.0)
    assert s.mean("q") == pytest.approx(0.667, abs=1e-3)


def test_mopps_decay_moves_the_posterior_back_toward_the_prior():
    s = sampler("mopps", decay=0.5)
    s.observe(group("q", [1, 1, 1, 0]))  # 0.5 * (1, 1) + 0.5 * (1, 1) + (3, 1)
    assert s.posterior("q") == (4.0, 2.0)
    s.observe(group("q", [0, 0, 0, 0]))
    assert s.posterior("q") == (0.5 * 4 + 0.5 + 0, 0.5 * 2 + 0.5 + 4)


def test_mopps_prefers_prompts_with_posterior_near_the_target():
    s = sampler("mopps", seed=3)
    s.stats = {"mid": [3.0, 3.0], "easy": [8.0, 2.0], "hard": [2.0, 8.0]}
    candidates = prompts("easy", "mid", "hard")
    picks = Counter(candidates[s.select(candidates, 1)[0]].text for _ in range(2000))
    assert picks["mid"] > 0.5 * 2000
    assert picks["mid"] > picks["easy"] and picks["mid"] > picks["hard"]
    assert picks["easy"] > 0 and picks["hard"] > 0  # Thompson sampling still explores
    # a target of 0.9 prefers the easy prompt
    s.target = 0.9
    picks = Counter(candidates[s.select(candidates, 1)[0]].text for _ in range(500))
    assert picks.most_common(1)[0][0] == "easy"


def test_selection_keeps_prompts_per_step_and_distinct_texts():
    s = sampler("mopps")
    assert s.candidates_per_prompt == 4
    chosen = s.select(prompts("a", "b", "a", "c", "d", "b", "e", "f"), 4)
    texts = [["a", "b", "a", "c", "d", "b", "e", "f"][i] for i in chosen]
    assert len(chosen) == 4 and len(set(texts)) == 4
    assert len(s.select(prompts("a", "a", "a"), 2)) == 2  # too few distinct prompts: repeats


# --------------------------------------------------------------------------------- variance_aware
def test_variance_score_hand_check():
    from rlctl_plugins.selection import variance_score

    assert variance_score(0.5) == 0.25
    assert variance_score(1.0) == 0.0
    assert variance_score(0.0) == 0.0


def test_variance_aware_picks_the_most_uncertain_prompt():
    s = sampler("variance_aware")
    s.observe(group("half", [1, 0, 1, 0]))
    s.observe(group("solved", [1, 1, 1, 1]))
    s.observe(group("hopeless", [0, 0, 0, 0]))
    assert s.rate("half") == 0.5 and s.score("half") == 0.25 and s.score("solved") == 0.0
    candidates = prompts("solved", "hopeless", "half")
    assert all(candidates[s.select(candidates, 1)[0]].text == "half" for _ in range(20))
    assert s.score("never seen") == 0.25  # new prompts are tried first


def test_variance_aware_diversity_bonus_breaks_ties():
    s = sampler("variance_aware", diversity_coef=0.1)
    s.observe(group("same", [1, 0, 1, 0], completions=["x", "x", "y", "y"]))
    s.observe(group("varied", [1, 0, 1, 0], completions=["a", "b", "c", "d"]))
    assert s.score("varied") == pytest.approx(0.25 + 0.1)
    assert s.score("same") == pytest.approx(0.25 + 0.1 / 3)
    candidates = prompts("same", "varied")
    assert candidates[s.select(candidates, 1)[0]].text == "varied"


# ------------------------------------------------------------------------------------- knapsack
def test_knapsack_value_hand_check():
    from rlctl_plugins.selection import knapsack_value

    assert knapsack_value(1, 0.5) == 0.0  # one rollout never has both outcomes
    assert knapsack_value(2, 0.5) == pytest.approx(0.5 * 0.5 * 0.25)
    assert knapsack_value(8, 1.0) == 0.0 and knapsack_value(8, 0.0) == 0.0


def test_knapsack_counts_sum_to_the_budget_and_solved_prompts_get_the_minimum():
    from rlctl_plugins.selection import allocate_rollouts

    rates, solved = [0.5, 0.9, 0.5, 0.1, 0.3], [False, True, False, False, False]
    counts = allocate_rollouts(rates, solved, budget=40, min_rollouts=2)
    assert sum(counts) == 40 and min(counts) >= 2
    assert counts[1] == 2  # solved: the minimum
    assert counts[3] > counts[0]  # the hard prompt needs more rollouts to see a success
    # every prompt solved: the budget is still spent, evenly
    assert allocate_rollouts([0.9, 0.9], [True, True], budget=8) == [4, 4]
    capped = allocate_rollouts([0.1, 0.5, 0.5, 0.5], [False] * 4, budget=32, min_rollouts=2, max_rollouts=10)
    assert sum(capped) == 32 and max(capped) <= 10
    with pytest.raises(ValueError):
        allocate_rollouts([0.5, 0.5, 0.5], [False] * 3, budget=2)


def test_knapsack_sampler_allocates_from_observed_groups():
    s = sampler("knapsack", candidates=1, min_rollouts=2)
    s.observe(group("easy", [1] * 8))
    s.observe(group("hard", [0] * 7 + [1]))
    s.observe(group("mid", [1, 0] * 4))
    assert s.solved("easy") and not s.solved("hard")
    counts = s.allocate(["easy", "hard", "mid"], budget=24)
    assert sum(counts) == 24 and counts[0] == 2 and counts[1] > counts[2]


def test_knapsack_sample_returns_variable_size_groups(tiny_policy):
    s = sampler("knapsack", candidates=1, max_new_tokens=3, seed=1)
    s.observe(group("1+1=", [1, 1, 1, 1]))  # solved
    s.observe(group("2+2=", [0] * 8))  # hard: p = 1/10
    batch = s.sample(tiny_policy, prompts("1+1=", "2+2=", "3+3=", "4+4="), group_size=8)
    assert len(batch) == sum(s.last_counts) == 4 * 8
    sizes = {}
    for g in torch.unique(batch.group_ids).tolist():  # one prompt per group, its size recorded in info
        rows = (batch.group_ids == g).nonzero().flatten().tolist()
        texts = {batch.prompts[i] for i in rows}
        assert len(texts) == 1
        assert all(batch.info[i]["rollouts"] == len(rows) for i in rows)
        sizes[texts.pop()] = len(rows)
    assert sizes["1+1="] == 2 and len(set(sizes.values())) > 1
    assert sizes["2+2="] > sizes["3+3="]


# --------------------------------------------------------------------------- history resampling
def test_history_resampling_excludes_a_prompt_solved_by_its_whole_group():
    s = sampler("history_resampling")
    s.observe(group("solved", [1] * 8))
    s.observe(group("almost", [1] * 7 + [0]))
    assert s.is_excluded("solved") and not s.is_excluded("almost")
    candidates = prompts("solved", "almost", "other")
    for _ in range(20):
        assert "solved" not in {candidates[i].text for i in s.select(candidates, 2)}
    # only solved candidates left: training goes on with them rather than stopping
    assert len(s.select(prompts("solved"), 1)) == 1


def test_success_threshold_applies_to_the_summed_reward():
    s = sampler("history_resampling", success_threshold=1.0)
    s.observe(group("q", [1.1, 1.0, 0.9]))  # e.g. correct + format bonus; one miss
    assert not s.is_excluded("q")
    s.observe(testing.fake_rollouts(rewards=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), prompts=["p", "p"]))
    assert s.is_excluded("p")  # process rewards: each completion's total


# --------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("name", SELECTORS)
def test_state_dict_round_trip(name):
    a = sampler(name, seed=5, candidates=2)
    for i, rewards in enumerate(([1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0])):
        a.observe(group(f"p{i}", rewards, completions=["a", "b", "a", "c"]))
    candidates = prompts("p0", "p1", "p2", "p3", "new1", "new2")
    a.select(candidates, 3)  # advance the RNG
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store JSON
    b = sampler(name, seed=99, candidates=2)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert [b.select(candidates, 3) for _ in range(5)] == [a.select(candidates, 3) for _ in range(5)]


@pytest.mark.parametrize("name", SELECTORS)
def test_same_seed_same_selection(name):
    candidates = prompts(*[f"q{i}" for i in range(12)])
    runs = []
    for seed in (1, 1, 2):
        s = sampler(name, seed=seed)
        runs.append([s.select(candidates, 3) for _ in range(4)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_options_are_recipe_errors(tiny_model_dir, tmp_path):
    for options, message in (("candidates = 0", "candidates = 0"), ("target = 2.0", "target = 2.0"),
                             ("decay = 0.0", "decay = 0.0")):
        text = grpo_recipe(tiny_model_dir).replace('use = "hf"', f'use = "mopps"\n{options}')
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe(tmp_path, text))
    text = grpo_recipe(tiny_model_dir).replace('use = "hf"', 'use = "knapsack"\nmin_rollouts = 4\nmax_rollouts = 2')
    with pytest.raises(RecipeError, match="max_rollouts = 2"):
        load_recipe(write_recipe(tmp_path, text))


# ------------------------------------------------------------------------------- SFT/RL mixing
def test_sft_rl_mix_weight_is_linear_by_step_and_switches_phase_at_the_configured_step():
    linear = plugins.get("scheduler", "sft_rl_mix")(start=1.0, end=0.0)
    assert [linear.weight(s, 5) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    switch = plugins.get("scheduler", "sft_rl_mix")(start=1.0, end=0.0, ramp_start=2, ramp_end=2)
    assert [switch.weight(s, 5) for s in range(5)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    ramp = plugins.get("scheduler", "sft_rl_mix")(start=0.8, end=0.2, ramp_start=1, ramp_end=3)
    assert [ramp.weight(s, 6) for s in range(6)] == pytest.approx([0.8, 0.8, 0.5, 0.2, 0.2, 0.2])


def test_sft_rl_mix_sets_the_weight_on_loss_and_sampler_and_the_lr():
    loss = plugins.get("loss", "mixed")()
    mixed = sampler("mixed")
    sched = plugins.get("scheduler", "sft_rl_mix")(start=1.0, end=0.0, lr_schedule="cosine")
    state = TrainState(stage_step=2, stage_steps=4, base_lr=1.0, components={"loss": loss, "sampler": mixed})
    sched.step(state)
    assert loss.mix_weight == mixed.mix_weight == pytest.approx(1 / 3)  # steps 0..3: 1, 2/3, 1/3, 0
    assert state.lr == pytest.approx(0.5)  # cosine at half way
    state.components = {"loss": plugins.get("loss", "ppo_clip")(), "sampler": sampler("hf")}
    with pytest.raises(ValueError, match="mixing weight"):
        sched.step(state)


def test_mixed_loss_hand_check():
    half = torch.log(torch.tensor(0.5))
    batch = testing.fake_rollouts(num_samples=3, lengths=[2, 2, 2], advantages=[0.0, 1.0, 1.0],
                                  old_logprobs=half.item(),
                                  info=[{"demonstration": True}, {"demonstration": False}, {}])
    logprobs = torch.full((3, 2), half.item(), requires_grad=True)
    loss_fn = plugins.get("loss", "mixed")(weight=0.25)
    loss, stats = loss_fn.compute(batch, logprobs)
    # 0.25 * NLL(demo row) + 0.75 * (-ratio * A) on the sampled rows
    assert_close(loss, torch.tensor(0.25 * 0.6931472 + 0.75 * -1.0))
    assert stats["mix_weight"] == 0.25 and stats["sft_nll"] == pytest.approx(0.6931472)
    loss.backward()
    assert_close(logprobs.grad[0], torch.full((2,), -0.25 / 2))  # NLL gradient on the demonstration
    assert_close(logprobs.grad[1:], torch.full((2, 2), -0.75 / 4))  # policy gradient on sampled rows
    loss_fn.mix_weight = 1.0
    assert_close(loss_fn.compute(batch, logprobs)[0], torch.tensor(0.6931472))  # pure SFT


def test_mixed_sampler_returns_demonstrations_and_samples(tiny_policy):
    data = [Prompt(text=f"{i}+1=", answer=str(i + 1), solution=f"{i}+1={i + 1}") for i in range(4)]
    data.append(Prompt(text="no demo=", answer=None))
    s = sampler("mixed", demo_fraction=0.4, max_new_tokens=3, seed=0)
    assert s.split(data).count(True) == 2
    batch = s.sample(tiny_policy, data, group_size=3)
    demo = [i for i, info in enumerate(batch.info) if info["demonstration"]]
    assert len(demo) == 2 and len(batch) == 2 + 3 * 3
    assert "no demo=" not in {batch.prompts[i] for i in demo}
    for i in demo:
        assert batch.completions[i] == [p.solution for p in data if p.text == batch.prompts[i]][0]
    assert len(set(batch.group_ids.tolist())) == 5  # each demonstration is a group of its own
    s.demo_fraction = None
    s.mix_weight = 1.0  # follows the scheduler's weight: everything with a demonstration is imitated
    assert s.split(data) == [True] * 4 + [False]


# ------------------------------------------------------------------------------------ the runs
def run(tmp_path, text, name="run", overrides=(), **kwargs):
    recipe = load_recipe(write_recipe(tmp_path, text, f"{name}.toml"), overrides)
    trainer = Trainer(recipe, output_dir=tmp_path / name, show_progress=False, **kwargs)
    summary = trainer.run()
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    return trainer, summary, [r for r in rows if "eval" not in r]


def varied_reward(self, rollouts):
    """A reward that varies with the sampled text, so that groups have mixed outcomes."""
    return torch.tensor([float(len(set(text)) % 2) for text in rollouts.completions])


@pytest.fixture
def mixed_outcomes(monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    monkeypatch.setattr(ExactAnswerReward, "score", varied_reward)



@pytest.mark.slow
@pytest.mark.parametrize("name", SELECTORS)
def test_selecting_samplers_train_end_to_end(name, tiny_model_dir, tmp_path, mixed_outcomes):
    text = grpo_recipe(tiny_model_dir, steps=2).replace("prompts_per_step = 4", "prompts_per_step = 2")
    text = text.replace('use = "hf"', f'use = "{name}"\ncandidates = 3\nseed = 1')
    trainer, summary, steps = run(tmp_path, text)
    assert [r["step"] for r in steps] == [0, 1] and summary["steps"] == 2
    for r in steps:
        assert r["samples"] == 2 * 4  # the budget: prompts_per_step x group_size, whatever the split
        assert torch.isfinite(torch.tensor(r["loss"]))
    state = trainer.state.components["sampler"].state_dict()
    json.dumps(state)
    assert state["rng"] != sampler(name, seed=1).state_dict()["rng"]  # it selected
    if name != "history_resampling":  # (which only records fully solved prompts)
        assert len(state["stats"]) >= 2, "observe() saw the trained batches"


@pytest.mark.slow
def test_mopps_state_resumes_exactly(tiny_model_dir, tmp_path, mixed_outcomes):
    text = grpo_recipe(tiny_model_dir, steps=3, extra="save_every = 1\nkeep_checkpoints = 3\n")
    text = text.replace('use = "hf"', 'use = "mopps"\ncandidates = 2\nseed = 4')
    full, _, rows = run(tmp_path, text, name="full")
    final = full.state.components["sampler"].state_dict()
    resumed = Trainer(load_recipe(write_recipe(tmp_path, text, "full.toml")), output_dir=tmp_path / "full",
                      show_progress=False, resume=str(tmp_path / "full" / "checkpoints" / "step-000002"))
    resumed.run()
    assert resumed.state.components["sampler"].state_dict() == final
    again = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "eval" not in r]
    strip = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in again]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


MIX_STAGES = """
[[stage]]
name = "mix"
steps = 3
sampler = {{ use = "mixed", max_new_tokens = 4 }}
loss = {{ use = "mixed" }}
scheduler = {{ use = "sft_rl_mix", start = 1.0, end = 0.0 }}

[[stage]]
name = "rl"
steps = 1
data = {{ source = "arithmetic", num_train = 32, num_eval = 4, ops = ["*"], max_operand = 9 }}
"""


@pytest.mark.slow
def test_sft_rl_mix_and_staged_data_run(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl.data import PromptStream

    seen: list[list[str]] = []
    original = PromptStream.next_batch

    def record(self, n):
        batch = original(self, n)
        seen.append([p.text for p in batch])
        return batch

    monkeypatch.setattr(PromptStream, "next_batch", record)
    text = grpo_recipe(tiny_model_dir).replace("steps = 3\n", "")
    text = text.replace("prompts_per_step = 4", "prompts_per_step = 2")
    _, summary, steps = run(tmp_path, text + MIX_STAGES.format())
    assert [r["stage"] for r in steps] == ["mix"] * 3 + ["rl"]
    mix = steps[:3]
    assert [r["mix_weight"] for r in mix] == [1.0, 0.5, 0.0]
    assert [r["demo_frac"] for r in mix] == [1.0, pytest.approx(1 / 5), 0.0]  # 2 demos; 1 + 1 x 4; 0
    assert [r["samples"] for r in mix] == [2, 1 + 4, 8]
    assert "reward" in mix[0] and "pg_loss" in mix[2]
    # the data switches at the stage boundary: '+' problems, then the rl stage's '*' problems
    assert all("+" in t for batch in seen[:3] for t in batch)
    assert all("*" in t for batch in seen[3:] for t in batch)


# ---------------------------------------------------------------------------- the GSM8K recipe
GSM8K = ROOT / "recipes" / "grpo_gsm8k.toml"
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                 "in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "Betty has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?",
     "answer": "5 boxes hold 5 * 6 = <<5*6=30>>30 eggs.\n#### 30"},
]


def test_gsm8k_recipe_is_a_real_model_grpo_recipe():
    recipe = load_recipe(GSM8K)
    assert recipe.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and recipe.model.tiny is None
    assert recipe.data == {"source": "hf", "dataset": "openai/gsm8k", "config": "main", "split": "train",
                           "eval_split": "test", "prompt_key": "question", "answer_key": "answer"}
    stage = recipe.stages[0]
    assert stage.components["sampler"].options["chat_template"] is True
    assert [r.use for r in stage.components["reward"]] == ["math_verify", "format"]
    assert (stage.components["advantage"].use, stage.components["loss"].use) == ("grpo", "ppo_clip")
    assert recipe.train.mixed_precision == "bf16" and recipe.train.lr == 1e-6 and recipe.train.group_size >= 4


def test_gsm8k_rewards_read_the_answer_format():
    from rlctl.recipe import check_stage_components

    problems: list[str] = []
    math_verify, boxed = check_stage_components(load_recipe(GSM8K).stages[0], problems)["reward"]
    assert not problems
    batch = testing.fake_rollouts(completions=["48 + 24 = 72, so the answer is \\boxed{72}.", "It is 70."],
                                  answers=GSM8K_ROWS[0]["answer"])
    assert math_verify.score(batch).tolist() == [1.0, 0.0]
    assert boxed.score(batch).tolist() == [1.0, 0.0]


def gsm8k_overrides(model_dir: Path, data: Path) -> list[str]:
    return [
        f"model.name={model_dir}",
        "model.dtype=float32",
        # a whole-table override: the hf source's keys (dataset, config, split) do not apply to jsonl
        f'data={{ source = "jsonl", path = "{data}", prompt_key = "question", answer_key = "answer", '
        f'eval_size = 2 }}',
        "sampler.chat_template=false",  # the tiny model's tokenizer has no chat template
        "sampler.max_new_tokens=6",
        "sampler.batch_size=0",
        "train.steps=2",
        "train.prompts_per_step=2",
        "train.group_size=2",
        "train.micro_batch_size=0",
        "train.mixed_precision=no",
        "train.save_every=0",
        "eval.num_prompts=2",
        "eval.every=0",
        "eval.at_start=false",
        "eval.max_new_tokens=6",
    ]


@pytest.mark.slow
def test_gsm8k_recipe_runs_on_a_tiny_model_and_local_jsonl(tiny_model_dir, tmp_path):
    from rlctl.data import write_jsonl

    data = tmp_path / "gsm8k.jsonl"
    write_jsonl(data, GSM8K_ROWS)
    recipe = load_recipe(GSM8K, gsm8k_overrides(tiny_model_dir, data))
    assert recipe.stages[0].components["loss"].use == "ppo_clip"  # the algorithm is left as it is
    trainer = Trainer(recipe, output_dir=tmp_path / "gsm8k", show_progress=False)
    summary = trainer.run()
    rows = read_metrics(tmp_path / "gsm8k" / "metrics.jsonl")
    steps = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in steps] == [0, 1] and summary["steps"] == 2
    for r in steps:
        assert {"reward/math_verify", "reward/boxed", "clip_frac", "grad_norm"} <= set(r)
        assert r["samples"] == 4
    assert "eval/main/accuracy" in summary
