"""/v1/completions (a raw prompt, no template) and logprobs in chat completions, with the openai client."""

import math

import httpx
import mlx.core as mx
import pytest
from conftest import NAME

from mlx_qwen3.generate import generate


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def raw_prompts(answering):
    _, tok = answering
    messages = [{"role": "user", "content": "x"}]
    return (tok.apply_chat_template(messages),  # thinks, then answers
            tok.apply_chat_template(messages, enable_thinking=False))


def test_a_raw_prompt_is_continued_as_it_is(server, raw_prompts):
    thinking, plain = raw_prompts
    c = client(server)
    r = c.completions.create(model="gpt-3.5-turbo-instruct", prompt=plain, temperature=0, max_tokens=50)
    assert r.choices[0].text == "Hi there!" and r.choices[0].finish_reason == "stop" and r.model == NAME
    # no channels: the thought's tags and newlines are text like any other
    r = c.completions.create(model=NAME, prompt=thinking, temperature=0, max_tokens=50)
    assert r.choices[0].text == "<think>Let me think</think>The answer is 4."
    assert r.usage.completion_tokens == 11 and r.usage.total_tokens == r.usage.prompt_tokens + 11
    r = c.completions.create(model=NAME, prompt=thinking, temperature=0)  # OpenAI's default: 16 tokens
    assert r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=NAME, prompt=thinking, temperature=0, max_tokens=3, echo=True)
    assert r.choices[0].text == thinking + "<think>Let me" and r.choices[0].finish_reason == "length"


def test_a_streamed_completion_says_the_same(server, raw_prompts):
    thinking, _ = raw_prompts
    stream = client(server).completions.create(model=NAME, prompt=thinking, temperature=0, max_tokens=50,
                                               stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "<think>Let me think</think>The answer is 4."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 11


@pytest.mark.parametrize("body, code", [({}, "invalid_type"), ({"prompt": 5}, "invalid_type"),
                                        ({"prompt": ["a", "b"]}, "invalid_type"), ({"prompt": ""}, "empty_prompt"),
                                        ({"prompt": "a", "n": 2}, "out_of_range"),
                                        ({"prompt": "a", "suffix": "b"}, "unsupported_parameter"),
                                        ({"prompt": "a", "echo": True, "logprobs": 2}, "unsupported_parameter"),
                                        ({"prompt": "a", "logprobs": 21}, "out_of_range"),
                                        ({"prompt": "a", "max_tokens": 0}, "out_of_range")])
def test_bad_completions_get_openai_errors(server, body, code):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def _reference(model, ids: list, generated: list, n: int) -> list:
    """Per generated token: (its log-probability, the n best ids, theirs), from one plain forward pass."""
    logits = model(mx.array([ids + generated[:-1]]))[0, len(ids) - 1:].astype(mx.float32)
    logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    out = []
    for row, token in zip(logprobs, generated):
        best = sorted(range(len(row)), key=lambda i: -row[i])[:n]
        out.append((row[token], best, [row[i] for i in best]))
    return out


def test_logprobs_are_the_models_own(answering, server):
    model, tok = answering
    messages = [{"role": "user", "content": "x"}]
    r = client(server).chat.completions.create(model=NAME, messages=messages, temperature=0, logprobs=True,
                                               top_logprobs=3, extra_body={"chat_template_kwargs":
                                                                           {"enable_thinking": False}})
    entries = r.choices[0].logprobs.content
    ids = tok.encode(tok.apply_chat_template(messages, enable_thinking=False))
    answer = tok.encode("Hi there!")
    assert "".join(e.token for e in entries) == "Hi there!" == r.choices[0].message.content
    for e, (logprob, best, theirs) in zip(entries, _reference(model, ids, answer, 3), strict=True):
        assert math.isclose(e.logprob, logprob, abs_tol=1e-4) and bytes(e.bytes).decode() == e.token
        assert [tok.encode(t.token) for t in e.top_logprobs] == [[i] for i in best]
        assert all(math.isclose(t.logprob, lp, abs_tol=1e-4) for t, lp in zip(e.top_logprobs, theirs))
    # streamed, the same entries arrive with the content
    stream = client(server).chat.completions.create(model=NAME, messages=messages, temperature=0, logprobs=True,
                                                    top_logprobs=3, stream=True,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_logprobs_cover_the_answer_not_the_thought(answering, server):
    r = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                               temperature=0, logprobs=True)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == "The answer is 4." and all(e.top_logprobs == [] for e in entries)
    plain = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                                   temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(server, raw_prompts, answering):
    _, plain = raw_prompts
    r = client(server).completions.create(model=NAME, prompt=plain, temperature=0, logprobs=2, max_tokens=20)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == "Hi there!"
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and all(x <= 0 for x in lp.token_logprobs)


def test_the_python_api_gives_logprobs_too(answering):
    model, tok = answering
    result = generate(model, tok, "x", enable_thinking=False, temperature=0, logprobs=1)
    assert "".join(e["token"] for e in result.logprobs) == result.answer == "Hi there!"
    assert all(len(e["top_logprobs"]) == 1 and e["top_logprobs"][0]["token"] == e["token"] for e in result.logprobs)


def test_logprobs_are_the_tokens_of_the_text_given(thinking_dir, serve):
    """The newlines after the thought (stripped) and a stop string's token carry no entry; streamed, each chunk
    carries the entries of its own text."""
    from mlx_qwen3 import load

    with serve(*load(thinking_dir)) as url:
        c = client(url)
        for stop, content in ((None, "The answer is 4."), ([" is"], "The answer")):
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=0,
                                          logprobs=True, stop=stop)
            assert r.choices[0].message.content == content
            assert "".join(e.token for e in r.choices[0].logprobs.content) == content
            stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                               temperature=0, logprobs=True, stop=stop, stream=True)
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    entries = ch.choices[0].logprobs.content if ch.choices[0].logprobs else []
                    assert "".join(e.token for e in entries) == ch.choices[0].delta.content
