"""The whole text path on checkpoints whose greedy output we script, with the real Qwen3 tokenizer."""

import threading
import time

import mlx.core as mx
import pytest
from chain import build, ids_of, qwq_template, successors, tokenizer

from mlx_qwen3 import UserError, load
from mlx_qwen3 import memory
from mlx_qwen3.generate import ChatSession, GenerationOptions, generate, stream_generate

GREEDY = dict(temperature=0)


def prompt_tail(tok, messages=None, **kwargs):
    """The last prompt token: what the model's first reply token follows."""
    messages = messages or [{"role": "user", "content": "What is 2+2?"}]
    return tok.encode(tok.apply_chat_template(messages, **kwargs))[-1]


@pytest.fixture
def scripted(tmp_path):
    """scripted(*scripts, **build options) -> (model, tokenizer) that greedily follows the scripts."""
    count = [0]

    def make(*scripts, **options):
        count[0] += 1
        folder = build(tmp_path / f"m{count[0]}", successors(*scripts), **options)
        return load(folder)

    return make


def collect(events):
    events = list(events)
    return events[:-1], events[-1]


def check_streams_add_up(events, result):
    for channel in ("thinking", "answer"):
        assert "".join(e.text for e in events if e.type == channel) == getattr(result, channel)


def test_thinking_then_answer(scripted):
    tok = tokenizer()
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    events, result = collect(stream_generate(model, tok, "What is 2+2?", **GREEDY))
    assert (result.thinking, result.answer) == ("Let me think", "The answer is 4.")
    assert result.finish_reason == "stop" and result.tool_calls == []
    assert [e.type for e in events][0] == "thinking" and events[-1].type == "answer"
    assert result.type == "done" and result.generation_tokens == len(reply) - 1  # <|im_end|> is not output
    assert result.prompt_tokens == len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])))
    check_streams_add_up(events, result)


def test_enable_thinking_false_gives_no_thinking_events(scripted):
    tok = tokenizer()
    tail = prompt_tail(tok, enable_thinking=False)  # the template's empty <think>\n\n</think>\n\n
    model, tok = scripted([tail] + ids_of(tok, ["Hi there.", "<|im_end|>"]))
    events, result = collect(stream_generate(model, tok, "Hello", enable_thinking=False, **GREEDY))
    assert [e.type for e in events] == ["answer"] * len(events)
    assert (result.thinking, result.answer) == ("", "Hi there.")


def test_qwq_style_prompt_starts_inside_the_thought(scripted):
    tok = tokenizer()
    reply = ids_of(tok, ["Hmm.", "</think>", "Done!", "<|im_end|>"])
    model, tok = scripted([198] + reply, template=qwq_template())
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<think>\n")
    events, result = collect(stream_generate(model, tok, "Solve it", **GREEDY))
    assert (result.thinking, result.answer) == ("Hmm.", "Done!")
    assert events[0].type == "thinking"


def test_empty_thought_of_a_soft_no_think_gives_no_thinking_events(scripted):
    tok = tokenizer()
    # Qwen3 answers /no_think with an empty block: <think>, newlines, </think>, newlines
    reply = ids_of(tok, ["<think>", "\n\n\n", "</think>", "\n\n", "OK.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    events, result = collect(stream_generate(model, tok, "Say OK /no_think", **GREEDY))
    assert {e.type for e in events} == {"answer"} and result.answer == "OK." and result.thinking == ""


def test_sampling_defaults_follow_the_mode_then_generation_config_then_the_user():
    o = GenerationOptions().sampling
    assert o.resolve(True, {}) == dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    assert o.resolve(False, {}) == dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
    assert o.resolve(False, {"temperature": 0.3, "top_k": None})["temperature"] == 0.3
    assert GenerationOptions.from_kwargs(temperature=0.1, top_k=5).sampling.resolve(False, {"temperature": 0.3}) == dict(
        temperature=0.1, top_p=0.8, top_k=5, min_p=0.0)


def test_soft_switches_set_the_mode():
    from mlx_qwen3.thinking import thinking_wanted

    def user(text):
        return {"role": "user", "content": text}

    assert thinking_wanted([user("hi")], None) is True
    assert thinking_wanted([user("hi /no_think")], None) is False
    assert thinking_wanted([user("hi /no_think"), {"role": "assistant", "content": "x"}, user("again")], None) is False
    assert thinking_wanted([user("/no_think"), {"role": "assistant", "content": "x"}, user("now /think")], None)
    assert thinking_wanted([{"role": "system", "content": "/no_think"}, user("q")], True) is False
    assert thinking_wanted([user("/think please")], False) is False  # enable_thinking=False is final
    assert thinking_wanted([user("a/no_think_b")], None) is True  # only the word itself counts


def test_thinking_budget_ends_the_thought_and_the_answer_follows(scripted):
    tok = tokenizer()
    loop = ids_of(tok, ["<think>", "a b", "a"])  # <think> a b a b ... forever
    after = [271] + ids_of(tok, ["Final.", "<|im_end|>"])  # the blank line the budget feeds, then the answer
    model, tok = scripted([prompt_tail(tok)] + loop, after)
    events, result = collect(stream_generate(model, tok, "Think hard", thinking_budget=7, **GREEDY))
    assert result.thinking.startswith("a ba ba b")
    assert result.thinking.endswith("I have to give the solution based on the thinking directly now.")
    assert result.answer == "Final." and result.finish_reason == "stop"
    wrap = tok.encode("\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n")
    assert result.generation_tokens == 1 + 7 + len(wrap) + 2 + 2  # <think>, budget, wrap-up, </think> \n\n, answer
    check_streams_add_up(events, result)


def test_max_tokens_mid_thought(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok)] + ids_of(tok, ["<think>", "a b", "a"]))
    result = generate(model, tok, "Think", max_tokens=12, **GREEDY)
    assert result.finish_reason == "length" and result.generation_tokens == 12
    assert result.answer == "" and result.thinking.startswith("a ba b")


def test_a_budget_reserves_room_for_the_answer_within_max_tokens(scripted):
    tok = tokenizer()
    loop = ids_of(tok, ["<think>", "a b", "a"])
    after = [271] + ids_of(tok, ["Final.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + loop, after)
    result = generate(model, tok, "Think", max_tokens=40, thinking_budget=1000, **GREEDY)
    assert result.answer == "Final." and result.generation_tokens <= 40


def test_budget_zero_with_a_prompt_inside_the_thought(scripted):
    tok = tokenizer()
    model, tok = scripted([198] + ids_of(tok, ["Hmm.", "</think>"]), [271] + ids_of(tok, ["Done!", "<|im_end|>"]),
                          template=qwq_template())
    result = generate(model, tok, "Solve", thinking_budget=0, **GREEDY)
    assert result.thinking.startswith("Considering the limited time") and result.answer == "Done!"


def test_tool_call_after_thinking(scripted):
    tok = tokenizer()
    call = '{"name":"f","arguments":{}}'
    reply = ids_of(tok, ["<think>", "Plan", "</think>", "<tool_call>", call, "</tool_call>", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    tools = [{"type": "function", "function": {"name": "f", "description": "does f", "parameters": {}}}]
    events, result = collect(stream_generate(model, tok, "Use f", tools=tools, **GREEDY))
    assert result.tool_calls == [{"name": "f", "arguments": {}}]
    assert [e.type for e in events] == ["thinking", "tool_call"] and events[1].text == call
    assert result.thinking == "Plan" and result.answer == ""


def test_malformed_tool_call_is_reported_not_dropped():
    """(With tools offered, the grammar keeps a model from writing one: this is the router's part.)"""
    from mlx_qwen3.thinking import ThinkingRouter

    tok = tokenizer()
    router = ThinkingRouter(tok)
    for t in ids_of(tok, ["<tool_call>", '{"name":"f",', "</tool_call>"]):
        router.feed(t)
    (call,) = router.tool_calls
    assert call["name"] is None and call["error"].startswith("invalid JSON")


def test_a_call_cut_off_by_max_tokens_is_reported(scripted):
    tok = tokenizer()
    reply = ids_of(tok, ["<tool_call>", '\n{"name":"f","arguments":{}}\n', "</tool_call>", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + reply)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    result = generate(model, tok, "Use f", tools=tools, enable_thinking=False, max_tokens=6, **GREEDY)
    (call,) = result.tool_calls
    assert call["error"] == "the tool call was cut off" and result.finish_reason == "length"


def test_characters_split_across_tokens_arrive_whole(scripted):
    tok = tokenizer()
    text = "𝔘 and ﷽"
    pieces = tok.encode(text)
    assert any(not _valid_utf8(tok.token_bytes(t)) for t in pieces)  # the test needs split characters
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + pieces + [tok.token_id("<|im_end|>")])
    events, result = collect(stream_generate(model, tok, "Say it", enable_thinking=False, **GREEDY))
    assert result.answer == text
    assert all("\ufffd" not in e.text and e.text for e in events)
    assert len(events) < len(pieces)  # some tokens produced no text until their character was whole


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streaming_detokenizer_equals_decode():
    from mlx_qwen3.tokenizer import StreamingDetokenizer

    tok = tokenizer()
    text = "Grüße, 世界! 🙂🙃 𝔘 ﷽ naïve café — <think>x</think>\n\n\tend"
    ids = ids_of(tok, [text[:30], "<think>", "x", "</think>", text[30:]])
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stops_at_every_eos_id_from_generation_config(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + ids_of(tok, ["Bye.", "<|endoftext|>"]))
    result = generate(model, tok, "Go", enable_thinking=False, **GREEDY)
    assert result.answer == "Bye." and result.finish_reason == "stop"


def test_cancel_from_another_thread(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + ids_of(tok, ["a b", "a"]))
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.time()
    result = generate(model, tok, "Loop", enable_thinking=False, cancel=cancel, max_tokens=100000, **GREEDY)
    assert result.finish_reason == "cancelled" and result.answer.startswith("a ba b")
    assert time.time() - start < 30


def test_sampling_with_a_seed_is_reproducible(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok)] + ids_of(tok, ["<think>", "a b", "a"]))
    a = generate(model, tok, "x", max_tokens=20, seed=3, temperature=5.0, top_k=0, top_p=1.0)
    b = generate(model, tok, "x", max_tokens=20, seed=3, temperature=5.0, top_k=0, top_p=1.0)
    c = generate(model, tok, "x", max_tokens=20, seed=4, temperature=5.0, top_k=0, top_p=1.0)
    assert (a.thinking, a.answer) == (b.thinking, b.answer)
    assert (a.thinking, a.answer) != (c.thinking, c.answer)


def test_chat_session_reuses_the_cache_and_rewinds_dropped_thinking(scripted):
    tok = tokenizer()
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    fed = []
    real_call = type(model).__call__

    def counting(self, ids, cache=None):
        fed.append(ids.shape[1])
        return real_call(self, ids, cache=cache)

    type(model).__call__ = counting
    try:
        session = ChatSession(model, tok, temperature=0)
        first = session.send("What is 2+2?")
        assert first.answer == "The answer is 4."
        fed.clear()
        second = session.send("And 3+3?")
    finally:
        type(model).__call__ = real_call
    messages = session.messages[:-1]
    ids = tok.encode(tok.apply_chat_template(messages))
    # shared with the first turn: everything up to its reply's "<|im_start|>assistant\n"; the
    # template drops the first turn's thinking, so the cache rewinds there
    first_prompt = tok.encode(tok.apply_chat_template(messages[:1]))
    common = len(first_prompt)
    assert ids[:common] == first_prompt
    assert fed[:2] == [len(ids) - common - 1, 1]  # the new tokens only (the last one alone, for its logits)
    assert second.answer == "The answer is 4." and second.prompt_tokens == len(ids)
    assert session.messages[1] == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Let me think"}
    # and the cached turn gives what a fresh generation over the same messages gives
    fresh = generate(model, tok, messages, temperature=0)
    assert (fresh.thinking, fresh.answer) == (second.thinking, second.answer)


@pytest.fixture(scope="module")
def ends_at_once(tmp_path_factory):
    """A model that answers <|im_end|> at once, built once for all of test_bad_options's cases."""
    tok = tokenizer()
    return load(build(tmp_path_factory.mktemp("ends"), successors([prompt_tail(tok), tok.token_id("<|im_end|>")])))


@pytest.mark.parametrize("options,message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(temperature="0.5"), "temperature must be a number, not '0.5'"),
    (dict(max_tokens=True), "max_tokens must be an integer"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k must be >= 0"),
    (dict(min_p=2), r"min_p must be in \[0, 1\]"),
    (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be in \[0.01, 10\]"),
    (dict(repetition_penalty=float("1e999")), r"repetition_penalty must be in \[0.01, 10\]"),
    (dict(presence_penalty=float("nan")), r"presence_penalty must be in \[-2, 2\], not nan"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=2**64), r"seed must be in \[0, 2\*\*64\)"),
    (dict(chat_template_kwargs={"messages": []}), "chat_template_kwargs may not set 'messages'"),
    (dict(thinking_budget=2, wrap_up="\ud800"), "wrap_up is not valid Unicode: a lone surrogate U\\+D800"),
    (dict(stop=["ok", "\udcff"]), "stop is not valid UTF-8: byte 0xff at offset 0"),
    (dict(chat_template_kwargs={"add_generation_prompt": False}), "may not set 'add_generation_prompt'"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(thinking_budget=-1), "thinking_budget must be >= 0"),
    (dict(temprature=1), "unknown generation option 'temprature'"),
])
def test_bad_options(ends_at_once, options, message):
    model, tok = ends_at_once
    with pytest.raises(UserError, match=message):
        generate(model, tok, "hi", **options)


def test_empty_and_too_long_prompts(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok), tok.token_id("<|im_end|>")], max_position_embeddings=64)
    with pytest.raises(UserError, match="the prompt is empty"):
        generate(model, tok, "   ")
    with pytest.raises(UserError, match="the conversation is empty"):
        generate(model, tok, [])
    with pytest.raises(UserError, match=r"the prompt is too long: \d+ tokens > 64 maximum \(the context window\)"):
        generate(model, tok, "word " * 100)


def test_generation_stops_at_the_context_window(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + ids_of(tok, ["a b", "a"]), max_position_embeddings=64)
    result = generate(model, tok, "Loop", enable_thinking=False, **GREEDY)
    assert result.finish_reason == "length" and result.prompt_tokens + result.generation_tokens == 64


def test_stop_strings_cut_the_answer(scripted):
    tok = tokenizer()
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    events, result = collect(stream_generate(model, tok, "q", stop=["answer i", "never"], **GREEDY))
    assert result.answer == "The " and result.finish_reason == "stop" and result.thinking == "Let me think"
    check_streams_add_up(events, result)
    held = generate(model, tok, "q", stop=["4.x"], **GREEDY)  # a stop string's start is held, then let go
    assert held.answer == "The answer is 4." and held.finish_reason == "stop"
    assert result.thinking_tokens == 5 and result.generation_tokens == 5 + 1 + 3  # <think> .. </think>, \n\n, 3 of the answer


def test_frequency_and_presence_penalties():
    from mlx_qwen3.sample import frequency_penalty, presence_penalty, repetition_penalty

    logits = mx.zeros((1, 5))
    seen = mx.array([3, 3, 1])
    assert frequency_penalty(0.5)(seen, logits).tolist() == [[0, -0.5, 0, -1.0, 0]]
    assert presence_penalty(0.5)(seen, logits).tolist() == [[0, -0.5, 0, -0.5, 0]]
    assert repetition_penalty(2.0)(seen, mx.array([[1.0, 1.0, 1.0, -1.0, 1.0]])).tolist() == [[1, 0.5, 1, -2, 1]]


def test_weights_stay_wired_while_any_generation_runs(answering, monkeypatch):
    """On Metal the recommended working set is wired for the generations' time, as mlx-lm does; two
    overlapping generations restore the old limit only when the last one ends."""
    limits = [0]

    def set_wired_limit(n):
        old = limits[-1]
        limits.append(n)
        return old

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 2**30})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    model, tok = answering
    first, second = (stream_generate(model, tok, "What is 2+2?", **GREEDY) for _ in range(2))
    next(first), next(second)
    assert limits == [0, 2**30]
    assert list(first)[-1].answer == "The answer is 4." and limits[-1] == 2**30  # the second still runs
    assert list(second)[-1].answer == "The answer is 4." and limits == [0, 2**30, 0]


def test_weights_over_the_working_set_warn_once(answering, monkeypatch, caplog):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 2**20})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)
    monkeypatch.setattr(memory, "wired", memory.WiredLimit())  # a fresh one, that has not warned yet
    monkeypatch.setenv("MLX_QWEN3_MEMORY_GB", "64")  # the memory plan counts more: it lets the prompt through
    model, tok = answering
    for _ in range(2):
        assert generate(model, tok, "What is 2+2?", **GREEDY).answer == "The answer is 4."
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "MB Metal keeps resident" in caplog.records[0].message


def test_none_means_the_default_for_stop_and_template_arguments():
    o = GenerationOptions.from_kwargs(stop=None, chat_template_kwargs=None)
    assert (o.stopping.stop, o.prompt.chat_template_kwargs) == ((), {})


def test_none_means_the_default_for_every_option(scripted):
    o = GenerationOptions.from_kwargs(max_tokens=None, repetition_penalty=None, presence_penalty=None, wrap_up=None)
    assert o == GenerationOptions()  # not None where the generator needs a value (it raised TypeError)
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok)] + ids_of(tok, ["<think>", "Hmm", "</think>", "Yes", "<|im_end|>"]))
    r = generate(model, tok, "x", max_tokens=None, repetition_penalty=None, thinking_budget=1, wrap_up=None, **GREEDY)
    assert r.finish_reason == "stop" and r.thinking.endswith("Considering the limited time, I have to give the solution "
                                                          "based on the thinking directly now.")  # the default wrap-up


def test_a_temperature_too_small_for_float32_samples_greedily(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok)] + ids_of(tok, ["<think>", "Let me think", "</think>", "Yes", "<|im_end|>"]))
    greedy = generate(model, tok, "x", temperature=0)
    for t in (1e-6, 1e-30, 1e-50):  # 1e-50 is 0 in float32: the division would give inf and NaN
        r = generate(model, tok, "x", temperature=t, seed=1)
        assert (r.thinking, r.answer) == (greedy.thinking, greedy.answer) == ("Let me think", "Yes")


def test_an_id_past_the_embedding_is_never_fed(checkpoint):
    from mlx_qwen3 import load_model

    model, _ = load_model(checkpoint("qwen3")[0])  # 256 embedding rows; the real tokenizer has 151,669 ids
    with pytest.raises(UserError, match=r"token id \d+ is past the model's 256-row embedding"):
        generate(model, tokenizer(), "hi", max_tokens=2)


def test_text_with_lone_surrogates_is_a_user_error(scripted):
    """The tokenizer cannot encode a lone surrogate (it raised TypeError: TextInputSequence must be str)."""
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok), tok.token_id("<|im_end|>")])
    cases = [
        ("\ud800", {}, r"the prompt is not valid Unicode: a lone surrogate U\+D800 at character 0"),
        ("caf\udce9", {}, "the prompt is not valid UTF-8: byte 0xe9 at offset 3"),  # as os.fsdecode keeps a byte
        ("hi", dict(system="be \udfff"), r"system is not valid Unicode: a lone surrogate U\+DFFF"),
        ([{"role": "user", "content": "a\ud83d"}], {}, r"message 0's content is not valid Unicode"),
        ("hi", dict(tools=[{"type": "function", "function": {"name": "f\ud800", "parameters": {}}}]),
         r"the prompt \(with its tools and template arguments\) is not valid Unicode"),
    ]
    for prompt, options, message in cases:
        with pytest.raises(UserError, match=message):
            generate(model, tok, prompt, **options)
        with pytest.raises(UserError, match="not valid"):
            ChatSession(model, tok, **options).send(prompt if isinstance(prompt, str) else prompt[0])


def test_a_cache_given_to_stream_generate_is_reused_and_holds_the_exchange(scripted):
    from mlx_qwen3.generate import prepare
    from mlx_qwen3.models.cache import PromptCache

    tok = tokenizer()
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    model, tok = scripted([prompt_tail(tok)] + reply)
    prompt = prepare(model, tok, "What is 2+2?", **GREEDY)
    cache = PromptCache.new(model)
    first = generate(model, tok, prompt, cache=cache)
    assert first.cached_tokens == 0 and cache.consistent
    assert cache.ids[:len(prompt.ids)] == prompt.ids and len(cache.ids) == len(prompt.ids) + first.generation_tokens + 1
    again = generate(model, tok, prompt, cache=cache)  # the same prompt: all but its last token reused
    assert again.cached_tokens == len(prompt.ids) - 1 and (again.thinking, again.answer) == (first.thinking, first.answer)


def test_options_are_grouped_and_their_errors_name_them(scripted):
    from mlx_qwen3.generate import prepare

    o = GenerationOptions.from_kwargs(temperature=0.2, max_tokens=5, system="s", stop=["x"])
    assert (o.sampling.temperature, o.stopping.max_tokens, o.prompt.system, o.stopping.stop) == (0.2, 5, "s", ("x",))
    for kwargs, param, code in [(dict(top_p=2), "top_p", "out_of_range"), (dict(seed="1"), "seed", "invalid_type"),
                                (dict(enable_thinking="no"), "enable_thinking", "invalid_type"),
                                (dict(chat_template_kwargs={"tools": 1}), "chat_template_kwargs",
                                 "reserved_template_argument"), (dict(cancel=None), "cancel", "unknown_parameter")]:
        with pytest.raises(UserError) as e:
            GenerationOptions.from_kwargs(**kwargs)
        assert (e.value.param, e.value.code) == (param, code)
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok), tok.token_id("<|im_end|>")], max_position_embeddings=64)
    with pytest.raises(UserError) as e:
        prepare(model, tok, "word " * 100)
    assert (e.value.param, e.value.code) == ("messages", "context_length_exceeded")
    with pytest.raises(UserError, match="a prepared prompt carries its options"):
        generate(model, tok, prepare(model, tok, "hi"), temperature=0)


def test_cancel_is_an_argument(scripted):
    tok = tokenizer()
    model, tok = scripted([prompt_tail(tok, enable_thinking=False)] + ids_of(tok, ["a b", "a"]))
    cancel = threading.Event()
    cancel.set()
    result = generate(model, tok, "Loop", cancel=cancel, enable_thinking=False, **GREEDY)
    assert result.finish_reason == "cancelled" and result.generation_tokens == 1
    session = ChatSession(model, tok, enable_thinking=False, **GREEDY)
    assert session.send("Loop", cancel=cancel).finish_reason == "cancelled"
    assert session.send("Loop", max_tokens=3).finish_reason == "length"  # the session's cache went on
