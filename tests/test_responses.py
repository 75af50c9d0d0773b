"""POST /v1/responses (OpenAI's Responses API), driven by the real openai client and raw HTTP, on scripted models."""

import json
from types import SimpleNamespace

import httpx
import pytest
from chain import build, ids_of, successors, tokenizer
from checkpoints import TOKENIZER_DIR
from conftest import NAME, _tail, serving

from mlx_qwen3 import load
from mlx_qwen3.server.request import RequestError
from mlx_qwen3.server.responses import Responses

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ASK = "What is the weather in Paris?"


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def after_tools_template() -> str:
    """Qwen3's template, with the reply after a tool result opened without a thought: the scripted model (whose next
    token depends on the last one only) then tells that turn from the first by the prompt's last token."""
    template = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
    old = "{%- if enable_thinking is defined and enable_thinking is false %}"
    assert template.count(old) == 1
    return template.replace(old, "{%- if (enable_thinking is defined and enable_thinking is false) or "
                                 "messages[-1].role == 'tool' %}")


@pytest.fixture(scope="module")
def weather(tmp_path_factory):
    """Thinks "Plan", calls get_weather(city="Paris"); after the tool's result answers "It is sunny in Paris."."""
    tok = tokenizer()
    call = ids_of(tok, ["<think>", "Plan", "</think>", "<tool_call>",
                        '{"name":"get_weather","arguments":{"city": "Paris"}}', "</tool_call>", "<|im_end|>"])
    answer = ids_of(tok, ["It is sunny in Paris.", "<|im_end|>"])
    folder = build(tmp_path_factory.mktemp("weather"), successors([_tail(tok)] + call,
                   [_tail(tok, enable_thinking=False)] + answer), template=after_tools_template())
    with serving(*load(folder)) as url:
        yield url


def test_reasoning_item_and_answer(server):
    r = client(server).responses.create(model="gpt-4o", input="2+2?", temperature=0)
    assert (r.object, r.status, r.model, r.id[:5]) == ("response", "completed", NAME, "resp_")
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Let me think" and r.output[0].content[0].type == "reasoning_text"
    assert r.output[1].role == "assistant" and r.output[1].content[0].type == "output_text"
    assert r.output_text == "The answer is 4."
    assert r.usage.output_tokens == 11 and r.usage.output_tokens_details.reasoning_tokens == 5
    assert r.usage.total_tokens == r.usage.input_tokens + 11 and r.incomplete_details is None


def test_items_instructions_and_effort_none(server):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "2+2?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "add"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
             {"role": "user", "content": "Hello"}]
    c = client(server)
    plain = c.responses.create(model=NAME, input=items, reasoning={"effort": "none"}, temperature=0)
    assert [item.type for item in plain.output] == ["message"] and plain.output_text == "Hi there!"
    told = c.responses.create(model=NAME, input=items, instructions="You are terse. " * 5,
                              reasoning={"effort": "none"}, temperature=0)
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert told.instructions == "You are terse. " * 5


def test_stream_events_in_order(server):
    events = list(client(server).responses.create(model=NAME, input="2+2?", temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = lambda kind: [e.delta for e in events if e.type == kind]
    assert "".join(deltas("response.reasoning_text.delta")) == "Let me think"
    assert "".join(deltas("response.output_text.delta")) == "The answer is 4."
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # each run of deltas as one
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "The answer is 4." and final.usage.output_tokens == 11
    ids = {e.output_index: e.item_id for e in events if hasattr(e, "item_id")}
    assert ids == {0: final.output[0].id, 1: final.output[1].id}


def test_the_clients_stream_helper(server):
    with client(server).responses.stream(model=NAME, input="2+2?", temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "The answer is 4."


def test_max_output_tokens_makes_it_incomplete(server):
    c = client(server)
    r = c.responses.create(model=NAME, input="2+2?", temperature=0, max_output_tokens=7)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "The answer" and r.usage.output_tokens == 7
    assert [item.status for item in r.output] == ["completed", "incomplete"]  # the thought ended, the answer did not
    events = list(c.responses.create(model=NAME, input="2+2?", temperature=0, max_output_tokens=7, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert [item.status for item in events[-1].response.output] == ["completed", "incomplete"]


def test_previous_response_id_continues_and_reuses_the_cache(server):
    c = client(server)
    first = c.responses.create(model=NAME, input="tell me " * 30, temperature=0)
    second = c.responses.create(model=NAME, previous_response_id=first.id, input="and?", temperature=0)
    assert second.output_text == "The answer is 4." and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + 5  # the first turn is in the prompt
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    third = c.responses.create(model=NAME, previous_response_id=second.id, input="more?", temperature=0, stream=True)
    done = list(third)[-1].response
    assert done.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens - 1


def test_unknown_or_unstored_previous_response_id_is_404(server):
    from openai import NotFoundError

    c = client(server)
    with pytest.raises(NotFoundError) as e:
        c.responses.create(model=NAME, previous_response_id="resp_nope", input="hi")
    assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"
    unstored = c.responses.create(model=NAME, input="hi", store=False, max_output_tokens=2)
    with pytest.raises(NotFoundError):
        c.responses.create(model=NAME, previous_response_id=unstored.id, input="hi")


def test_the_store_keeps_the_latest_used():
    def keep(store, name):
        store.keep(store.parse({"input": name}), {"id": name, "output": []})

    store = Responses(stored=2)
    for name in ("resp_a", "resp_b"):
        keep(store, name)
    store.parse({"input": "x", "previous_response_id": "resp_a"})  # a is used: b is now the oldest
    keep(store, "resp_c")
    assert store.earlier("resp_a") == [{"role": "user", "content": "resp_a"}]
    with pytest.raises(RequestError) as e:
        store.earlier("resp_b")
    assert e.value.status == 404
    small = Responses(stored_chars=40)  # text counts too: the newest is kept whatever its size
    for name in ("resp_1234", "resp_5678", "resp_long_long"):
        keep(small, name)
    assert list(small.kept) == ["resp_long_long"]
    assert small.chars == len("resp_long_long") + len('{"id": "resp_long_long", "output": []}')
    small.delete("resp_long_long")
    assert small.chars == 0 and not small.kept


def test_a_stored_response_is_retrieved_and_deleted(server):
    from openai import NotFoundError

    c = client(server)
    made = c.responses.create(model=NAME, input="2+2?", temperature=0)
    again = c.responses.retrieve(made.id)
    assert again.model_dump() == made.model_dump() and again.output_text == "The answer is 4."
    streamed = [e for e in c.responses.create(model=NAME, input="2+2?", temperature=0, stream=True)][-1].response
    assert c.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    unstored = c.responses.create(model=NAME, input="hi", store=False, max_output_tokens=2)
    c.responses.delete(made.id)
    for gone in (made.id, unstored.id):
        with pytest.raises(NotFoundError) as e:
            c.responses.retrieve(gone)
        assert e.value.body["code"] == "not_found" and e.value.status_code == 404
    with pytest.raises(NotFoundError):
        c.responses.create(model=NAME, previous_response_id=made.id, input="and?")
    with pytest.raises(NotFoundError):
        c.responses.delete(made.id)


def test_tool_round_trip_by_previous_response_id_and_by_full_input(weather):
    c = client(weather)
    first = c.responses.create(model=NAME, input=ASK, tools=TOOLS, temperature=0)
    assert [item.type for item in first.output] == ["reasoning", "function_call"] and first.output_text == ""
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and first.status == "completed"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}
    chained = c.responses.create(model=NAME, previous_response_id=first.id, input=[result], tools=TOOLS, temperature=0)
    assert chained.output_text == "It is sunny in Paris." and [i.type for i in chained.output] == ["message"]
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    items = [{"role": "user", "content": ASK}] + [item.model_dump(exclude_none=True) for item in first.output]
    full = c.responses.create(model=NAME, input=items + [result], tools=TOOLS, temperature=0)
    assert full.output_text == "It is sunny in Paris." and full.usage.input_tokens == chained.usage.input_tokens


def test_codex_tools_namespaces_and_kinds_not_served(weather):
    """As Codex (0.169) sends its tools: function tools inside a namespace are offered, and a call to one names its
    namespace; hosted and custom tools are left out and the request is served (it was a 400)."""
    tools = [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
             {"type": "namespace", "name": "weather_v1", "description": "Weather", "tools": TOOLS},
             {"type": "web_search", "external_web_access": False},
             {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark",
                                                                   "definition": "start: /.+/"}}]
    body = {"model": "qwen3", "input": ASK, "tools": tools, "temperature": 0, "store": False,
            "include": ["reasoning.encrypted_content"], "reasoning": {"summary": "auto"}, "prompt_cache_key": "k"}
    r = client(weather).responses.create(**body)
    call = r.output[-1]
    assert (call.type, call.name, call.namespace, json.loads(call.arguments)) == (
        "function_call", "get_weather", "weather_v1", {"city": "Paris"})
    streamed = [e for e in client(weather).responses.create(**body, stream=True)
                if e.type == "response.output_item.done"][-1].item
    assert (streamed.name, streamed.namespace) == ("get_weather", "weather_v1")
    hosted_only = client(weather).responses.create(**{**body, "tools": tools[2:]})
    assert hosted_only.status == "completed" and "function_call" not in [i.type for i in hosted_only.output]


def test_streamed_function_call(weather):
    events = list(client(weather).responses.create(model=NAME, input=ASK, tools=TOOLS, temperature=0, stream=True))
    kinds = [e.type for e in events]
    start = kinds.index("response.function_call_arguments.delta") - 1
    assert kinds[start:start + 4] == ["response.output_item.added", "response.function_call_arguments.delta",
                                      "response.function_call_arguments.done", "response.output_item.done"]
    added, done = events[start].item, events[start + 3].item
    assert (added.type, added.arguments, added.call_id) == ("function_call", "", done.call_id)
    assert json.loads(events[start + 2].arguments) == {"city": "Paris"} and done.status == "completed"
    assert events[-1].type == "response.completed" and events[-1].response.output[1].call_id == done.call_id


def test_without_tools_a_call_stays_in_the_text(weather):
    r = client(weather).responses.create(model=NAME, input=ASK, temperature=0)
    assert [i.type for i in r.output] == ["reasoning", "message"] and r.output_text.startswith("<tool_call>")


def test_options_are_translated():
    body = {"input": "x", "instructions": "Be kind.", "tools": TOOLS, "tool_choice": {"type": "function",
            "name": "get_weather"}, "parallel_tool_calls": False, "max_output_tokens": 50, "temperature": 0.5,
            "top_p": 0.9, "reasoning": {"effort": "low"}, "stream": True, "metadata": {"k": "v"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}}}
    call = Responses().parse(body)
    assert call.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "x"}]
    assert call.options == {
        "temperature": 0.5, "top_p": 0.9, "parallel_tool_calls": False, "max_tokens": 50, "thinking_budget": 1024,
        "tools": [{"type": "function", "function": {k: TOOLS[0][k] for k in ("name", "description", "parameters")}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}}}
    assert call.stream and call.fields == {"max_tokens": "max_output_tokens", "response_format": "text.format"}
    assert Responses().parse({"input": "x", "reasoning": {"effort": "minimal"}}).options == {"enable_thinking": False}
    assert Responses().parse({"input": "x", "reasoning": {"effort": "high"}}).options == {}
    assert Responses().parse({"input": "x", "text": {"format": {"type": "json_object"}}}).options == {
        "response_format": {"type": "json_object"}}


def test_tool_items_become_one_assistant_turn():
    items = [{"role": "user", "content": "q"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a": 1}'},
             {"type": "function_call_output", "call_id": "c1", "output": "1"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "2"}]}]
    assert Responses().parse({"input": items}).messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "t", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{}"}},
            {"type": "function", "id": "c2", "function": {"name": "g", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "tool", "content": "2", "tool_call_id": "c2"}]


@pytest.mark.parametrize("body, status, code, param", [
    ({}, 422, "invalid_type", "input"),
    ({"input": []}, 400, "empty_input", "input"),
    ({"input": [5]}, 422, "invalid_type", "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, 422, "invalid_role", "input"),
    ({"input": [{"type": "web_search_call", "id": "w"}]}, 422, "unsupported_item", "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 422,
     "unsupported_content", "input"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": {}}]}, 422, "invalid_tool_call", "input"),
    ({"input": [{"type": "function_call_output", "output": "1"}]}, 422, "invalid_tool_call", "input"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "n"}]}, 422, "invalid_tool", "tools"),
    ({"input": "x", "tools": [{"name": "f"}]}, 422, "invalid_tool", "tools"),
    ({"input": "x", "tools": TOOLS + [{"type": "namespace", "name": "n", "tools": TOOLS}]}, 400, "invalid_tool",
     "tools"),
    ({"input": "x", "tools": [{"type": "function"}]}, 422, "invalid_tool", "tools"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, 400, "unsupported_tool_choice", "tool_choice"),
    ({"input": "x", "tool_choice": "sometimes"}, 422, "invalid_value", "tool_choice"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, 422, "invalid_value", "reasoning"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 422, "invalid_value", "text.format"),
    ({"input": "x", "max_output_tokens": -1}, 422, None, "max_output_tokens"),
    ({"input": "x", "metadata": {"k": 1}}, 422, "invalid_type", "metadata"),
    ({"input": "x", "instructions": 3}, 422, "invalid_type", "instructions"),
    ({"input": "x", "background": True}, 400, "unsupported", "background"),
    ({"input": "x", "temperature": 3}, 422, "out_of_range", "temperature"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, code, param):
    r = httpx.post(f"{server}/v1/responses", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param, error
    assert code is None or error["code"] == code
    assert 10 < len(error["message"]) < 300 and "Traceback" not in error["message"]


def events_of(chunks) -> list:
    """Server-sent events as the client's own types, checked field by field (not merely constructed)."""
    from typing import get_args

    from openai.types.responses import ResponseStreamEvent

    union = get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    classes = {get_args(c.model_fields["type"].annotation)[0]: c for c in get_args(union)}
    out = []
    for chunk in chunks:
        kind, data = chunk.strip().split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {body['type']}"
        out.append(classes[body["type"]].model_validate(body))
    return out


def test_every_streamed_event_validates_against_the_clients_types(weather):
    body = {"model": NAME, "input": ASK, "tools": TOOLS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{weather}/v1/responses", json=body, timeout=60) as r:
        chunks = [c + "\n" for c in r.iter_text() for c in c.split("\n\n") if c.strip()]
    events = events_of(chunks)
    assert [e.type for e in events][-1] == "response.completed"
    assert {"response.reasoning_text.delta", "response.function_call_arguments.done"} <= {e.type for e in events}


def test_a_failure_mid_stream_is_an_error_event_then_response_failed():
    async def items():
        yield RequestError(500, "the generation failed: out of memory", None, "generation_failed")

    async def run():
        api = Responses()
        call = api.parse({"input": "x", "stream": True})
        meta = SimpleNamespace(id="resp_1", created=0, model=NAME)
        return [chunk async for chunk in api.stream(items(), call, meta)]

    import asyncio

    events = events_of(asyncio.run(run()))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2].code == "generation_failed" and events[3].response.status == "failed"
    assert events[3].response.error.message == "the generation failed: out of memory"


def test_a_response_validates_against_the_clients_type(server, weather):
    from openai.types.responses import Response

    for url, body in ((server, {"input": "2+2?", "max_output_tokens": 7}), (weather, {"input": ASK, "tools": TOOLS})):
        r = httpx.post(f"{url}/v1/responses", json={"model": NAME, "temperature": 0, **body}, timeout=60)
        assert r.status_code == 200 and Response.model_validate(r.json()).id == r.json()["id"]


@pytest.fixture(scope="module")
def json_answers(tmp_path_factory):
    """Without a thought, answers {"city":"Paris","sunny":true}."""
    tok = tokenizer()
    script = [_tail(tok, enable_thinking=False)] + ids_of(tok, ['{"city":"Paris","sunny":true}', "<|im_end|>"])
    with serving(*load(build(tmp_path_factory.mktemp("json"), successors(script)))) as url:
        yield url


def test_structured_output_with_the_clients_parse(json_answers):
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        sunny: bool

    r = client(json_answers).responses.parse(model=NAME, input=ASK, text_format=Weather, reasoning={"effort": "none"},
                                             temperature=0)
    assert r.output_parsed == Weather(city="Paris", sunny=True)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"
