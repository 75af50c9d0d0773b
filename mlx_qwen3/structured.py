"""Structured output: what a reply must match (a JSON Schema, Qwen3's tool calls) as a Grammar, compiled once
with llguidance, and the logits processor (Constraint) that enforces it while decoding."""

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import UserError

# Whitespace the JSON may have between its tokens (pretty-printing ten levels deep fits) and before the value
# (a closed thought is followed by "\n\n"): bounded, so that a model cannot loop on whitespace forever.
WHITESPACE = r"[\x20\x09\x0A\x0D]{0,24}"
# How far back a history may differ from the one seen before (a rewound draft, MAX_DRAFT is 16): the tail read.
REWIND = 64
# An engine's reason in an error message is cut at this length.
REASON = 200


@dataclass(frozen=True)
class Grammar:
    """What a constrained reply must match: llguidance's Lark text. `param`: the request field it comes from,
    `tools`: the tools' names, one rule line each from line 4 on (both for the error a schema that does not
    compile gets)."""

    lark: str
    param: str = "response_format"
    tools: tuple = ()


def json_grammar(schema: Optional[dict] = None, strict: bool = False) -> Grammar:
    """A JSON value, after at most a little whitespace (WHITESPACE).

    Args:
        schema: a JSON Schema; None: any JSON object (response_format json_object).
        strict: every keyword is enforced, and a schema with one the engine does not implement is refused;
            False: those (uniqueItems, not, dependentRequired, a format it does not know) are left unchecked and
            the rest enforced.

    Returns:
        the Grammar.
    """
    if schema is None:
        schema = {"type": "object"}
    return Grammar(f"start: /{WHITESPACE}/ %json {_schema(schema, 'response_format', strict)}")


def tool_grammar(tools: list, name: Optional[str] = None, parallel: bool = True) -> Grammar:
    """Qwen3's tool calls, each `<tool_call>` "\\n" {"name": N, "arguments": ARGS} "\\n" `</tool_call>` (the two
    tags are special tokens, looked up by the Constraint), separated by "\\n", after at most a little whitespace
    (as json_grammar's).

    Args:
        tools: OpenAI function tools, [{"type": "function", "function": {"name", "parameters", ...}}]; ARGS
            must match the named tool's "parameters" (missing or empty: any object), strictly where the
            function says "strict": true (json_grammar's `strict`).
        name: only this tool may be called.
        parallel: one call or more; False: exactly one.

    Returns:
        the Grammar.
    """
    rules, names = [], []
    for tool in tools if isinstance(tools, list) else [None]:
        function = tool.get("function", tool) if isinstance(tool, dict) else None  # (or the function itself)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"each tool must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                            f"not {json.dumps(tool)[:80]}", "tools", "invalid_schema")
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        names.append(function["name"])
        name_text = json.dumps(json.dumps(function["name"], ensure_ascii=False), ensure_ascii=False)  # as the template
        strict = function.get("strict") is True
        rules.append(f'{name_text} /, ?"arguments": ?/ %json {_schema(parameters, "tools", strict)}')
    if not rules:
        raise UserError(f"no tool is named {name!r}" if name is not None else "tools is empty: nothing to call",
                        "tools", "invalid_schema")
    calls = "call (\"\\n\" call)*" if parallel else "call"
    # Qwen3 writes '\n{"name": "f", "arguments": {...}}\n'; a newline inside the tags and a space after ':' and
    # ',' are the model's to write or not (never more: a weak model could pad a call with blanks)
    lines = [f"start: /{WHITESPACE}/ {calls}",
             'call: <[TOOL_CALL]> /\\n?\\{"name": ?/ named "}" /\\n?/ <[END_TOOL_CALL]>',
             "named: " + " | ".join(f"tool_{i}" for i in range(len(rules)))]
    lines += [f"tool_{i}: {rule}" for i, rule in enumerate(rules)]  # one line each, for the error that names one
    return Grammar("\n".join(lines), "tools", tuple(names))


def either(answer: Grammar, calls: Grammar) -> Grammar:
    """A JSON answer (json_grammar) or tool calls (tool_grammar): response_format with tools the model may call.
    The schemas are each compiled alone first (constraint() on each), so an error names its own field."""
    rules = calls.lark.replace("start:", "calls:", 1) + "\n" + answer.lark.replace("start:", "answer:", 1)
    return Grammar(rules + "\nstart: answer | calls", calls.param, calls.tools)


def _schema(schema: dict, param: str, strict: bool) -> str:
    """The schema as %json takes it, with our whitespace rule; not strict: lenient (keywords not implemented
    are ignored; a schema that is wrong is still refused)."""
    if not isinstance(schema, dict):
        raise UserError(f"a JSON schema must be an object, not {type(schema).__name__}", param, "invalid_schema")
    try:
        return json.dumps({**schema, "x-guidance": {"whitespace_pattern": WHITESPACE, "lenient": not strict}})
    except (TypeError, ValueError) as e:
        raise UserError(f"the JSON schema cannot be serialized ({e})", param, "invalid_schema") from None


def constraint(tokenizer, vocab_size: int, grammar: Grammar, thinking: bool, trigger: Optional[int] = None,
               may_think: bool = False) -> "Constraint":
    """The logits processor that enforces `grammar`.

    Args:
        tokenizer: the model's mlx_qwen3.tokenizer.Tokenizer.
        vocab_size: the rows of the model's logits.
        grammar: from json_grammar or tool_grammar.
        thinking: the reply thinks first (the prompt left a thought open): the grammar applies after `</think>`.
        may_think: the reply may open a thought with its first token (a hybrid model in thinking mode): that
            token may be `<think>` besides what the grammar allows, and then the grammar waits for `</think>`.
        trigger: a token id: the grammar applies from it on (it is the grammar's first token); None: from the
            first token (after the thought).

    Returns:
        the Constraint (one per reply: it keeps the reply's state).
    """
    end_think = tokenizer.token_id("</think>") if thinking or may_think else None
    if (thinking or may_think) and end_think is None:
        raise UserError("this tokenizer has no </think> token: a thinking reply cannot be constrained")
    open_think = tokenizer.token_id("<think>") if may_think and not thinking else None
    return Constraint(_matcher(tokenizer, vocab_size, grammar).deep_copy(), vocab_size, end_think, trigger, open_think)


@lru_cache(maxsize=4)
def _tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of the tokenizer (about a second to build): its added tokens (<tool_call>, <think>...)
    are special tokens, never text; the end-of-turn ids are what a complete grammar allows next."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size,
                                  eos_token=sorted(tokenizer.eos_token_ids))


@lru_cache(maxsize=64)
def _matcher(tokenizer, vocab_size: int, grammar: Grammar):
    """A compiled grammar in its start state; each reply gets a copy."""
    import llguidance

    lark = grammar.lark
    if grammar.tools:  # the tags are in the call rule's line (a schema's own text is left alone)
        start, end = tokenizer.token_id("<tool_call>"), tokenizer.token_id("</tool_call>")
        if start is None or end is None:
            raise UserError("this tokenizer has no <tool_call> token: tool calls cannot be constrained", "tools")
        lark = re.sub(r"^call: <\[TOOL_CALL\]>(.*)<\[END_TOOL_CALL\]>$", rf"call: <[{start}]>\g<1><[{end}]>", lark,
                      flags=re.MULTILINE)
    matcher = llguidance.LLMatcher(_tokenizer(tokenizer, vocab_size), lark, log_level=0)
    if matcher.is_error():
        raise UserError(_reason(matcher.get_error(), grammar), grammar.param, "invalid_schema")
    return matcher


def _reason(error: str, grammar: Grammar) -> str:
    """llguidance's error in one line, without the grammar listing it ends with; for a tool, which one."""
    lines = []
    for line in error.splitlines():
        if re.match(r"\s*\d+ \| ", line):  # the listing
            break
        if line.strip() != "^":
            lines.append(line.strip())
    reason = " ".join(lines)
    where = re.match(r"at (\d+)\(\d+\): (failed to compile JSON schema: )?", reason)
    whose = "the schema"
    if where:
        reason = reason[where.end():]
        line = int(where[1])
        if 4 <= line < 4 + len(grammar.tools):
            whose = f"the parameters of tool {grammar.tools[line - 4]!r}"
    reason = reason if len(reason) <= REASON else reason[: REASON - 3] + "..."
    return f"{whose} cannot be enforced: {reason}"


class Constraint:
    """A logits processor, `constraint(history, logits) -> logits`: `history` is every token generated so far
    in this reply (drafts included), `logits` (1, vocab); every token the grammar does not allow next is set to
    -inf. The grammar's state follows `history`, which may shrink or change in its last REWIND tokens (rejected
    drafts): the matcher rolls back. A history the grammar rejects leaves the logits as they are (such a draft
    is rejected anyway) until it is rewound."""

    def __init__(self, matcher, vocab_size: int, end_think: Optional[int], trigger: Optional[int],
                 open_think: Optional[int] = None):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.end_think, self.trigger = end_think, trigger
        self.open_think = open_think  # the first token may be this id (a thought opened), besides the grammar's
        self.ids = []  # the history as far as it was read
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._begin()

    def _begin(self):
        """The state before the reply's first token."""
        # where in ids the answer starts (None: still thinking)
        self.opened = 0 if self.end_think is None or self.open_think is not None else None
        self.start = 0 if self.opened == 0 and self.trigger is None else None  # where the grammar starts
        self.fed = 0  # ids[start : start + fed] are what the matcher consumed
        self.bad = False  # ids[start + fed] was rejected

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self._follow(history)
        if self.start is None or self.bad:
            return logits
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        # each byte of the bitmask becomes 8 biases (0 or -inf) by a table lookup, added in one op: an mx.where on
        # a bool array unpacked in numpy cost two to five times as much on a CPU
        bias = _biases(logits.dtype)[mx.array(self._bits.view(np.uint8))].reshape(1, -1)
        if not self.ids and self.open_think is not None:
            bias[0, self.open_think] = 0
        return logits + bias[:, : logits.shape[-1]]

    def _follow(self, history: mx.array):
        """Bring the state to `history`, reading only its tail."""
        n = history.shape[0]
        at = max(0, min(n, len(self.ids)) - REWIND)
        tail = history[at:].tolist() if n > at else []
        same = at
        while same < min(n, len(self.ids)) and self.ids[same] == tail[same - at]:
            same += 1
        self._rewind(same)
        for token in tail[same - at :]:
            self._feed(token)

    def _rewind(self, n: int):
        """Forget ids[n:]."""
        if n >= len(self.ids):
            return
        del self.ids[n:]
        if n == 0:  # back to the start (a thought the first token opened went too)
            if self.fed:
                self.matcher.rollback(self.fed)
            self._begin()
            return
        if self.opened is not None and n < self.opened:  # the </think> went
            self.opened = None
        if self.start is None:
            return
        if n < self.start or (n == self.start and self.trigger is not None):  # the trigger went
            self.start = None
        keep = 0 if self.start is None else n - self.start
        if keep < self.fed:
            self.matcher.rollback(self.fed - keep)
            self.fed = keep
        self.bad = self.bad and self.start is not None and self.start + self.fed < n

    def _feed(self, token: int):
        self.ids.append(token)
        if len(self.ids) == 1 and token == self.open_think:  # a thought after all: free until </think>
            self.opened = self.start = None
            return
        if self.opened is None:
            if token == self.end_think:
                self.opened = len(self.ids)
                self.start = self.opened if self.trigger is None else None
            return
        if self.start is None:
            if token != self.trigger:
                return
            self.start = len(self.ids) - 1
        if self.bad:
            return
        if self.matcher.try_consume_tokens([token]) == 1:
            self.fed += 1
        else:
            self.bad = True


@lru_cache(maxsize=None)
def _biases(dtype) -> mx.array:
    """(256, 8): for each byte of a bitmask, the bias of its 8 tokens (bit i: token i), 0 or -inf."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return mx.array(np.where(bits, 0.0, -np.inf).astype(np.float32)).astype(dtype)
