"""Tool-call formats: how a model writes its tool calls, and how an answer is written back.

* "tag" — `<tool>INPUT</tool>`, for tiny models and chat models without a tool template. The
  INPUT goes, as text, to the environment's first tool (its first parameter). A turn also ends
  at `</tool>` (a stop sequence), so the model does not run on past its call; the answer is
  written inline, in the same turn and without any chat template, as `<output>\nTEXT\n</output>\n`
  (an environment's "user" message as `\nTEXT\n`).
* "hermes" — Qwen2.5's (Hermes-style) calls: any number of
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in a turn, which ends at the
  model's EOS (`<|im_end|>`). Answers are messages written by the tokenizer's own chat template
  (Qwen2.5 puts role "tool" in `<tool_response>` blocks of a user turn), followed by the
  template's generation prompt for the next assistant turn.
* "llama3" — Llama 3.1's: `<|python_tag|>CODE` (ended by `<|eom_id|>`) calls the "python" tool
  with CODE; a turn that is one JSON object `{"name": ..., "parameters": {...}}` calls that tool.
  Answers through the chat template as for "hermes" (Llama 3.1 writes role "tool" as `ipython`).

Chat-template answers are the text the template puts between the end of the assistant's turn
and the start of the next one: the template renders a conversation with a sentinel assistant
turn, then that turn plus the answer messages, and the rollout takes what follows the sentinel
(as verl's multi-turn tokenisation does), less the template's end-of-turn marker when the model
already ended its turn with an EOS token of its own. Those tokens are context, never trained.
A call the format cannot read (bad JSON) is a `ToolCall` with `error` set; the environment
answers it with the error, so the model can learn the format.
"""

from __future__ import annotations

import dataclasses
import json
import re

FORMATS = ("tag", "hermes", "llama3")
_SENTINEL = "\u2063CFPO_TURN\u2063"
_TAG = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_LLAMA_ENDS = ("<|eom_id|>", "<|eot_id|>")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call as the model wrote it: `name` (None: the environment's first tool) and either
    `arguments` (keyword arguments) or `text` (the first parameter's value); `error` says why
    the call could not be read (then the rest may be empty)."""

    name: str | None = None
    arguments: dict | None = None
    text: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Message:
    """An environment's answer: role "tool" (a tool's result) or "user" (feedback)."""

    role: str
    content: str


def parse_calls(fmt: str, text: str) -> list[ToolCall]:
    """The tool calls in one turn's text (decoded with its special tokens), in order."""
    if fmt == "tag":
        return [ToolCall(text=body.strip()) for body in _TAG.findall(text)]
    if fmt == "hermes":
        return [_json_call(body, "arguments") for body in _HERMES.findall(text)]
    if fmt == "llama3":
        if _PYTHON_TAG in text:
            code = text.split(_PYTHON_TAG, 1)[1]
            for end in _LLAMA_ENDS:
                code = code.split(end, 1)[0]
            return [ToolCall(name="python", text=code.strip())]
        body = text
        for end in _LLAMA_ENDS:
            body = body.replace(end, "")
        body = body.strip()
        if body.startswith("{") and body.endswith("}"):
            return [_json_call(body, "parameters")]
        return []
    raise ValueError(f"unknown tool-call format {fmt!r}; valid: {FORMATS}")


def _json_call(body: str, arguments_key: str) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(error=f"the tool call is not valid JSON ({e})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall(error='a tool call is a JSON object with a "name" and "' + arguments_key + '"')
    arguments = call.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return ToolCall(name=call["name"], error=f'"{arguments_key}" must be a JSON object')
    return ToolCall(name=call["name"], arguments=arguments)


def stop_strings(fmt: str) -> tuple[str, ...]:
    """Text that ends a turn besides the model's EOS tokens."""
    return {"tag": ("</tool>",), "hermes": (), "llama3": ("<|eom_id|>",)}[fmt]


def stop_token_sequences(tokenizer, strings) -> tuple[tuple[int, ...], ...]:
    """Token sequences that spell each stop string as generated text may tokenise it: on its own
    and after a letter, digit, bracket, space or newline, each the shortest run of final tokens
    whose text contains the string (a BPE may merge its first characters with the text before)."""
    sequences = set()
    for string in strings:
        for context in ("", "a", "1", ")", " ", "\n", "."):
            ids = tokenizer(context + string, add_special_tokens=False)["input_ids"]
            for k in range(1, len(ids) + 1):
                if string in tokenizer.decode(ids[-k:]):
                    sequences.add(tuple(ids[-k:]))
                    break
    return tuple(sorted(sequences))


def observation_text(fmt: str, tokenizer, messages: list[Message], ended_with_eos: bool,
                     eos_texts: tuple[str, ...]) -> str:
    """The text written after a turn for the environment's `messages` (see the module doc)."""
    if fmt == "tag":
        return "".join(f"<output>\n{m.content}\n</output>\n" if m.role == "tool" else f"\n{m.content}\n"
                       for m in messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tool-call format {fmt!r} writes answers with the tokenizer's chat template, "
                         "and this tokenizer has none; use format 'tag'")
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    conversation += [{"role": m.role, "content": m.content} for m in messages]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    suffix = text[text.index(_SENTINEL) + len(_SENTINEL):]
    if ended_with_eos:
        for eos in eos_texts:
            if eos and suffix.startswith(eos):
                return suffix[len(eos):]
    return suffix
