"""Prompts: the ``[data]`` sources and the seeded prompt stream the trainer draws from.

This package gathers the data API under one name; each part lives in its own module:

- ``sources``: the data sources (``arithmetic``, ``jsonl``, ``hf``) and ``SOURCES``, name -> source
- ``word_problems``: the ``word_problems`` source
- ``rows``: reading and validating JSON Lines rows, and turning them into prompts
- ``load``: checking a ``[data]`` table and loading its prompts
- ``stream``: ``PromptStream``
"""

from __future__ import annotations

from rlctl.data.load import check_data_config, load_prompts
from rlctl.data.rows import MAX_NESTING, read_jsonl, rows_to_prompts, write_jsonl
from rlctl.data.sources import SOURCES, Split, arithmetic, hf, jsonl
from rlctl.data.stream import PromptStream
from rlctl.data.word_problems import word_problems
from rlctl.errors import DataError

__all__ = [
    "MAX_NESTING", "SOURCES", "DataError", "PromptStream", "Split", "arithmetic", "check_data_config", "hf",
    "jsonl", "load_prompts", "read_jsonl", "rows_to_prompts", "word_problems", "write_jsonl",
]
