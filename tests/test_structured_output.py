"""Structured output end to end: response_format and tool_choice through the server (the openai client's
`parse` too), the Python API and the CLI, on a random model whose free output is never the structure asked
for, and on scripted models for the thought staying free."""

import json
import subprocess
import sys

import httpx
import pytest
from checkpoints import random_mlx_model
from conftest import NAME

from mlx_qwen3.generate import generate

jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CONFIG = dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, vocab_size=151936,
              max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False)
# bounded everywhere, so a random model's JSON ends well within max_tokens
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "tags", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 6},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["sun", "rain"]}},
                         "unit": {"enum": ["C", "F"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather in a city", "parameters": {
    "type": "object", "required": ["city"], "additionalProperties": False,
    "properties": {"city": {"type": "string", "maxLength": 6}}}}},
    {"type": "function", "function": {"name": "clock", "parameters": {
        "type": "object", "required": ["zone"], "additionalProperties": False,
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}]


@pytest.fixture(scope="module")
def random(answering):
    """A random tiny Qwen3 with Qwen3's vocabulary and the real tokenizer."""
    return random_mlx_model(CONFIG, seed=3), answering[1]


@pytest.fixture(scope="module")
def random_server(random, serve):
    with serve(*random) as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def chat(url, **body):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Weather?"}],
                                                       "max_tokens": 120, **NO_THINK, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_free_output_of_the_random_model_is_not_json(random):
    """What makes the tests below able to fail."""
    for seed in range(3):
        text = generate(*random, "Weather?", enable_thinking=False, seed=seed, temperature=1.0, max_tokens=40).answer
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_answers_match_the_schema(random_server, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    choice = chat(random_server, response_format=fmt, seed=seed, temperature=1.0)
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_answers_are_objects(random_server):
    for seed in range(2):
        choice = chat(random_server, response_format={"type": "json_object"}, seed=seed, temperature=0.7,
                      max_tokens=300)
        if choice["finish_reason"] == "stop":  # an object of free strings may run past max_tokens
            assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_streamed_json_is_the_same(random_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    whole = chat(random_server, response_format=fmt, seed=5, temperature=1.0)["message"]["content"]
    body = {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 120, "response_format": fmt,
            "seed": 5, "temperature": 1.0, "stream": True, **NO_THINK}
    text = ""
    with httpx.stream("POST", f"{random_server}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text += c["delta"].get("content") or ""
    assert text == whole


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "clock"}}])
@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_forces_valid_calls(random_server, choice, parallel):
    for seed in range(2):
        got = chat(random_server, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel, seed=seed,
                   temperature=1.0, max_tokens=200)
        calls = got["message"]["tool_calls"]
        assert got["finish_reason"] == "tool_calls" and calls and (parallel or len(calls) == 1)
        for call in calls:
            if isinstance(choice, dict):
                assert call["function"]["name"] == "clock"
            tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


@pytest.fixture(scope="module")
def overlong_call(tmp_path_factory):
    """A scripted model that calls weather with a city longer than its schema allows."""
    from chain import build, ids_of, successors, tokenizer
    from conftest import _tail

    from mlx_qwen3 import load

    tok = tokenizer()
    script = [_tail(tok, enable_thinking=False)] + ids_of(tok, [
        "<tool_call>", '\n{"name": "weather","arguments":{"city":"Paris, France"}}\n', "</tool_call>",
        "<|im_end|>"])
    return load(build(tmp_path_factory.mktemp("overlong"), successors(script)))


def test_auto_tool_calls_hold_to_their_schemas(overlong_call, serve):
    """With tool_choice auto the model may answer or call; a call it starts is held to its tool's schema (the
    script's own call breaks it, as the run without tools shows)."""
    with serve(*overlong_call) as url:
        free = chat(url, temperature=0)["message"]["content"]
        assert json.loads(free.split("<tool_call>")[1].split("</tool_call>")[0])["arguments"]["city"] == "Paris, France"
        got = chat(url, tools=TOOLS, temperature=0)
    (call,) = got["message"]["tool_calls"]
    tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    assert got["finish_reason"] == "tool_calls"


def test_with_tools_and_a_response_format_the_reply_is_a_call_or_the_json(overlong_call, random_server, serve):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    with serve(*overlong_call) as url:  # the script calls: still possible, and held to its tool's schema
        got = chat(url, tools=TOOLS, response_format=fmt, temperature=0)
    (call,) = got["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[0]["function"]["parameters"])
    answer = chat(random_server, tools=TOOLS, response_format=fmt, seed=0, temperature=1.0)  # a random model answers
    assert answer["finish_reason"] in ("stop", "tool_calls")
    if answer["finish_reason"] == "stop":
        jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)


def test_the_thought_stays_free_and_the_answer_is_held(thinking_dir, serve):
    """The scripted model thinks "Let me think", then would answer "The answer is 4.": the thought comes out as
    it is, and the answer is JSON."""
    from mlx_qwen3 import load

    with serve(*load(thinking_dir)) as url:
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"n": {"enum": [4]}}, "required": ["n"], "additionalProperties": False}}}
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "2+2?"}],
                                                          "response_format": fmt, "temperature": 0, "max_tokens": 60},
                       timeout=120).json()
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think"
    assert json.loads(message["content"]) == {"n": 4}


def test_openai_parse_gets_a_pydantic_object(random_server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=6)
        unit: Literal["C", "F"]

    r = client(random_server).chat.completions.parse(
        model="gpt-4o", messages=[{"role": "user", "content": "Weather?"}], response_format=Weather, seed=1,
        temperature=1.0, max_tokens=80, extra_body=NO_THINK)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.unit in ("C", "F")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(unclosed"}}}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format"),  # strict: a keyword the engine lacks
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "not": {"required": ["a"]}}}}]}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": "x"}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": "x"}]}, "tools"),
])
def test_what_cannot_be_enforced_is_a_4xx_that_says_why(random_server, body, param):
    r = httpx.post(f"{random_server}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}], **body}, timeout=60)
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.text
    assert len(r.json()["error"]["message"].splitlines()) == 1


def test_without_strict_keywords_the_engine_lacks_go_unchecked(random_server):
    """A schema with uniqueItems (pydantic's set) and an unknown format, not strict: answered, and held to the rest
    of the schema; a tool that says the same is offered and called."""
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True},
        "color": {"type": "string", "format": "color-hex", "maxLength": 6}},
        "required": ["tags", "color"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": schema}}
    choice = chat(random_server, response_format=fmt, seed=3, temperature=1.0)
    answer = json.loads(choice["message"]["content"])
    jsonschema.validate(answer, {**schema, "properties": {**schema["properties"], "tags": {
        "type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}})
    tools = [{"type": "function", "function": {"name": "tag", "parameters": schema}}]
    call = chat(random_server, tools=tools, tool_choice="required", seed=3, temperature=1.0)["message"]["tool_calls"]
    assert call and call[0]["function"]["name"] == "tag"
    assert set(json.loads(call[0]["function"]["arguments"])) == {"tags", "color"}


def test_tool_names_are_held_as_the_template_shows_them(random):
    """A name outside ASCII is written as it is (the template's tojson does not escape it), and a tool given as the
    function itself ({"name", "parameters"}) is taken too."""
    from mlx_qwen3.structured import constraint, tool_grammar

    _, tok = random
    for tool in ({"type": "function", "function": {"name": "查询天气", "parameters": {"type": "object"}}},
                 {"name": "查询天气", "parameters": {"type": "object"}}):
        c = constraint(tok, CONFIG["vocab_size"], tool_grammar([tool]), thinking=False)
        ids = [tok.token_id("<tool_call>")] + tok.encode('\n{"name": "查询天气", "arguments": {}}\n') + \
            [tok.token_id("</tool_call>")]
        assert all(c.matcher.try_consume_tokens([t]) == 1 for t in ids)


def test_the_python_api_takes_response_format(random):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    result = generate(*random, "Weather?", enable_thinking=False, seed=2, temperature=1.0, max_tokens=120,
                      response_format=fmt)
    jsonschema.validate(json.loads(result.answer), SCHEMA)


def test_the_cli_takes_a_schema_file(random, tmp_path):
    from checkpoints import copy_tokenizer

    model, _ = random
    folder = tmp_path / "model"
    folder.mkdir()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    copy_tokenizer(folder)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), "--prompt", "Weather?",
                          "--no-think", "--temp", "1", "--seed", "4", "--max-tokens", "120", "--json-schema",
                          str(schema)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "string", "pattern": "(unclosed"}))
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), "--prompt", "x",
                          "--no-think", "--json-schema", str(bad)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "schema" in out.stderr, out.stderr


def test_in_thinking_mode_the_first_token_may_open_a_thought_or_start_the_answer(random):
    """A hybrid Qwen3 opens its thought itself; a Qwen3-Instruct-2507 never thinks: both are held right."""
    import mlx.core as mx

    from mlx_qwen3.structured import constraint, json_grammar

    _, tok = random
    vocab = CONFIG["vocab_size"]
    think, end = tok.token_id("<think>"), tok.token_id("</think>")
    brace, word = tok.encode("{")[0], tok.encode("Hello")[0]
    c = constraint(tok, vocab, json_grammar(SCHEMA), thinking=False, may_think=True)

    def allowed(history):
        return mx.isfinite(c(mx.array(history, dtype=mx.uint32), mx.zeros((1, vocab))))[0].tolist()

    first = allowed([])
    assert first[think] and first[brace] and not first[word] and not first[end]
    assert all(allowed([think, word]))  # a thought: free
    after = allowed([think, word, end])
    assert after[brace] and not after[word]
    assert not allowed([brace])[think] and not allowed([brace])[word]  # the answer began: held, no thought now
    assert allowed([])[think]  # rewound to the start: the choice is open again


def test_the_answer_loop_guard_leaves_a_held_answer_to_its_grammar(random):
    """A JSON list of like records repeats itself by nature: the guard would cut it into invalid JSON."""
    from mlx_qwen3.generate import prepare
    from mlx_qwen3.reply import Reply

    model, tok = random
    record = tok.encode('{"unit": "C", "days": 3, "tags": ["sun"]}, ')
    tokens = tok.encode("[") + record * 12 + tok.encode('{"unit": "C"}]')
    guard = dict(enable_thinking=False, loop_repeats=2, loop_min_tokens=8, max_tokens=1000)
    held = {"type": "json_schema", "json_schema": {"name": "days", "schema": {"type": "array"}}}
    for fmt, cut in ((None, True), (held, False)):
        reply = Reply(tok, prepare(model, tok, "Weather?", response_format=fmt, **guard), 1000)
        going = all(reply.take(t) for t in tokens)
        assert going != cut and bool(reply.answer.loops) == cut
