"""Arithmetic word problems with verifiable answers (data source ``word_problems``).

One-step problems ("Mia has 23 stickers. She gets 58 more. How many stickers does she have now?") in a
few phrasings per operation, drawn with a seed; evaluation problems never appear in training (no two
problems share their numbers, operation and phrasing). Small enough for a 135M instruct model to get
some right from the start and learn the rest: the task of the real-model recipe.
"""

from __future__ import annotations

import random

from rlctl.rollouts import Prompt

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Lily", "Omar", "Nora", "Ravi")
THINGS = ("apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies")
TEMPLATES = {
    "+": ("{name} has {a} {things}. {pronoun} gets {b} more. How many {things} does {name} have now?",
          "There are {a} {things} in a box and {b} {things} on a table. How many {things} are there in all?"),
    "-": ("{name} has {a} {things} and gives away {b}. How many {things} does {name} have left?",
          "A shop had {a} {things}. It sold {b} of them. How many {things} are left?"),
    "*": ("{name} has {a} bags with {b} {things} in each bag. How many {things} does {name} have?",
          "There are {a} rows of {things} with {b} {things} in each row. How many {things} are there?"),
}
PRONOUNS = {"Mia": "She", "Ava": "She", "Zoe": "She", "Ivy": "She", "Lily": "She", "Nora": "She"}
INSTRUCTION = " Answer with the number only."


def calculator_call(expression: str) -> str:
    """A call of the built-in calculator tool in the documented tag format."""
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>' % expression


def word_problems(num_train: int = 2000, num_eval: int = 200, max_operand: int = 20, ops: list = ["+"],  # noqa: B006
                  instruction: bool = True, seed: int = 1234, min_operand: int = 1,
                  tool_demos: bool = False, tool_demo_rate: float = 1.0) -> tuple[list[Prompt], list[Prompt]]:
    """``num_train`` training and ``num_eval`` held-out problems with operands ``min_operand``..``max_operand``
    (``-``: the first operand is the larger, so answers are >= 0). ``instruction`` appends
    "Answer with the number only." to each question. ``answer`` and ``solution`` are the number.

    ``tool_demos``: also a demonstration of calculator use in ``info["demo_turns"]`` (for the
    ``multi_turn_demonstrations`` sampler): a tool call with the problem's expression, then the answer;
    with ``tool_demo_rate`` < 1, the others (drawn with the seed) answer at once, without the tool.
    """
    if not 0 <= tool_demo_rate <= 1:
        raise ValueError(f"tool_demo_rate = {tool_demo_rate}: accepted values are in [0, 1]")
    if max_operand < 2:
        raise ValueError(f"max_operand = {max_operand}: accepted values are >= 2")
    if not 1 <= min_operand < max_operand:
        raise ValueError(f"min_operand = {min_operand}: accepted values are 1 .. max_operand - 1 ({max_operand - 1})")
    bad = [o for o in ops if o not in TEMPLATES]
    if bad or not ops:
        raise ValueError(f"ops = {ops!r}: accepted operators are {', '.join(repr(o) for o in TEMPLATES)}")
    span = max_operand - min_operand + 1
    space = span * span * sum(len(TEMPLATES[o]) for o in set(ops))
    if num_train + num_eval > space * 3 // 4:  # drawing the last few distinct ones would take long
        raise ValueError(f"num_train + num_eval = {num_train + num_eval}: at most {space * 3 // 4} distinct "
                         f"problems with operands {min_operand}..{max_operand}; widen them")
    rng = random.Random(seed)
    seen: set[tuple[int, int, str, int]] = set()
    prompts: list[Prompt] = []
    while len(prompts) < num_train + num_eval:
        op = rng.choice(ops)
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        form = rng.randrange(len(TEMPLATES[op]))
        if (a, b, op, form) in seen:
            continue
        seen.add((a, b, op, form))
        name = rng.choice(NAMES)
        text = TEMPLATES[op][form].format(name=name, pronoun=PRONOUNS.get(name, "He"), things=rng.choice(THINGS),
                                          a=a, b=b)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        info = {}
        if tool_demos:
            uses_tool = rng.random() < tool_demo_rate
            info["demo_turns"] = [calculator_call(f"{a} {op} {b}"), str(value)] if uses_tool else [str(value)]
        prompts.append(Prompt(text=text + (INSTRUCTION if instruction else ""), answer=str(value),
                              solution=str(value), info=info))
    return prompts[:num_train], prompts[num_train:]
