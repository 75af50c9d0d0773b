"""Structured output (structured.py): a random model sampling at temperature 1 under a Constraint writes JSON that
validates against a nested schema, and Qwen3 tool calls to the tools given; the thought and the text before a
trigger stay free; the state follows histories that shrink and change (rejected drafts); a schema the engine
cannot compile is one UserError; each grammar compiles once."""

import json
from collections import deque

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from chain import ids_of, tokenizer
from checkpoints import random_mlx_model

from mlx_qwen3 import structured
from mlx_qwen3.decode import Decoder, Taker
from mlx_qwen3.errors import UserError
from mlx_qwen3.models.cache import PromptCache
from mlx_qwen3.options import Drafting
from mlx_qwen3.sample import make_sampler
from mlx_qwen3.structured import constraint, json_grammar, tool_grammar

VOCAB = 151936
CONFIG = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, vocab_size=VOCAB,
              max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)

# Every string, number and array is bounded, so that a random model's reply under the grammar must end.
SCHEMA = {
    "$defs": {"line": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]-[0-9]{1,3}$"},
                                                        "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["sku", "qty"], "additionalProperties": False}},
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "role": {"enum": ["admin", "user"]},
        "orders": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "lines": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/line"}},
                           "paid": {"type": "boolean"}},
            "required": ["id", "lines", "paid"], "additionalProperties": False}},
        "note": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": -5, "maximum": 5}]},
    },
    "required": ["name", "role", "orders", "note"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: any object
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_mlx_model(CONFIG, seed=3)


class Until(Taker):
    """Takes tokens until an end-of-turn id or `n` of them."""

    def __init__(self, n: int, ends: set, forced=()):
        super().__init__(deque(forced))
        self.n, self.ends = n, ends

    def take(self, token: int) -> bool:
        self.taken.append(token)
        return len(self.taken) < self.n and token not in self.ends


def decode(model, tok, processors, seed: int, n: int = 400, forced=(), draft=None) -> list:
    """Sampled at temperature 1; `draft`: a draft model proposing 2 tokens at a time, unconstrained."""
    taker = Until(n, tok.eos_token_ids, forced)
    decoder = Decoder(model, draft)
    drafting = dict(drafting=Drafting(num_draft=2), draft_sampler=make_sampler(1.0, seed=seed + 100)) if draft else {}
    row = decoder.add(tok.encode("Reply in JSON."), PromptCache.new(model), make_sampler(1.0, seed=seed), processors,
                      taker, **drafting)
    while decoder.rows:
        decoder.step()
    assert draft is None or row.drafter.drafted > 0
    return taker.taken


def allowed(c, history: list) -> np.ndarray:
    """The ids the constraint leaves possible after `history`."""
    out = c(mx.array(history, dtype=mx.uint32), mx.zeros((1, VOCAB)))
    return np.array(out[0] > -mx.inf)


def accepts(c, ids: list) -> bool:
    """Whether every id of `ids` is allowed where it stands."""
    return all(allowed(c, ids[:i])[t] for i, t in enumerate(ids))


@pytest.mark.parametrize("seed", range(3))
def test_sampled_replies_validate_against_a_nested_schema(model, tok, seed):
    c = constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=False)
    ids = decode(model, tok, [c], seed)
    assert ids[-1] in tok.eos_token_ids
    jsonschema.validate(json.loads(tok.decode(ids[:-1])), SCHEMA)


def test_drafts_the_grammar_rejects_are_rewound(model, tok):
    """A draft model that knows nothing of the grammar: its drafts go through the constraint, are mostly
    rejected, and the state follows the rewinds; the reply still validates."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = constraint(tok, VOCAB, json_grammar(schema), thinking=False)
    ids = decode(model, tok, [c], 0, draft=model)
    assert ids[-1] in tok.eos_token_ids
    jsonschema.validate(json.loads(tok.decode(ids[:-1])), schema)
    assert c.ids[: len(ids) - 1] == ids[:-1]


def test_without_the_constraint_the_model_writes_no_json(model, tok):
    ids = decode(model, tok, [], 0, n=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(tok.decode([t for t in ids if t not in tok.eos_token_ids]))


def test_any_object_when_no_schema(model, tok):
    c = constraint(tok, VOCAB, json_grammar(), thinking=False)
    text = tok.decode(decode(model, tok, [c], 0, n=100))
    assert text.lstrip().startswith("{")  # a random model's object may go on past n tokens
    assert accepts(constraint(tok, VOCAB, json_grammar(), thinking=False), tok.encode('\n\n{"any": [1, {"x": null}]}'))
    assert not accepts(constraint(tok, VOCAB, json_grammar(), thinking=False), tok.encode('["not", "an", "object"]'))


def test_the_thought_is_free_and_the_answer_constrained(model, tok):
    thought = ids_of(tok, ["<think>", "Hmm [not json", "</think>", "\n\n"])
    c = constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=True)
    for i in range(thought.index(tok.token_id("</think>")) + 1):  # up to and with </think>: nothing masked
        assert allowed(c, thought[:i]).all()
    assert not allowed(c, thought)[tok.encode("[")[0]]
    fresh = constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=False)
    assert (allowed(c, thought) == allowed(fresh, thought[-1:])).all()
    # end to end: the thought forced in, then sampled JSON after it
    c = constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=True)
    ids = decode(model, tok, [c], 1, forced=thought)
    assert ids[: len(thought)] == thought and ids[-1] in tok.eos_token_ids
    jsonschema.validate(json.loads(tok.decode(ids[len(thought): -1])), SCHEMA)


def calls(tok, ids: list) -> list:
    """The tool calls in `ids`: [(name, arguments)], checking their form (the spacing around the JSON is free)."""
    start, end = tok.token_id("<tool_call>"), tok.token_id("</tool_call>")
    found, i = [], ids.index(start)
    while i < len(ids) and ids[i] == start:
        j = ids.index(end, i)
        text = tok.decode(ids[i + 1 : j])
        call = json.loads(text)
        assert list(call) == ["name", "arguments"]
        found.append((call["name"], call["arguments"]))
        i = j + 1
        if i < len(ids) and tok.decode([ids[i]]) == "\n":
            i += 1
    assert ids[i:] == [ids[-1]] and ids[-1] in tok.eos_token_ids
    return found


@pytest.mark.parametrize("seed", range(3))
def test_after_the_trigger_a_valid_call(model, tok, seed):
    trigger = tok.token_id("<tool_call>")
    free = tok.encode("Let me check the weather [{(")
    bounded = TOOLS[:2]  # (the third takes any object: a random model's may not end)
    c = constraint(tok, VOCAB, tool_grammar(bounded), thinking=False, trigger=trigger)
    for i in range(len(free) + 1):  # before the trigger: nothing masked
        assert allowed(c, free[:i]).all()
    ids = decode(model, tok, [c], seed, forced=free + [trigger])
    assert ids[: len(free) + 1] == free + [trigger]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in bounded}
    for name, arguments in calls(tok, ids[len(free):]):
        jsonschema.validate(arguments, schemas[name])


def call_ids(tok, name: str, arguments: dict) -> list:
    return ids_of(tok, ["<tool_call>", "\n" + json.dumps({"name": name, "arguments": arguments}) + "\n",
                        "</tool_call>"])


def test_one_call_or_several_and_a_named_function(tok):
    one = call_ids(tok, "add", {"a": 1, "b": 2})
    two = one + tok.encode("\n") + call_ids(tok, "get_weather", {"city": "Oslo", "unit": "C"})
    newline, ends = tok.encode("\n")[0], sorted(tok.eos_token_ids)
    parallel = constraint(tok, VOCAB, tool_grammar(TOOLS), thinking=False)
    assert accepts(parallel, two)
    after = allowed(parallel, one)
    assert after[newline] and after[ends].all() and after.sum() == 1 + len(ends)
    single = constraint(tok, VOCAB, tool_grammar(TOOLS, parallel=False), thinking=False)
    after = allowed(single, one)
    assert after[ends].all() and after.sum() == len(ends)
    named = constraint(tok, VOCAB, tool_grammar(TOOLS, name="get_weather"), thinking=False)
    assert not accepts(named, one) and accepts(named, two[len(one) + 1:])
    # arguments follow the tool's own schema; a tool without parameters takes any object
    assert not accepts(parallel, call_ids(tok, "add", {"a": 1, "b": "2"}))
    assert not accepts(parallel, call_ids(tok, "get_weather", {"city": "Oslo", "unit": "K"}))
    assert accepts(parallel, call_ids(tok, "now", {"any": [1, {"x": None}]}))
    assert not accepts(parallel, call_ids(tok, "sleep", {}))
    # tool_choice "required" in a thinking reply: a call right after the thought (closed with "\n\n", as a
    # thinking budget closes it), nothing else
    required = constraint(tok, VOCAB, tool_grammar(TOOLS), thinking=True)
    thought = ids_of(tok, ["<think>", "hmm", "</think>", "\n\n"])
    assert accepts(required, thought + one)
    assert not allowed(required, thought)[tok.encode("Sure")[0]]
    # the tags are the special tokens, never their text
    as_text = tok.encode("<tool_") + tok.encode("call>")
    assert tok.token_id("<tool_call>") not in as_text and not accepts(parallel, as_text + one[1:])


def test_a_complete_grammar_allows_only_the_end_and_no_id_past_the_vocabulary(tok):
    c = constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=False)
    assert not allowed(c, [])[tok.max_id + 1:].any()
    reply = {"name": "ab", "role": "user", "orders": [{"id": "123e4567-e89b-12d3-a456-426614174000",
                                                        "lines": [{"sku": "A-12", "qty": 3}], "paid": True}],
             "note": None}
    ids = tok.encode(json.dumps(reply))
    assert accepts(c, ids)
    after = allowed(c, ids)
    # the object is closed: whitespace may follow (WHITESPACE) and the end-of-turn ids
    assert after[sorted(tok.eos_token_ids)].all() and not after[tok.max_id + 1:].any()
    assert not after[tok.encode("{")[0]] and not after[tok.encode("x")[0]]
    assert not accepts(constraint(tok, VOCAB, json_grammar(SCHEMA), thinking=False),
                       tok.encode(json.dumps({**reply, "role": "root"})))


def test_rewound_histories_give_the_masks_of_a_fresh_constraint(tok):
    """Drafts: growing histories, then a shorter or changed one; also across </think> and the trigger, and
    through a draft the grammar rejects."""
    end_think, trigger = tok.token_id("</think>"), tok.token_id("<tool_call>")
    prefix = ids_of(tok, ["<think>", "ok", "</think>", "\n\n", "Sure."])
    call = call_ids(tok, "get_weather", {"city": "Oslo", "unit": "C"})
    history = prefix + call
    bad = tok.encode("]]")  # no call continues with these

    def fresh():
        return constraint(tok, VOCAB, tool_grammar(TOOLS), thinking=True, trigger=trigger)

    c = fresh()
    sequences = [history[:8], history[:8] + history[8:14], history[:10], history[:10] + bad,
                 history[:9], history[:12] + bad + history[12:20], history[:13], history[: len(prefix) - 2],
                 history[:3], history[:len(prefix) + 4], prefix[:2] + call[:4],  # a call inside the thought: free
                 prefix[:2] + [end_think] + call[:3], history]
    for seq in sequences:
        steps = [seq[:i] for i in range(max(0, len(seq) - 5), len(seq) + 1)]  # a draft's positions
        for s in steps:
            got = allowed(c, s)
        assert (got == allowed(fresh(), seq)).all(), seq
    assert c.ids == history


def test_a_schema_that_does_not_compile_is_one_user_error(tok):
    for schema, reason, strict in [({"type": "nonsense"}, "nonsense", False),
                                   ({"type": "string", "pattern": "(["}, "regex", False),
                                   ({"$ref": "#/$defs/nowhere"}, "nowhere", False),
                                   ({"type": "array", "uniqueItems": True}, "uniqueItems", True)]:
        with pytest.raises(UserError, match=reason) as e:
            constraint(tok, VOCAB, json_grammar(schema, strict), thinking=False)
        assert (e.value.param, e.value.code) == ("response_format", "invalid_schema")
        assert "\n" not in str(e.value)
    tools = TOOLS + [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
    with pytest.raises(UserError, match="tool 'f' cannot be enforced: Invalid type: nonsense$") as e:
        constraint(tok, VOCAB, tool_grammar(tools), thinking=False)
    assert (e.value.param, e.value.code) == ("tools", "invalid_schema")
    for tools, name in [([], None), (TOOLS, "nowhere"), ([{"type": "function"}], None), ("f", None),
                        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None)]:
        with pytest.raises(UserError) as e:
            tool_grammar(tools, name)
        assert (e.value.param, e.value.code) == ("tools", "invalid_schema")
    with pytest.raises(UserError) as e:
        json_grammar(["not", "a", "schema"])
    assert e.value.code == "invalid_schema"


def test_keywords_the_engine_lacks_are_refused_when_strict_else_left_unchecked(tok):
    """pydantic writes a set as uniqueItems, an MCP tool may say "not" or an unknown format: without "strict" the
    rest of the schema is still enforced and those go unchecked; with it, the request is refused."""
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2, "uniqueItems": True},
        "color": {"type": "string", "format": "color-hex", "not": {"const": ""}}},
        "required": ["tags"], "additionalProperties": False}
    c = lambda: constraint(tok, VOCAB, json_grammar(schema), thinking=False)
    assert accepts(c(), tok.encode('{"tags": ["a", "a"], "color": "red"}'))  # uniqueItems and format unchecked
    for wrong in ('{"tags": ["toolong"]}', '{"tags": ["a", "b", "c"]}', '{"color": "red"}', '{"tags": [], "x": 1}'):
        assert not accepts(c(), tok.encode(wrong)), wrong
    with pytest.raises(UserError, match="uniqueItems"):
        constraint(tok, VOCAB, json_grammar(schema, strict=True), thinking=False)
    tool = {"type": "function", "function": {"name": "tag", "parameters": schema}}
    call = tok.encode('<tool_call>\n{"name": "tag", "arguments": {"tags": ["a", "a"]}}\n</tool_call>')
    assert accepts(constraint(tok, VOCAB, tool_grammar([tool]), thinking=False), call)
    with pytest.raises(UserError, match="tool 'tag' cannot be enforced.*uniqueItems") as e:
        constraint(tok, VOCAB, tool_grammar([{"type": "function", "function": {**tool["function"], "strict": True}}]),
                   thinking=False)
    assert e.value.param == "tools"


def test_each_grammar_compiles_once(tok):
    schema = {"type": "object", "properties": {"compiled": {"type": "integer", "minimum": 7}}}
    before = structured._matcher.cache_info().misses
    a = constraint(tok, VOCAB, json_grammar(schema), thinking=False)
    b = constraint(tok, VOCAB, json_grammar(json.loads(json.dumps(schema))), thinking=True)
    assert structured._matcher.cache_info().misses == before + 1
    assert a.matcher is not b.matcher  # each reply has its own state
    ids = tok.encode('{"compiled": 7}')
    assert accepts(a, ids) and accepts(constraint(tok, VOCAB, json_grammar(schema), thinking=False), ids)
    assert structured._matcher.cache_info().misses == before + 1
