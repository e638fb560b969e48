"""Chat-template segments as token ids: the prompt (with the tools described) and the observation
inserted after each turn, each rendered once by the tokenizer's chat template.

A segment is rendered with placeholders in place of message contents, so that the template's own text
(role markers, end-of-turn tokens) is encoded with its special tokens and the contents (the task, a tool's
output) are encoded as plain text (``split_special_tokens``): a tool that prints ``<|im_end|>`` cannot end
a turn or forge a message. The policy's own tokens are never re-encoded: only these segments are.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from rlctl.environments import Tool

# the format for models whose chat template has no tool support (documented in docs/environments.md)
TAG_INSTRUCTIONS = ("You can use tools. To call one, answer with only "
                    '<tool_call>{{"name": "<tool>", "arguments": {{...}}}}</tool_call>; '
                    "its result comes back in the next message. Tools: {tools}")


def describe_tools(tools: Sequence[Tool]) -> str:
    """One compact JSON line per tool: name, description and argument schema."""
    return " ".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                               separators=(",", ":")) for t in tools)


class ChatFormat:
    """Token ids of a trajectory's prompt and observations for one tokenizer.

    ``chat_template = False`` uses plain text: the tool instructions and the task, then each observation
    as ``<tool_response>...</tool_response>`` on its own line.
    """

    def __init__(self, tokenizer: Any, chat_template: bool = True, observation_role: str = "tool",
                 system_prompt: str | None = None):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template = true, but the tokenizer has no chat template; set "
                             "chat_template = false for the plain-text format")
        self.tok = tokenizer
        self.chat_template = chat_template
        self.observation_role = observation_role
        self.system_prompt = system_prompt
        self.supports_tools = chat_template and "tools" in (tokenizer.chat_template or "")
        self.eos_text = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
        self._observation_parts: tuple[str, str] | None = None

    # ------------------------------------------------------------------------- encoding
    def _ids(self, text: str, data: bool) -> list[int]:
        if not text:
            return []
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=data)["input_ids"])

    def _render(self, messages: list[dict[str, str]], tools: Sequence[Tool], generation_prompt: bool) -> str:
        kwargs = {"tools": [t.schema() for t in tools]} if tools and self.supports_tools else {}
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                            **kwargs)

    def prompt_ids(self, text: str, tools: Sequence[Tool] = ()) -> list[int]:
        """The prompt of a trajectory, ending where the policy's first turn starts."""
        system = self.system_prompt
        if tools and not self.supports_tools:
            instructions = TAG_INSTRUCTIONS.format(tools=describe_tools(tools))
            system = f"{system}\n{instructions}" if system else instructions
        if not self.chat_template:
            return self._ids(f"{system}\n\n" if system else "", data=False) + self._ids(text, data=True)
        holders = {"user": "\x00rlctl-user\x00"}
        messages = [{"role": "user", "content": holders["user"]}]
        if system:
            holders["system"] = "\x00rlctl-system\x00"
            messages.insert(0, {"role": "system", "content": holders["system"]})
        rendered = self._render(messages, tools, generation_prompt=True)
        contents = {holders["user"]: text, holders.get("system", "\x01"): system or ""}
        return self._encode_with_holders(rendered, contents, data={holders["user"]})

    def _encode_with_holders(self, rendered: str, contents: dict[str, str], data: set[str]) -> list[int]:
        ids: list[int] = []
        rest = rendered
        while rest:
            found = [(rest.find(h), h) for h in contents if h in rest]
            if not found:
                ids += self._ids(rest, data=False)
                break
            at, holder = min(found)
            ids += self._ids(rest[:at], data=False) + self._ids(contents[holder], data=holder in data)
            rest = rest[at + len(holder):]
        return ids

    def observation_ids(self, content: str, turn_finished: bool) -> list[int]:
        """The segment after a policy turn: end of the turn (unless the policy's EOS already ended it),
        the observation as a ``observation_role`` message, and the start of the policy's next turn."""
        if not self.chat_template:
            return self._ids("\n<tool_response>", data=False) + self._ids(content, data=True) + \
                self._ids("</tool_response>\n", data=False)
        head, tail = self._observation_template()
        if turn_finished and self.eos_text and head.startswith(self.eos_text):
            head = head[len(self.eos_text):]  # the sampled EOS is already the end of the turn
        return self._ids(head, data=False) + self._ids(content, data=True) + self._ids(tail, data=False)

    def _observation_template(self) -> tuple[str, str]:
        """The template's text between an assistant message's content and the next generation prompt,
        split around the observation's content (rendered once per tokenizer)."""
        if self._observation_parts is None:
            said, seen = "\x00rlctl-turn\x00", "\x00rlctl-observation\x00"
            rendered = self._render([{"role": "user", "content": "\x00rlctl-user\x00"},
                                     {"role": "assistant", "content": said},
                                     {"role": self.observation_role, "content": seen}], (), True)
            if said not in rendered or seen not in rendered:
                raise ValueError(f"the chat template does not render a message of role "
                                 f"{self.observation_role!r} after the assistant's; set observation_role "
                                 '(e.g. "user") or chat_template = false')
            after = rendered.split(said, 1)[1]
            head, tail = after.split(seen, 1)
            self._observation_parts = (head, tail)
        return self._observation_parts
