"""Prompt sources (``[data] source = ...``): each returns train and held-out eval prompts.

``arithmetic`` (built-in synthetic, verifiable), ``word_problems`` (see ``rlctl.data.word_problems``),
``jsonl`` (local files) and ``hf`` (Hugging Face ``datasets``: a local directory/file or a cached hub
name). The keys of ``[data]`` other than ``source`` are the source's options.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from rlctl.data.rows import read_jsonl, rows_to_prompts
from rlctl.data.word_problems import word_problems
from rlctl.errors import DataError
from rlctl.rollouts import Prompt

Split = tuple[list[Prompt], list[Prompt]]


def arithmetic(num_train: int = 2000, num_eval: int = 200, min_operand: int = 0, max_operand: int = 99,
               ops: list = ["+"], seed: int = 1234, pairs: bool = False) -> Split:  # noqa: B006 (read-only)
    """Problems ``a+b=`` with answer ``a+b``; eval problems never appear in training.

    ``pairs = true`` adds preference pairs: ``info["chosen"]`` is the answer, ``info["rejected"]`` a
    near miss (off by 1 or 10), for the ``pairs`` sampler and preference losses.
    """
    if min_operand > max_operand:
        raise ValueError(f"min_operand = {min_operand} > max_operand = {max_operand}")
    bad = [o for o in ops if o not in ("+", "-", "*")]
    if bad or not ops:
        raise ValueError(f"ops = {ops!r}: accepted operators are '+', '-', '*'")
    space = (max_operand - min_operand + 1) ** 2 * len(ops)
    if num_train + num_eval > space:
        raise ValueError(f"num_train + num_eval = {num_train + num_eval}: only {space} distinct problems exist")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    prompts: list[Prompt] = []
    while len(prompts) < num_train + num_eval:
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(ops)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        info = {"chosen": str(value), "rejected": str(value + rng.choice((-10, -1, 1, 10)))} if pairs else {}
        prompts.append(Prompt(text=f"{a}{op}{b}=", answer=str(value), solution=str(value), info=info))
    return prompts[:num_train], prompts[num_train:]


def jsonl(path: str, eval_path: str = "", prompt_key: str = "prompt", answer_key: str = "answer",
          solution_key: str = "solution", eval_size: int = 0, seed: int = 0) -> Split:
    """Rows of a JSON Lines file; other keys of each row are kept in ``Prompt.info``."""
    rows = read_jsonl(Path(path))
    train = rows_to_prompts(rows, path, prompt_key, answer_key, solution_key)
    if eval_path:
        evals = rows_to_prompts(read_jsonl(Path(eval_path)), eval_path, prompt_key, answer_key, solution_key)
        return train, evals
    return _split(train, eval_size, seed)


def hf(dataset: str, split: str = "train", eval_split: str = "", config: str = "", data_files: str = "",
       prompt_key: str = "prompt", answer_key: str = "answer", solution_key: str = "solution",
       eval_size: int = 0, seed: int = 0) -> Split:
    """A Hugging Face ``datasets`` dataset (needs ``pip install rlctl[datasets]``)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("[data] source = 'hf' needs the datasets package: pip install 'rlctl[datasets]'") from exc
    kwargs: dict[str, Any] = {}
    if data_files:
        kwargs["data_files"] = data_files
    ds = datasets.load_dataset(dataset, config or None, **kwargs)
    if split not in ds:
        raise DataError(f"[data] split = {split!r}: dataset has splits {', '.join(ds)}")
    train = rows_to_prompts(list(ds[split]), dataset, prompt_key, answer_key, solution_key)
    if eval_split:
        if eval_split not in ds:
            raise DataError(f"[data] eval_split = {eval_split!r}: dataset has splits {', '.join(ds)}")
        return train, rows_to_prompts(list(ds[eval_split]), dataset, prompt_key, answer_key, solution_key)
    return _split(train, eval_size, seed)


SOURCES: dict[str, Callable[..., Split]] = {"arithmetic": arithmetic, "word_problems": word_problems,
                                          "jsonl": jsonl, "hf": hf}


def _split(prompts: list[Prompt], eval_size: int, seed: int) -> Split:
    if eval_size <= 0:
        return prompts, []
    if eval_size >= len(prompts):
        raise DataError(f"[data] eval_size = {eval_size}: only {len(prompts)} rows")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    return ([p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held])
