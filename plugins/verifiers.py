"""Rewards and verifiers: symbolic math answers, format checks, length penalties, noisy-verifier
correction, user callables and learned reward models.

Every reward returns raw scores ``Tensor[N]`` (float32, on the CPU); the recipe's ``weight`` and the
sum over ``[[reward]]`` tables are applied by the trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import threading
from typing import Any, Callable, Sequence

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts
from rlctl_plugins.rewards import extract_answer

_BOXED_START = "\\boxed"
_FENCE = "####"


def _as_scores(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


# ------------------------------------------------------------------------------------ math_verify
class MathVerifyReward:
    """1.0 when the completion's final answer is mathematically equal to the reference, else 0.0.

    Parsing and comparison use the ``math-verify`` package (symbolic equality through sympy, so
    ``\\boxed{1/2}`` matches ``0.5`` and ``\\frac{1}{2}``). The answer is taken from the last
    ``\\boxed{...}`` when present, else from the text after the last ``####``, else from the last
    expression or number in the completion. The reference ``info[answer_key]`` is parsed the same
    way (plain numbers and LaTeX without ``$`` delimiters are accepted).

    ``timeout`` bounds parsing and verification of each sample in seconds; it relies on
    ``signal.alarm`` and is only applied on the main thread (elsewhere math-verify runs untimed).
    """

    def __init__(self, answer_key: str = "answer", timeout: int = 5, float_rounding: int = 6):
        if timeout < 0:
            raise ValueError(f"timeout = {timeout}: accepted values are >= 0 seconds (0 = no timeout)")
        if float_rounding < 0:
            raise ValueError(f"float_rounding = {float_rounding}: accepted values are >= 0 digits")
        if importlib.util.find_spec("math_verify") is None:
            raise ValueError("reward 'math_verify' needs the math-verify package: pip install 'rlctl[math]'")
        self.answer_key = answer_key
        self.timeout = timeout
        self.float_rounding = float_rounding

    def _timeout(self) -> int | None:
        main = threading.current_thread() is threading.main_thread()
        return self.timeout if (main and self.timeout) else None

    def _parse(self, text: str, gold: bool = False) -> list:
        from math_verify import parse

        timeout = self._timeout()
        if _BOXED_START not in text and _FENCE in text:
            text = text.rsplit(_FENCE, 1)[1]
        parsed = []
        if gold and "$" not in text and _BOXED_START not in text:
            # a bare reference such as "\frac{1}{2}" or "1 + x^2" is read as LaTeX math
            parsed = parse(f"${text.strip()}$", parsing_timeout=timeout)
        if not parsed:
            parsed = parse(text, parsing_timeout=timeout)
        if not parsed:
            number = extract_answer(text)
            if number is not None:
                parsed = parse(f"${number}$", parsing_timeout=timeout)
        return parsed

    def verify(self, completion: str, gold: Any) -> bool:
        from math_verify import verify

        if gold is None:
            return False
        gold_parsed = self._parse(str(gold), gold=True)
        pred_parsed = self._parse(completion)
        if not gold_parsed or not pred_parsed:
            return False
        try:
            return bool(verify(gold_parsed, pred_parsed, float_rounding=self.float_rounding,
                               timeout_seconds=self._timeout()))
        except Exception:  # a pathological expression is a wrong answer, not a crashed run
            return False

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return _as_scores(
            self.verify(text, info.get(self.answer_key))
            for text, info in zip(rollouts.completions, rollouts.info)
        )


# ----------------------------------------------------------------------------------------- format
class FormatReward:
    """1.0 when the completion matches the regular expression ``pattern``, else 0.0.

    ``mode = "fullmatch"`` requires the whole (stripped) completion to match; ``"search"`` accepts a
    match anywhere. ``dotall`` lets ``.`` cross newlines. The default pattern is the R1-style
    ``<think>...</think> <answer>...</answer>`` structure.
    """

    MODES = ("fullmatch", "search")

    def __init__(self, pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>",
                 mode: str = "fullmatch", dotall: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"mode = {mode!r}: accepted values are {', '.join(self.MODES)}")
        try:
            self.regex = re.compile(pattern, re.DOTALL if dotall else 0)
        except re.error as exc:
            raise ValueError(f"pattern = {pattern!r}: accepted values are valid Python regular "
                             f"expressions ({exc})") from exc
        self.mode = mode

    def matches(self, text: str) -> bool:
        if self.mode == "fullmatch":
            return self.regex.fullmatch(text.strip()) is not None
        return self.regex.search(text) is not None

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return _as_scores(self.matches(text) for text in rollouts.completions)


# ----------------------------------------------------------------------------------------- length
class LengthPenalty:
    """Soft overlong penalty (DAPO, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").

    With L the completion length, s = ``soft_limit``, h = ``hard_limit`` and p = ``penalty``::

        r = 0                    if L <= s
        r = -p (L - s) / (h - s) if s < L <= h
        r = -p                   if L > h

    ``unit = "tokens"`` measures L as the number of completion tokens (``completion_mask`` sum,
    including EOS); ``"chars"`` as the number of characters of the decoded completion.
    """

    UNITS = ("tokens", "chars")

    def __init__(self, soft_limit: int = 3072, hard_limit: int = 4096, penalty: float = 1.0,
                 unit: str = "tokens"):
        if unit not in self.UNITS:
            raise ValueError(f"unit = {unit!r}: accepted values are {', '.join(self.UNITS)}")
        if soft_limit < 0:
            raise ValueError(f"soft_limit = {soft_limit}: accepted values are >= 0")
        if hard_limit <= soft_limit:
            raise ValueError(f"hard_limit = {hard_limit}: accepted values are > soft_limit ({soft_limit})")
        if penalty < 0:
            raise ValueError(f"penalty = {penalty}: accepted values are >= 0")
        self.soft_limit = soft_limit
        self.hard_limit = hard_limit
        self.penalty = penalty
        self.unit = unit

    def lengths(self, rollouts: Rollouts) -> torch.Tensor:
        if self.unit == "tokens":
            return rollouts.completion_mask.sum(dim=1).float().cpu()
        return torch.tensor([len(t) for t in rollouts.completions], dtype=torch.float32)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        length = self.lengths(rollouts)
        ramp = (length - self.soft_limit) / (self.hard_limit - self.soft_limit)
        return (-self.penalty * ramp.clamp(0.0, 1.0)).to(torch.float32)


# --------------------------------------------------------------------------------- noisy_verifier
class NoisyVerifierReward:
    """Unbiased correction of a binary verifier with known error rates.

    From "Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers": with
    ``rho0`` = P(verifier says 1 | wrong) (false-positive rate) and ``rho1`` = P(verifier says 0 |
    correct) (false-negative rate), the backward-corrected reward of the verifier's output r̃ is::

        r̂ = (r̃ - rho0) / (1 - rho0 - rho1)

    so that E[r̂ | correct] = 1 and E[r̂ | wrong] = 0. The inner ``verifier`` is any registered reward
    (default ``exact``), built with ``verifier_options``.
    """

    def __init__(self, verifier: str = "exact", rho0: float = 0.0, rho1: float = 0.0,
                 verifier_options: dict | None = None):
        from rlctl import plugins

        for name, value in (("rho0", rho0), ("rho1", rho1)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} = {value}: accepted values are in [0, 1)")
        if rho0 + rho1 >= 1.0:
            raise ValueError(f"rho0 + rho1 = {rho0 + rho1}: accepted values are < 1 "
                             "(the verifier must be better than chance)")
        if verifier == "noisy_verifier":
            raise ValueError("verifier = 'noisy_verifier': accepted values are other registered rewards")
        try:
            factory = plugins.get("reward", verifier)
        except Exception as exc:
            raise ValueError(f"verifier = {verifier!r}: {exc}") from exc
        try:
            self.inner = factory(**(verifier_options or {}))
        except TypeError as exc:
            raise ValueError(f"verifier_options = {verifier_options!r}: not accepted by reward "
                             f"{verifier!r} ({exc})") from exc
        self.rho0 = rho0
        self.rho1 = rho1
        self.requires = tuple(getattr(self.inner, "requires", ()) or ())

    def correct(self, observed: torch.Tensor) -> torch.Tensor:
        return (observed.to(torch.float32) - self.rho0) / (1.0 - self.rho0 - self.rho1)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.correct(self.inner.score(rollouts))


# --------------------------------------------------------------------------------------- callable
def check_function(spec: str) -> None:
    """Check ``"package.module:function"`` without running any of its code: the module must be findable
    (``importlib.util.find_spec``, parent packages looked up, not imported); the attribute is checked when
    the module is imported (``import_function``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"function = {spec!r}: accepted values look like 'package.module:function'")
    if not module_exists(module_name):
        raise ValueError(f"function = {spec!r}: cannot find module {module_name!r}; is it installed or on "
                         "PYTHONPATH?")


def module_exists(name: str) -> bool:
    """True if module ``name`` can be imported, found without importing it or its parent packages."""
    import importlib.machinery
    import sys

    if name in sys.modules:
        return True
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name is looked up, not imported
        for i in range(1, len(parts)):
            if spec is None:
                return False
            full, parent = ".".join(parts[: i + 1]), sys.modules.get(".".join(parts[:i]))
            if full in sys.modules:
                spec = sys.modules[full].__spec__ or spec
                continue
            locations = getattr(parent, "__path__", None) if parent else spec.submodule_search_locations
            if not locations:
                return False
            spec = importlib.machinery.PathFinder.find_spec(full, list(locations))
    except (ImportError, ValueError, AttributeError):
        return False
    return spec is not None


def import_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (dotted attributes allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"function = {spec!r}: accepted values look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"function = {spec!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc}); is it installed or on PYTHONPATH?") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"function = {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"function = {spec!r}: {attr!r} is not callable")
    return obj


class CallableReward:
    """Scores from a user function: ``fn(completions, infos, **options) -> list[float]``.

    ``function = "module:function"`` is imported with ``importlib`` (never evaluated); ``completions``
    is the list of decoded completions, ``infos`` the matching ``rollouts.info`` dicts (reference
    ``answer`` and the data row's other fields). The function must return one number per completion.
    While a recipe is only validated (``rlctl validate``) the module is found but not imported.
    """

    def __init__(self, function: str, options: dict | None = None):
        from rlctl.recipe import user_code_allowed

        if not function:
            raise ValueError("function = '': accepted values look like 'package.module:function'")
        self.function = function
        if user_code_allowed():
            self.fn: Callable[..., Any] | None = import_function(function)
        else:
            check_function(function)
            self.fn = None  # imported at the first score
        self.options = dict(options or {})

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        if self.fn is None:
            self.fn = import_function(self.function)
        values = self.fn(list(rollouts.completions), list(rollouts.info), **self.options)
        values = list(values)
        if len(values) != len(rollouts.completions):
            raise ValueError(f"reward function {self.function!r} returned {len(values)} scores "
                             f"for {len(rollouts.completions)} completions")
        return _as_scores(values)


# ----------------------------------------------------------------------------------- reward_model
class RewardModelReward:
    """Scores from a sequence-classification reward model (``AutoModelForSequenceClassification``).

    Each sample is scored on ``prompt + completion`` (or, with ``chat_template``, on the user/assistant
    conversation rendered by the reward model's tokenizer); the reward is the logit ``label`` of the
    model's head. Sequences longer than ``max_length`` tokens keep their end (left truncation).
    Construction only checks the options (and, for a local directory, its config); the model is
    loaded on the first ``score`` call, in evaluation mode, from safetensors weights at ``path``.
    """

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def __init__(self, path: str, label: int = 0, batch_size: int = 8, max_length: int = 2048,
                 chat_template: bool = False, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False):
        if not path:
            raise ValueError("path = '': accepted values are a model directory or Hub name")
        if label < 0:
            raise ValueError(f"label = {label}: accepted values are >= 0")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: accepted values are >= 1")
        if max_length < 1:
            raise ValueError(f"max_length = {max_length}: accepted values are >= 1")
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype = {dtype!r}: accepted values are {', '.join(self.DTYPES)}")
        local = os.path.expanduser(path)
        if os.path.isdir(local):
            path = local
            self._check_label(path, label, trust_remote_code)
        elif path.startswith(("/", ".", "~")):
            raise ValueError(f"path = {path!r}: no such directory")
        self.path = path
        self.label = label
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.model: Any = None
        self.tokenizer: Any = None

    @staticmethod
    def _check_label(path: str, label: int, trust_remote_code: bool) -> None:
        from transformers import AutoConfig

        from rlctl.recipe import user_code_allowed

        if trust_remote_code and not user_code_allowed():
            num_labels = _num_labels(path)  # validation only: the model's own code is trusted at run time
        else:
            try:
                num_labels = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).num_labels
            except (OSError, ValueError) as exc:
                raise ValueError(f"path = {path!r}: not a model directory ({type(exc).__name__}: {exc})") from exc
        if label >= num_labels:
            raise ValueError(f"label = {label}: accepted values are 0..{num_labels - 1} "
                             f"for the model at {path!r}")

    def load(self) -> None:
        """Load the tokenizer and model (once)."""
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        common = {"trust_remote_code": self.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, **common)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=self.DTYPES[self.dtype], use_safetensors=True, **common)
        except (OSError, ValueError) as exc:
            raise ValueError(f"path = {self.path!r}: cannot load a sequence-classification model and its "
                             f"tokenizer ({type(exc).__name__}: {exc})") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.label >= model.config.num_labels:
            raise ValueError(f"label = {self.label}: accepted values are 0..{model.config.num_labels - 1} "
                             f"for the model at {self.path!r}")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model

    def texts(self, rollouts: Rollouts) -> list[str]:
        if not self.chat_template:
            return [p + c for p, c in zip(rollouts.prompts, rollouts.completions)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False)
            for p, c in zip(rollouts.prompts, rollouts.completions)
        ]

    @torch.no_grad()
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        self.load()
        texts = self.texts(rollouts)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=not self.chat_template)
            logits = self.model(input_ids=enc["input_ids"].to(device),
                                attention_mask=enc["attention_mask"].to(device)).logits
            scores.append(logits[:, self.label].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32)


def _num_labels(path: str) -> int:
    """The number of labels in a model directory's ``config.json``, read as data (no model code runs)."""
    import json

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"path = {path!r}: not a model directory (config.json: {exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"path = {path!r}: not a model directory (config.json is not a JSON object)")
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    count = config.get("num_labels", 2)  # transformers' default
    return count if isinstance(count, int) and count > 0 else 2


@hookimpl
def rlctl_register_rewards(register):
    register("math_verify", MathVerifyReward)
    register("format", FormatReward)
    register("length", LengthPenalty)
    register("noisy_verifier", NoisyVerifierReward)
    register("callable", CallableReward)
    register("reward_model", RewardModelReward)
