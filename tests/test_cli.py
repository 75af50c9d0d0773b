"""python -m mlx_qwen3.generate, driven as a user would: pipes, a terminal, Ctrl-C, bad input."""

import json
import os
import pty
import select
import signal
import subprocess
import sys

import pytest
from chain import build, ids_of, successors, tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tokenizer()
    tail = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}]))[-1]
    reply = ids_of(tok, ["<think>", "Let me think", "</think>", "\n\n", "The answer is 4.", "<|im_end|>"])
    return build(tmp_path_factory.mktemp("cli"), successors([tail] + reply), max_position_embeddings=256)


@pytest.fixture(scope="module")
def looping_dir(tmp_path_factory):
    tok = tokenizer()
    tail = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], enable_thinking=False))[-1]
    return build(tmp_path_factory.mktemp("loop"), successors([tail] + ids_of(tok, ["a b", "a"])), max_position_embeddings=100000)


def cli(*args, stdin=None):
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def one_line_error(out, *phrases):
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for p in phrases:
        assert p in out.stderr


def test_plain_output_marks_the_thinking_and_puts_stats_on_stderr(model_dir):
    out = cli("--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "<think>\nLet me think\n</think>\n\nThe answer is 4.\n"
    assert "generation: 12 tokens" in out.stderr and "finish: stop" in out.stderr


def test_hide_thinking_and_prompt_from_stdin(model_dir):
    out = cli("--model", str(model_dir), "--prompt", "-", "--temp", "0", "--hide-thinking", stdin="What is 2+2?")
    assert out.returncode == 0 and out.stdout == "The answer is 4.\n"


def test_json_lines(model_dir):
    out = cli("--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0", "--json")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert {line["type"] for line in lines[:-1]} == {"thinking", "answer"}
    done = lines[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["thinking"] == "Let me think" and done["answer"] == "The answer is 4." and done["tool_calls"] == []
    assert "".join(line["text"] for line in lines if line["type"] == "answer") == done["answer"]
    assert {"prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "peak_memory"} <= set(done)


def test_on_a_terminal_thinking_is_dimmed_and_labelled(model_dir):
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(model_dir),
                                  "--prompt", "What is 2+2?", "--temp", "0"])
    output = b""
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], 60)
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    text = output.decode()
    assert "\x1b[2mThinking:\r\nLet me think\x1b[0m\r\n\r\nThe answer is 4." in text


def test_ctrl_c_stops_cleanly_with_exit_130(looping_dir):
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(looping_dir), "--prompt", "Loop",
           "--no-think", "--temp", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = b""
    while len(first) < 6:  # generation is under way (os.read: communicate reads the fd, not the buffer)
        first += os.read(proc.stdout.fileno(), 64)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert (first + rest).decode().startswith("a ba b")
    assert b"Traceback" not in err and b"finish: cancelled" in err


def test_chat_repl(model_dir):
    script = "What is 2+2?\n/no_think\n/budget 3\n/budget x\n/reset\nAgain?\n/exit\n"
    out = cli("--model", str(model_dir), "--chat", "--temp", "0", stdin=script)
    assert out.returncode == 0, out.stderr
    # two replies; the second, after /no_think, without a thought
    assert out.stdout.count("The answer is 4.") == 2 and out.stdout.count("<think>") == 1
    assert "usage: /budget N, or /budget off" in out.stderr
    assert out.stderr.count("finish:") == 2


@pytest.mark.parametrize("args,stdin,phrases", [
    (["--prompt", ""], None, ["the prompt is empty"]),
    (["--prompt", "-"], "  \n", ["the prompt is empty"]),
    (["--prompt", "word " * 300], None, ["the prompt is", "the context window is 256"]),
    (["--prompt", "hi", "--temp", "-1"], None, ["temperature must be >= 0"]),
    (["--prompt", "hi", "--top-p", "1.5"], None, ["top_p must be in (0, 1]"]),
    (["--prompt", "hi", "--max-tokens", "many"], None, ["'many' is not a valid integer"]),
    ([], None, ["give --prompt TEXT"]),
])
def test_bad_input_is_one_line(model_dir, args, stdin, phrases):
    one_line_error(cli("--model", str(model_dir), *args, stdin=stdin), *phrases)


def test_unknown_model_is_one_line(tmp_path):
    one_line_error(cli("--model", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")
