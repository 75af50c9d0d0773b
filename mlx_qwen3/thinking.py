"""Route generated tokens to thinking, answer or tool calls, by token id, never by matching text."""

import json
import re
from dataclasses import dataclass
from typing import Optional

from .tokenizer import StreamingDetokenizer, Tokenizer

THINKING, ANSWER, TOOL_CALL = "thinking", "answer", "tool_call"
_SWITCH = re.compile(r"(?<!\S)/(think|no_think)(?!\S)")


@dataclass
class Event:
    """One piece of output: `type` is thinking, answer or tool_call (`tool_call` holds the parsed call)."""

    type: str
    text: str
    tool_call: Optional[dict] = None
    logprobs: Optional[list] = None  # answer events, with logprobs: the entries of the tokens up to this text


def thinking_wanted(messages: list, enable_thinking: Optional[bool]) -> bool:
    """The mode in effect, as Qwen3 documents it: enable_thinking=False is final; otherwise the
    latest /think or /no_think in a user or system message decides; thinking by default."""
    if enable_thinking is False:
        return False
    for m in reversed(messages):
        content = m.get("content")
        if m.get("role") not in ("user", "system") or not isinstance(content, str):
            continue
        if "/think" in content or "/no_think" in content:  # first: the regex holds the GIL 60 ms on 3.9 MB
            found = _SWITCH.findall(content)
            if found:
                return found[-1] == "think"
    return True


def starts_in_thinking(prompt_ids: list, tokenizer: Tokenizer) -> bool:
    """Whether the prompt leaves a <think> open in the reply it starts (QwQ, *-Thinking-2507)."""
    open_, close = tokenizer.token_id("<think>"), tokenizer.token_id("</think>")
    start = tokenizer.token_id("<|im_start|>")
    tail = prompt_ids
    if start in prompt_ids:
        tail = prompt_ids[len(prompt_ids) - prompt_ids[::-1].index(start):]
    if open_ not in tail:
        return False
    last_open = len(tail) - tail[::-1].index(open_)
    return close not in tail[last_open:]


class ThinkingRouter:
    """A state machine over token ids. The text of each channel is the concatenation of its events;
    newlines at either end of a thought or an answer are dropped, as the chat template drops them."""

    def __init__(self, tokenizer: Tokenizer, thinking: bool = False, tools: bool = True, channels: bool = True):
        self.ids = {name: tokenizer.token_id(tag) for name, tag in (
            ("think", "<think>"), ("end_think", "</think>"), ("tool", "<tool_call>"), ("end_tool", "</tool_call>"))}
        if not tools or not channels:  # no tools were offered: a call the model writes anyway is text of the answer
            self.ids["tool"] = self.ids["end_tool"] = None
        if not channels:  # a raw completion: the tags are text too, and newlines are kept as they come
            self.ids["think"] = self.ids["end_think"] = None
        self.trim = channels
        self.state = THINKING if thinking else ANSWER
        self.texts = {THINKING: "", ANSWER: ""}
        self.tool_calls = []
        self._detok = StreamingDetokenizer(tokenizer)
        self._held = ""  # trailing newlines, emitted only if more text follows
        self._fresh = True  # at the start of a segment, where leading newlines are dropped
        self._tool_text = ""
        self._before_tool = ANSWER

    def feed(self, token: int) -> list:
        ids = self.ids
        if token == ids["think"]:
            return self._switch(THINKING)
        if token == ids["end_think"]:
            return self._switch(ANSWER)
        if token == ids["tool"]:
            events = self._flush()
            self._before_tool, self.state, self._tool_text = self.state, TOOL_CALL, ""
            return events
        if token == ids["end_tool"] and self.state == TOOL_CALL:
            return self._end_tool() + self._switch(self._before_tool)
        return self._text(self._detok.add(token))

    def finish(self) -> list:
        """At the end of generation: what the detokenizer held, and an unterminated tool call."""
        events = self._text(self._detok.flush())
        if self.state == TOOL_CALL:
            events += self._end_tool(incomplete=True)
        self._held = ""
        return events

    def _switch(self, state: str) -> list:
        events = self._flush()
        self.state, self._held, self._fresh = state, "", True
        return events

    def _flush(self) -> list:
        return self._text(self._detok.flush())

    def _text(self, text: str) -> list:
        if not text:
            return []
        if self.state == TOOL_CALL:
            self._tool_text += text
            return []
        if not self.trim:
            self.texts[self.state] += text
            return [Event(self.state, text)]
        if self._fresh:
            text = text.lstrip("\n")
            if not text:
                return []
            self._fresh = False
        body = text.rstrip("\n")
        out, self._held = (self._held + body, text[len(body):]) if body else ("", self._held + text)
        if not out:
            return []
        self.texts[self.state] += out
        return [Event(self.state, out)]

    def _end_tool(self, incomplete: bool = False) -> list:
        raw = self._tool_text.strip()
        call = parse_tool_call(raw)
        if incomplete:
            call = {"name": None, "arguments": None, "error": "the tool call was cut off"}  # not a call to make
        self.tool_calls.append(call)
        return [Event(TOOL_CALL, raw, call)]


def parse_tool_call(raw: str) -> dict:
    """{"name", "arguments"} from the JSON between <tool_call> tags; malformed JSON gives an "error"."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return {"name": None, "arguments": None, "error": f"invalid JSON: {e}"}
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return {"name": None, "arguments": None, "error": "a tool call needs a JSON object with a string 'name'"}
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models send the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": obj["name"], "arguments": args}
