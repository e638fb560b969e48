"""The model layer, one job per module.

``policy`` (the ``Policy`` a sampler receives, reference copies, the model cache), ``tiny`` (tiny
offline models), ``loading`` (``from_pretrained`` with one-line errors), ``gguf`` (GGUF conversion),
``lora`` (adapters through ``peft``), ``value_head``, ``logprobs`` (scoring completions) and
``generation`` (batched decoding). The names below are the ones code imports from ``rlctl.models``.
"""

from rlctl.models.loading import check_chat_template, check_special_tokens, load_policy, resolve_model_path
from rlctl.models.logprobs import SHARED_PROMPT_MIN_SAVING, ForwardOut, score_completions, selective_logprobs
from rlctl.models.policy import Policy, cache_dir, frozen_copy
from rlctl.models.tiny import SPECIAL_TOKENS, TINY_MARKER, build_tiny_model, build_tokenizer, tiny_spec
from rlctl.models.value_head import ValueHead

__all__ = [
    "SHARED_PROMPT_MIN_SAVING", "SPECIAL_TOKENS", "TINY_MARKER", "ForwardOut", "Policy", "ValueHead",
    "build_tiny_model", "build_tokenizer", "cache_dir", "check_chat_template", "check_special_tokens",
    "frozen_copy", "load_policy", "resolve_model_path", "score_completions", "selective_logprobs", "tiny_spec",
]
