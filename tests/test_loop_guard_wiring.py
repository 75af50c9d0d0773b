"""The loop guard in the generator, the CLI and the server (issue 14), on checkpoints whose greedy output we
script in the real vocabulary (chain.py). Small settings (loop_min_tokens) keep the runs short."""

import json
import re
import subprocess
import sys

import httpx
import pytest
from chain import build, ids_of, successors, tokenizer
from conftest import _tail, serving

from mlx_qwen3 import UserError, load
from mlx_qwen3.generate import GenerationOptions, generate, stream_generate
from mlx_qwen3.options import NUDGE, WRAP_UP
from mlx_qwen3.server.engine import from_wire, to_wire

SMALL = dict(loop_min_tokens=16)  # a 7-token span repeated 3 times is a loop within ~21 tokens
GREEDY = dict(temperature=0)
MAX = 200
CYCLE = " I should count the apples again."  # 7 tokens, repeated forever
LINE = " I should count every red apple in this basket once more."  # 12 tokens: a line the recurring rule counts
RECUR = [" Hmm?", LINE]  # the line, with a short one (not counted) between its copies
ANSWER = "Four of them!"
COUNT = [":", " one two three four five six seven"]  # the answer's cycle: 8 tokens


def _model(folder, *scripts):
    return build(folder, successors(*scripts), max_position_embeddings=4096)


def _thought_cycle(tok, cycle: list) -> list:
    """Scripts: a thought that runs `cycle` forever, and goes back to it after the nudge; after the blank
    line that closes a thought, the answer."""
    nudge_end = tok.encode(NUDGE)[-1]
    blank = tok.encode("\n\n")[-1]
    return [[_tail(tok)] + ids_of(tok, ["<think>"]) + cycle + cycle[:1], [nudge_end, cycle[0]],
            [blank] + ids_of(tok, [ANSWER, "<|im_end|>"])]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = tokenizer()
    made = tmp_path_factory.mktemp("loopwire")
    used = set(ids_of(tok, [ANSWER, "\n\n"]))
    words = [i for i in range(1000, 30000) if re.fullmatch(r" [a-z]{3,}", tok.decode([i])) and i not in used]
    wander = words[:300]  # 300 different words: a long thought that never repeats
    plain = [_tail(tok, enable_thinking=False)] + ids_of(tok, ["Count"] + COUNT) + ids_of(tok, COUNT[:1])
    call = '{"name":"f","arguments":{}}'
    return {
        "cycling": _model(made / "cycling", *_thought_cycle(tok, ids_of(tok, [CYCLE]))),
        "recurring": _model(made / "recurring", *_thought_cycle(tok, ids_of(tok, RECUR))),
        "counting": _model(made / "counting", plain),
        "wandering": _model(made / "wandering", [_tail(tok)] + ids_of(tok, ["<think>"]) + wander
                            + ids_of(tok, ["</think>", "\n\n", ANSWER, "<|im_end|>"])),
        "calling": _model(made / "calling", [_tail(tok)] + ids_of(tok, ["<think>", "Plan", "</think>", "Sure, now",
                                                                         "<tool_call>", call, "</tool_call>",
                                                                         "<|im_end|>"])),
        "wander_text": tok.decode(wander),
    }


@pytest.fixture(scope="module")
def models(folders):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load(folders[name])
        return loaded[name]

    return get


def run(models, name, prompt="How many?", **options):
    model, tok = models(name)
    events = list(stream_generate(model, tok, prompt, **{**GREEDY, "max_tokens": MAX, **options}))
    result = events[-1]
    for channel in ("thinking", "answer"):  # what was streamed is what the result holds, in order
        assert "".join(e.text for e in events[:-1] if e.type == channel) == getattr(result, channel)
    return result


def actions(result) -> list:
    return [(r["channel"], r["kind"], r["action"]) for r in result.loops]


# ---- the Python API ----

def test_a_cycling_thought_is_nudged_then_closed_and_the_answer_follows(models):
    r = run(models, "cycling", **SMALL)
    assert actions(r) == [("thinking", "repeat", "nudged"), ("thinking", "repeat", "closed")]
    assert [x["period"] for x in r.loops] == [7, 7]
    first, second = (x["position"] for x in r.loops)
    assert 0 < first < second < r.generation_tokens
    assert r.answer == ANSWER and r.finish_reason == "stop"
    assert r.generation_tokens < MAX // 2  # well before max_tokens
    nudge = NUDGE.strip("\n")
    assert r.thinking.count(nudge) == 1 and r.thinking.endswith(WRAP_UP.strip("\n"))
    before, after = r.thinking.split(nudge)
    assert CYCLE.strip() in before and after.count(CYCLE) >= 3  # it looped again after the nudge


def test_the_same_thought_with_the_guard_off_runs_to_max_tokens(models):
    r = run(models, "cycling", loop_guard=False, **SMALL)
    assert r.loops == [] and r.finish_reason == "length" and r.generation_tokens == MAX
    assert r.answer == "" and NUDGE.strip() not in r.thinking


def test_at_the_defaults_a_short_cycle_is_left_alone_until_it_covers_256_tokens(models):
    r = run(models, "cycling", max_tokens=250)
    assert r.loops == [] and r.finish_reason == "length"


def test_a_line_recurring_with_other_text_between_is_a_loop(models):
    r = run(models, "recurring", loop_recurring=3, loop_window=64)
    assert actions(r) == [("thinking", "recurring", "nudged"), ("thinking", "recurring", "closed")]
    assert r.loops[0]["period"] == len(ids_of(tokenizer(), RECUR))  # from one copy to the next
    assert r.answer == ANSWER and r.finish_reason == "stop"
    # the same thought at the defaults: 3 copies of a 14-token span are far from 256 tokens, 32 lines from 3
    assert run(models, "recurring", max_tokens=120).loops == []


def test_a_loop_in_the_answer_ends_it_at_the_second_copy(models):
    r = run(models, "counting", enable_thinking=False, **SMALL)
    assert actions(r) == [("answer", "repeat", "stopped")] and r.loops[0]["period"] == 8
    assert r.answer == "Count" + "".join(COUNT)  # the repeated text once, never twice
    assert r.finish_reason == "stop" and r.generation_tokens < 40


def test_the_same_answer_with_the_guard_off_runs_to_max_tokens(models):
    r = run(models, "counting", enable_thinking=False, loop_guard=False, **SMALL)
    assert r.loops == [] and r.finish_reason == "length" and r.generation_tokens == MAX
    assert r.answer.count(COUNT[1]) > 20


def test_text_held_back_as_a_possible_copy_is_given_out_when_the_reply_ends(models):
    model, tok = models("counting")
    r = run(models, "counting", enable_thinking=False, max_tokens=20, **SMALL)  # 2 copies: not yet a loop
    assert r.loops == [] and r.finish_reason == "length"
    whole = generate(model, tok, "How many?", enable_thinking=False, max_tokens=20, loop_guard=False, **GREEDY)
    assert r.answer == whole.answer and whole.answer.count(COUNT[1]) == 2


def test_held_back_text_comes_before_a_stop_string_and_a_tool_call(models):
    r = run(models, "counting", enable_thinking=False, stop=["six"], **SMALL)
    assert r.answer == "Count: one two three four five " and r.finish_reason == "stop" and r.loops == []
    model, tok = models("calling")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    events = list(stream_generate(model, tok, "Use f", max_tokens=MAX, tools=tools, **SMALL, **GREEDY))
    kinds = [e.type for e in events[:-1]]
    assert kinds[-1] == "tool_call" and set(kinds[:-1]) == {"thinking", "answer"}
    assert "".join(e.text for e in events if e.type == "answer") == "Sure, now"  # all of it, before the call
    assert events[-1].tool_calls == [{"name": "f", "arguments": {}}]


def test_a_long_thought_that_does_not_repeat_is_never_touched(models, folders):
    r = run(models, "wandering", max_tokens=1000, **SMALL)
    assert r.loops == [] and r.thinking == folders["wander_text"] and r.answer == ANSWER
    assert r.finish_reason == "stop"


def test_loop_options_are_checked_once_with_their_names():
    for options, param in [({"loop_guard": "no"}, "loop_guard"), ({"loop_repeats": 1}, "loop_repeats"),
                           ({"loop_min_tokens": 0}, "loop_min_tokens"), ({"loop_recurring": 2.5}, "loop_recurring"),
                           ({"loop_window": 100}, "loop_window")]:  # 32 lines of 12 tokens need 384
        with pytest.raises(UserError) as e:
            GenerationOptions.from_kwargs(**options)
        assert e.value.param == param
    opts = GenerationOptions.from_kwargs(loop_repeats=4, loop_window=8192)
    assert (opts.loops.settings.repeats, opts.loops.settings.window) == (4, 8192)
    assert GenerationOptions.from_kwargs(loop_guard=False).loops.settings is None


def test_a_prompt_shared_between_ranks_keeps_the_loop_options(models):
    from mlx_qwen3.generate import prepare

    model, tok = models("counting")
    p = prepare(model, tok, "hi", loop_guard=False, loop_min_tokens=16)
    assert from_wire(json.loads(json.dumps(to_wire(p)))) == p


# ---- the CLI ----

def cli(folder, *args):
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), "--prompt", "How many?", "--temp", "0",
           "--max-tokens", str(MAX), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_reports_the_guard_on_one_plain_line(folders):
    out = cli(folders["cycling"], "--loop-min-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n").endswith(ANSWER) and NUDGE.strip() in out.stdout
    notes = [line for line in out.stderr.splitlines() if line.startswith("loop guard:")]
    assert len(notes) == 1 and "\x1b" not in notes[0]  # piped: plain
    assert re.fullmatch(r"loop guard: nudged the thought at token \d+ \(a 7-token span repeated\); "
                        r"closed the thought at token \d+ \(a 7-token span repeated\)", notes[0])
    assert "finish: stop" in out.stderr


def test_cli_answer_loop_json_and_no_loop_guard(folders):
    out = cli(folders["counting"], "--no-think", "--loop-min-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    done = records[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert [(x["channel"], x["action"], x["period"]) for x in done["loops"]] == [("answer", "stopped", 8)]
    assert "".join(r["text"] for r in records[:-1]) == done["answer"] == "Count" + "".join(COUNT)
    off = cli(folders["counting"], "--no-think", "--loop-min-tokens", "16", "--no-loop-guard")
    assert off.returncode == 0 and "loop guard" not in off.stderr and "finish: length" in off.stderr
    assert off.stdout.count(COUNT[1]) > 20


def test_cli_recurring_and_a_quiet_long_thought(folders):
    out = cli(folders["recurring"], "--loop-recurring", "3", "--loop-window", "64")
    assert out.returncode == 0 and out.stdout.rstrip("\n").endswith(ANSWER)
    period = len(ids_of(tokenizer(), RECUR))
    assert "nudged the thought" in out.stderr and f"a line recurring every {period} tokens" in out.stderr
    quiet = cli(folders["wandering"], "--loop-min-tokens", "16", "--max-tokens", "1000")
    assert quiet.returncode == 0 and "loop guard" not in quiet.stderr
    assert quiet.stdout.rstrip("\n").endswith(ANSWER)


def test_on_a_terminal_the_line_is_dimmed(monkeypatch, capsys):
    from mlx_qwen3 import terminal
    from mlx_qwen3.generate import GenerationResult

    loops = [{"channel": "answer", "kind": "recurring", "period": 40, "position": 900, "action": "stopped"}]
    result = GenerationResult("", "x", [], "stop", 5, 901, 0, 1.0, 1.0, 0.1, loops=loops)
    monkeypatch.setattr(terminal, "_isatty", lambda stream: True)
    terminal.Printer(False, False, True).show(result)
    line = capsys.readouterr().err.splitlines()[0]
    assert line == (f"{terminal.DIM}loop guard: stopped the answer at token 900 (a line recurring every 40 tokens)"
                    f"{terminal.RESET}")


def test_cli_bad_loop_settings_are_one_line(folders):
    out = cli(folders["counting"], "--loop-window", "100")
    assert out.returncode == 2 and out.stderr.startswith("error: loop_window must be at least 384")
    assert len(out.stderr.strip().splitlines()) == 1


# ---- the server ----

def ask(url, stream=False, **body):
    body = {"messages": [{"role": "user", "content": "How many?"}], "temperature": 0, "max_tokens": MAX,
            "stream": stream, **body}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    if not stream:
        return r
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_server_reports_the_guard_beside_usage_and_counts_it(models):
    with serving(*models("cycling")) as url:
        r = ask(url, loop_min_tokens=16).json()
        assert r["choices"][0]["message"]["content"] == ANSWER and r["choices"][0]["finish_reason"] == "stop"
        assert [(x["channel"], x["action"]) for x in r["loop_guard"]["loops"]] == [("thinking", "nudged"),
                                                                                    ("thinking", "closed")]
        assert r["usage"]["completion_tokens"] < MAX // 2
        off = ask(url, loop_min_tokens=16, loop_guard=False).json()
        assert off["loop_guard"] == {"loops": []} and off["choices"][0]["finish_reason"] == "length"
        chunks = ask(url, stream=True, loop_min_tokens=16)
        final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(final) == 1 and [x["action"] for x in final[0]["loop_guard"]["loops"]] == ["nudged", "closed"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ANSWER
        health = httpx.get(f"{url}/health").json()
        assert health["loop_guard"] == {"nudged": 2, "closed": 2, "stopped": 0}
        bad = ask(url, loop_window=100)
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "loop_window"


def test_server_answer_loop_recurring_and_quiet_thought(models):
    no_think = {"chat_template_kwargs": {"enable_thinking": False}}
    with serving(*models("counting")) as url:
        r = ask(url, loop_min_tokens=16, **no_think).json()
        assert r["choices"][0]["message"]["content"] == "Count" + "".join(COUNT)
        assert r["choices"][0]["finish_reason"] == "stop"
        assert [(x["channel"], x["kind"], x["action"]) for x in r["loop_guard"]["loops"]] == [
            ("answer", "repeat", "stopped")]
        chunks = ask(url, stream=True, loop_min_tokens=16, **no_think)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
            "Count" + "".join(COUNT)
        off = ask(url, loop_min_tokens=16, loop_guard=False, **no_think).json()
        assert off["choices"][0]["finish_reason"] == "length" and off["loop_guard"]["loops"] == []
        assert httpx.get(f"{url}/health").json()["loop_guard"] == {"nudged": 0, "closed": 0, "stopped": 2}
    with serving(*models("recurring")) as url:
        r = ask(url, loop_recurring=3, loop_window=64).json()
        assert [x["kind"] for x in r["loop_guard"]["loops"]] == ["recurring", "recurring"]
        assert r["choices"][0]["message"]["content"] == ANSWER
    with serving(*models("wandering")) as url:
        r = ask(url, loop_min_tokens=16, max_tokens=1000).json()
        assert r["loop_guard"] == {"loops": []} and r["choices"][0]["message"]["content"] == ANSWER
