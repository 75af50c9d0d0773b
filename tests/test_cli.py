"""python -m mlx_qwen3.generate, driven as a user would: pipes, a terminal, Ctrl-C, bad input."""

import json
import os
import pty
import select
import signal
import subprocess
import sys

from pathlib import Path

import pytest
from chain import build, ids_of, successors, tokenizer
from warm_cli import run_many


def thinking_model(folder, thought: str, answer: str):
    """A scripted checkpoint that thinks `thought`, then answers `answer`."""
    tok = tokenizer()
    tail = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}]))[-1]
    reply = ids_of(tok, ["<think>", thought, "</think>", "\n\n", answer, "<|im_end|>"])
    return build(folder, successors([tail] + reply), max_position_embeddings=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return thinking_model(tmp_path_factory.mktemp("cli"), "Let me think", "The answer is 4.")


def cli(*args, stdin=None):
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def one_line_error(out, *phrases):
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    for p in phrases:
        assert p in out.stderr


def test_plain_output_marks_the_thinking_and_puts_stats_on_stderr(warm):
    out = warm.cli("--model", warm.model, "--prompt", "What is 2+2?", "--temp", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "<think>\nLet me think\n</think>\n\nThe answer is 4.\n"
    assert "generation: 12 tokens" in out.stderr and "finish: stop" in out.stderr


def test_hide_thinking_and_prompt_from_stdin(warm):
    out = warm.cli("--model", warm.model, "--prompt", "-", "--temp", "0", "--hide-thinking", stdin="What is 2+2?")
    assert out.returncode == 0 and out.stdout == "The answer is 4.\n"


def test_json_lines(warm):
    out = warm.cli("--model", warm.model, "--prompt", "What is 2+2?", "--temp", "0", "--json")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert {line["type"] for line in lines[:-1]} == {"thinking", "answer"}
    done = lines[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["thinking"] == "Let me think" and done["answer"] == "The answer is 4." and done["tool_calls"] == []
    assert "".join(line["text"] for line in lines if line["type"] == "answer") == done["answer"]
    assert {"prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "peak_memory"} <= set(done)


def test_on_a_terminal_thinking_is_dimmed_and_labelled(model_dir):
    text, _ = pty_run(["--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0"], [])
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


CHAT_SCRIPT = "What is 2+2?\n/no_think\n/budget 3\n/budget x\n/reset\nAgain?\n/exit\n"


def test_chat_repl(warm):
    out = warm.cli("--model", warm.model, "--chat", "--temp", "0", stdin=CHAT_SCRIPT)
    assert out.returncode == 0, out.stderr
    # two replies; the second, after /no_think, without a thought
    assert out.stdout.count("The answer is 4.") == 2 and out.stdout.count("<think>") == 1
    assert "usage: /budget N, or /budget off" in out.stderr
    assert out.stderr.count("finish:") == 2


# ---- runs that only read their arguments and input, from one warm interpreter (tests/warm_cli.py) ----

class Warm:
    """Every run warm_runs() lists, done at once: run(module, *args, stdin=None) -> its CompletedProcess
    (stdout and stderr bytes). `model` is model_dir, `nope` a model folder that does not exist."""

    def __init__(self, model: str, nope: str, folder: Path):
        self.model, self.nope = model, nope
        runs = warm_runs(model, nope)
        self.done = {self.key(*r): out for r, out in zip(runs, run_many(runs, folder, Path(cwd_env()["PYTHONPATH"]
                                                                                          .split(os.pathsep)[0])))}

    @staticmethod
    def key(module, args, stdin=None):
        return module, tuple(os.fsdecode(a) for a in args), stdin.encode() if isinstance(stdin, str) else stdin

    def run(self, module, *args, stdin=None):
        return self.done[self.key(module, args, stdin)]  # a KeyError: add the run to warm_runs()

    def cli(self, *args, stdin=None):
        """As cli() reads it: text."""
        out = self.run("mlx_qwen3.generate", *args, stdin=stdin)
        return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())

    def run_bytes(self, *args, stdin=b""):
        """As run_bytes() reads it: stdout bytes, stderr text."""
        out = self.run("mlx_qwen3.generate", *args, stdin=stdin)
        return subprocess.CompletedProcess(out.args, out.returncode, out.stdout,
                                           out.stderr.decode("utf-8", "backslashreplace"))


def warm_runs(model: str, nope: str) -> list:
    """(module, args, stdin) of every run the tests read from `warm`."""
    generate, question = "mlx_qwen3.generate", ["--prompt", "What is 2+2?", "--temp", "0"]
    runs = [(generate, ["--model", model, *question], None), (generate, ["--model", model, *question, "--json"], None),
            (generate, ["--model", model, "--prompt", "-", "--temp", "0", "--hide-thinking"], "What is 2+2?"),
            (generate, ["--model", model, "--chat", "--temp", "0"], CHAT_SCRIPT)]
    runs += [(generate, ["--model", model, "--chat", "--temp", "0"], f"/budget {b}\nWhat is 2+2?\n") for b in BUDGETS]
    runs += [("mlx_qwen3.load", [model], None), ("mlx_qwen3", ["info", model], None)]
    runs += [(generate, ["--model", model, *args], stdin) for args, stdin, _ in BAD_INPUT]
    runs.append((generate, ["--model", nope, "--prompt", "hi"], None))
    runs += [(generate, ["--model", model, *args], stdin) for args, stdin, _ in NOT_UTF8]
    runs += [(generate, ["--model", nope, "--prompt", "hi", *args], None) for args, _ in BAD_OPTIONS]
    runs += [(generate, ["--model", model, "--prompt", "What is 2+2?", *args], None) for args in EXTREME]
    runs += [(f"mlx_qwen3.{m}", ["--help"], None) for m in ALIASES]
    runs += [("mlx_qwen3", [c, "--help"], None) for c in ALIASES.values()]
    runs += [("mlx_qwen3", ["--help"], None)] + [("mlx_qwen3", args, None) for args, _ in NO_COMMAND]
    return runs


@pytest.fixture(scope="module")
def warm(model_dir, tmp_path_factory):
    return Warm(str(model_dir), str(tmp_path_factory.mktemp("none") / "nope"), tmp_path_factory.mktemp("warm"))


def test_the_warm_runs_read_as_fresh_processes(warm):
    """What tests/warm_cli.py gives is what `python -m` in a new process gives: a prompt over the context
    (the model loads), arguments that are not UTF-8, and help."""
    for module, args, stdin in [("mlx_qwen3.generate", ["--model", warm.model, *BAD_INPUT[2][0]], None),
                                ("mlx_qwen3.generate", ["--model", warm.model, *NOT_UTF8[2][0]], NOT_UTF8[2][1]),
                                ("mlx_qwen3.server", ["--help"], None)]:
        fresh = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True,
                               timeout=120, env=cwd_env())
        got = warm.run(module, *args, stdin=stdin)
        assert (got.returncode, got.stdout, got.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


BAD_INPUT = [
    (["--prompt", ""], None, ["the prompt is empty"]),
    (["--prompt", "-"], "  \n", ["the prompt is empty"]),
    (["--prompt", "word " * 300], None, ["the prompt is too long", "> 256 maximum (the context window)"]),
    (["--prompt", "hi", "--temp", "-1"], None, ["temperature must be >= 0"]),
    (["--prompt", "hi", "--top-p", "1.5"], None, ["top_p must be in (0, 1]"]),
    (["--prompt", "hi", "--max-tokens", "many"], None, ["'many' is not a valid integer"]),
    ([], None, ["give --prompt TEXT"]),
]


@pytest.mark.parametrize("args,stdin,phrases", BAD_INPUT)
def test_bad_input_is_one_line(warm, args, stdin, phrases):
    one_line_error(warm.cli("--model", warm.model, *args, stdin=stdin), *phrases)


def test_unknown_model_is_one_line(warm):
    one_line_error(warm.cli("--model", warm.nope, "--prompt", "hi"), "does not exist")


# ---- faults: input that is not UTF-8, a stdout that is closed or full, odd option values, signals ----

GREEDY_REPLY = "<think>\nLet me think\n</think>\n\nThe answer is 4.\n"


def run_bytes(*args, stdin=b"", **kwargs):
    """The CLI with arguments and stdin as bytes (as a shell passes them); stderr decoded for reading."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", *args]
    out = subprocess.run(cmd, input=stdin, stderr=subprocess.PIPE, timeout=120, **kwargs)
    out.stderr = out.stderr.decode("utf-8", "backslashreplace")
    return out


def no_traceback(stderr):
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


NOT_UTF8 = [
    (["--prompt", "-"], b"What is \xff?", "stdin is not valid UTF-8: byte 0xff at offset 8"),
    (["--prompt", "-", "--json"], b"\xed\xa0\x80", "stdin is not valid UTF-8: byte 0xed at offset 0"),  # a surrogate
    ([b"--prompt", b"What is \xfe2+2?"], b"", "--prompt is not valid UTF-8: byte 0xfe at offset 8"),
    (["--prompt", "hi", b"--system", b"be \xff"], b"", "system is not valid UTF-8: byte 0xff at offset 3"),
    (["--chat", b"--prompt", b"\xff"], b"", "--prompt is not valid UTF-8: byte 0xff at offset 0"),
]


@pytest.mark.parametrize("args,stdin,message", NOT_UTF8)
def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(warm, args, stdin, message):
    """Refused, not decoded with replacement characters: a prompt must not change meaning unseen."""
    one_line_error(warm.run_bytes("--model", warm.model, *args, stdin=stdin), message)


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])  # how Python reads stdin: Linux's C.UTF-8, macOS
def test_in_chat_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(model_dir, errors):
    script = b"What \xff?\n/budget \xfe\nWhat is 2+2?\n/exit\n"
    env = dict(os.environ, PYTHONIOENCODING=f"utf-8:{errors}")
    out = run_bytes("--model", str(model_dir), "--chat", "--temp", "0", stdin=script, env=env)
    assert out.returncode == 0, out.stderr
    no_traceback(out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: that line is not valid UTF-8: byte 0xff at offset 5; nothing was sent",
                      "error: that line is not valid UTF-8: byte 0xfe at offset 8; nothing was sent"]
    assert out.stdout.count(b"The answer is 4.") == 1 and out.stderr.count("finish:") == 1


BUDGETS = ["9" * 5000, "\u00b2"]


@pytest.mark.parametrize("budget", BUDGETS, ids=["5000 digits", "superscript 2"])
def test_in_chat_a_budget_that_is_no_number_is_a_usage_line(warm, budget):
    out = warm.cli("--model", warm.model, "--chat", "--temp", "0", stdin=f"/budget {budget}\nWhat is 2+2?\n")
    assert out.returncode == 0, out.stderr
    no_traceback(out.stderr)
    assert "usage: /budget N, or /budget off" in out.stderr and out.stdout.count("The answer is 4.") == 1


CHAT = (["--chat"], b"What is 2+2?\n")
MODES = {"plain": ([], b""), "json": (["--json"], b""), "chat": CHAT}


@pytest.mark.parametrize("mode", MODES)
def test_a_stdout_whose_reader_is_gone_ends_quietly_with_141(model_dir, mode):
    """As `yes | head` ends: no traceback, no "Exception ignored" from the flush at exit, 128 + SIGPIPE."""
    extra, stdin = MODES[mode]
    read, write = os.pipe()
    os.close(read)
    try:
        out = run_bytes("--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0", *extra,
                        stdin=stdin, stdout=write)
    finally:
        os.close(write)
    assert out.returncode == 141, out.stderr
    no_traceback(out.stderr)
    assert "error" not in out.stderr


@pytest.mark.parametrize("mode", MODES)
def test_head_takes_what_it_wants_and_the_generator_ends_quietly(looping_dir, mode):
    extra, stdin = MODES[mode]
    args = " ".join(f"'{a}'" for a in [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(looping_dir),
                                         "--prompt", "Loop", "--no-think", "--temp", "0", "--max-tokens", "5000",
                                         *extra])
    script = f"{args} 2>err | head -c 10 >head.out; echo ${{PIPESTATUS[0]}} >status"
    folder = looping_dir.parent / f"head-{mode}"
    folder.mkdir(exist_ok=True)
    subprocess.run(["bash", "-c", script], input=stdin, cwd=folder, timeout=120, env=cwd_env())
    assert (folder / "status").read_text().strip() == "141"
    assert len((folder / "head.out").read_bytes()) == 10
    no_traceback((folder / "err").read_text())


def cwd_env():
    """The subprocess runs in another folder: it must import the mlx_qwen3 these tests import."""
    import mlx_qwen3

    root = os.path.dirname(os.path.dirname(os.path.abspath(mlx_qwen3.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))  # a "disk" that is full after 8 bytes (EFBIG)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("full", ["/dev/full", "file size limit"])
def test_a_full_stdout_is_one_line(model_dir, tmp_path, mode, full):
    extra, stdin = MODES[mode]
    if full == "/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here (macOS); the file size limit gives the same kind of failure")
    target = "/dev/full" if full == "/dev/full" else tmp_path / "out"
    with open(target, "wb") as f:
        out = run_bytes("--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0", *extra, stdin=stdin,
                        stdout=f, preexec_fn=None if full == "/dev/full" else limit_file_size)
    assert out.returncode == 1, out.stderr
    no_traceback(out.stderr)
    reason = "No space left on device" if full == "/dev/full" else "File too large"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot write the output: {reason}"], out.stderr


def test_a_closed_stdout_is_one_line_before_the_model_loads(tmp_path):
    out = run_bytes("--model", str(tmp_path / "nope"), "--prompt", "hi", stdout=subprocess.DEVNULL,
                    preexec_fn=lambda: os.close(1))
    assert out.returncode == 1 and out.stderr == "error: cannot write the output: stdout is closed\n", out.stderr


@pytest.mark.parametrize("args,code,stdout", [
    (["--prompt", "-"], 2, ""),  # nothing to read: the prompt is empty
    (["--chat"], 0, ">>> "),  # end of input at once: the session ends
])
def test_a_closed_stdin_reads_as_empty(model_dir, args, code, stdout):
    """Before, MLX could not load the checkpoint: the file opened as fd 0, which it takes for a failure."""
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(model_dir), "--temp", "0", *args],
                         capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert out.returncode == code and out.stdout == stdout, out.stderr
    no_traceback(out.stderr)


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_a_stderr_that_cannot_be_written_changes_nothing(model_dir, tmp_path, stderr):
    """The statistics cannot be shown; the reply is whole and the exit status 0."""
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--model", str(model_dir), "--prompt", "What is 2+2?",
           "--temp", "0"]
    if stderr == "closed":
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(2))
    else:
        with open(tmp_path / "err", "wb") as f:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=120,
                                 preexec_fn=limit_file_size)
    assert out.returncode == 0 and out.stdout == GREEDY_REPLY


@pytest.fixture(scope="module")
def unicode_dir(tmp_path_factory):
    return thinking_model(tmp_path_factory.mktemp("unicode"), "Ça va", "你好 — é")


@pytest.mark.parametrize("extra,expected", [
    ([], "\\u4f60\\u597d \\u2014 \\xe9"),
    (["--json"], '"answer": "\\u4f60\\u597d \\u2014 \\u00e9"'),
])
def test_a_stdout_that_is_not_utf8_gets_escapes_not_a_traceback(unicode_dir, extra, expected):
    """As with a latin-1 or ASCII locale: what it cannot encode is written as escapes."""
    env = dict(os.environ, PYTHONIOENCODING="ascii:strict")
    out = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(unicode_dir), "--prompt", "hi",
                          "--temp", "0", *extra], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout


BAD_OPTIONS = [
    (["--seed", "-1"], "seed must be in [0, 2**64), not -1"),
    (["--seed", str(2**64)], "seed must be in [0, 2**64)"),
    (["--seed", "9" * 5000], "'--seed'"),  # more digits than int() reads
    (["--max-tokens", "0"], "max_tokens must be at least 1, not 0"),
    (["--thinking-budget", "-1"], "thinking_budget must be >= 0, not -1"),
    (["--temp", "nan"], "temperature must be >= 0 and finite, not nan"),
    (["--temp", "inf"], "temperature must be >= 0 and finite, not inf"),
    (["--temp", "1" + "0" * 400], "temperature must be >= 0 and finite, not inf"),
    (["--top-p", "nan"], "top_p must be in (0, 1], not nan"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--min-p", "nan"], "min_p must be in [0, 1], not nan"),
    (["--presence-penalty", "-inf"], "presence_penalty must be in [-2, 2], not -inf"),
    (["--repetition-penalty", "1e999"], "repetition_penalty must be in [0.01, 10] (1: off), not inf"),
    (["--repetition-penalty", "0.001"], "repetition_penalty must be in [0.01, 10]"),
    (["--repetition-penalty", "11"], "repetition_penalty must be in [0.01, 10]"),
    (["--seed", "0x10"], "'0x10' is not a valid integer"),
    (["--json-schema", "/nonexistent/schema.json"], "--json-schema /nonexistent/schema.json cannot be read"),
    (["--json-schema", __file__], f"--json-schema {__file__} is not JSON"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a)[:24] for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line_before_the_model_loads(warm, args, message):
    """The model folder does not exist: the option is what is reported, so it was checked first."""
    one_line_error(warm.cli("--model", warm.nope, "--prompt", "hi", *args), message)


EXTREME = [["--temp", "1e-50"], ["--temp", "5e-324", "--seed", str(2**64 - 1)],
           ["--temp", "0", "--max-tokens", str(10**30), "--repetition-penalty", "10"]]


@pytest.mark.parametrize("args", EXTREME)
def test_extreme_values_in_range_work(warm, args):
    """A temperature that underflows float32 samples greedily (the scripted reply), not NaN garbage."""
    out = warm.cli("--model", warm.model, "--prompt", "What is 2+2?", *args)
    assert out.returncode == 0 and out.stdout == GREEDY_REPLY, out.stderr


def pty_run(args, steps, timeout=60):
    """Run the CLI on a terminal: steps are bytes to type, ("wait", bytes) to await, or a signal to send.
    Returns (all output, exit status or -signal)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "mlx_qwen3.generate", *args])
    output = b""

    def read_until(needle):
        nonlocal output
        while needle not in output:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no {needle!r} in {output!r}"
            output += os.read(fd, 4096)

    import time

    for step in steps:
        if isinstance(step, tuple):
            read_until(step[1])
        elif isinstance(step, bytes):
            time.sleep(0.3)  # readline is waiting (a Ctrl-C just before it is lost in CPython's readline)
            os.write(fd, step)
        else:
            os.kill(pid, step)
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return output.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("steps,code", [
    # a Ctrl-C stops the reply, the session goes on; Ctrl-D leaves
    ([("wait", b">>> "), b"hi\n", ("wait", b"a ba b"), b"\x03", ("wait", b"finish: cancelled"), ("wait", b">>> "),
      b"\x04"], 0),
    ([("wait", b">>> "), b"\x03"], 130),  # at the prompt: leave
    ([("wait", b">>> "), b"hi\n", ("wait", b"a ba b"), b"\x03", ("wait", b">>> "), b"\x03"], 130),
    ([("wait", b">>> "), b"hi\n", ("wait", b"a ba b"), signal.SIGTERM], -signal.SIGTERM),
    ([("wait", b">>> "), signal.SIGTERM], -signal.SIGTERM),
], ids=["reply ^C, ^D", "prompt ^C", "reply ^C, prompt ^C", "reply SIGTERM", "prompt SIGTERM"])
def test_chat_on_a_terminal_ends_without_a_traceback(looping_dir, steps, code):
    output, status = pty_run(["--model", str(looping_dir), "--chat", "--no-think", "--temp", "0"], steps)
    assert status == code, output
    no_traceback(output)


# A SIGINT raised from an import hook when `module` is imported: made certain, the Ctrl-C of a user who
# presses it at once. A sitecustomize, so that the command starts as a user starts it (python -m, the script).
CTRL_C_HOOK = """
import os, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["INTERRUPT_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Hook())
"""


@pytest.mark.parametrize("form", ["alias", "group", "script"])
@pytest.mark.parametrize("module", ["mlx.core", "click", "mlx_qwen3.load"])
def test_ctrl_c_while_starting_is_exit_130_without_a_traceback(model_dir, tmp_path, module, form):
    """A Ctrl-C that lands while the modules import: python -m mlx_qwen3.generate, python -m mlx_qwen3
    generate and the mlx-qwen3 script."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_HOOK)
    env = cwd_env()
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), env["PYTHONPATH"]]), INTERRUPT_AT=module)
    out = subprocess.run([*COMMAND_FORMS[form](tmp_path), "--model", str(model_dir), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 130, out.stderr
    no_traceback(out.stderr)
    assert out.stdout == ""


RUN_CLI = """
import click
from mlx_qwen3.errors import run_cli

@click.command()
def cli():
    print("x" * 100)  # not flushed: written (or not) by the flush on the way out

run_cli(cli)
"""


@pytest.mark.parametrize("stdout", ["reader gone", "full"])
def test_every_cli_reports_output_it_could_not_write_on_the_way_out(tmp_path, stdout):
    """errors.run_cli, which convert, load, server and selftest share: output still buffered at the end
    gave "Exception ignored ... BrokenPipeError" and exit status 120."""
    cmd = [sys.executable, "-c", RUN_CLI]
    if stdout == "reader gone":
        read, write = os.pipe()
        os.close(read)
        out = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(write)
        assert out.returncode == 141 and out.stderr == "", out.stderr
    else:
        with open(tmp_path / "out", "wb") as f:
            out = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, timeout=60,
                                 preexec_fn=limit_file_size)
        assert out.returncode == 1 and out.stderr == "error: cannot write the output: File too large\n", out.stderr


# ---- one CLI: python -m mlx_qwen3 COMMAND, the mlx-qwen3 script, and the python -m mlx_qwen3.X aliases ----

def console_script(folder):
    """The mlx-qwen3 script as pip writes it from pyproject.toml's [project.scripts] entry."""
    import re

    root = cwd_env()["PYTHONPATH"].split(os.pathsep)[0]
    target = re.search(r'^mlx-qwen3 = "(.+)"$', open(os.path.join(root, "pyproject.toml")).read(), re.M).group(1)
    module, function = target.split(":")
    script = folder / "mlx-qwen3"
    script.write_text(f"import re\nimport sys\nfrom {module} import {function}\nif __name__ == '__main__':\n"
                      f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({function}())\n")
    return script


COMMAND_FORMS = {
    "alias": lambda folder: [sys.executable, "-m", "mlx_qwen3.generate"],
    "group": lambda folder: [sys.executable, "-m", "mlx_qwen3", "generate"],
    "script": lambda folder: [sys.executable, str(console_script(folder)), "generate"],
}
ALIASES = {"generate": "generate", "server": "serve", "convert": "convert", "load": "info", "selftest": "selftest",
           "menubar": "menubar", "memory": "plan"}


def run(*cmd, **kwargs):
    kwargs = {"env": cwd_env(), "stdout": subprocess.PIPE, **kwargs}
    return subprocess.run(list(cmd), stderr=subprocess.PIPE, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("form", COMMAND_FORMS)
def test_every_form_of_the_command_generates_the_same(model_dir, tmp_path, form):
    out = run(*COMMAND_FORMS[form](tmp_path), "--model", str(model_dir), "--prompt", "What is 2+2?", "--temp", "0")
    assert out.returncode == 0 and out.stdout == GREEDY_REPLY, out.stderr
    assert out.stderr.startswith("prompt: ") and out.stderr.count("\n") == 1, out.stderr  # the stats, no warning


def text(out):
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())


def test_help_lists_the_commands(warm):
    out = text(warm.run("mlx_qwen3", "--help"))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("Usage: python -m mlx_qwen3 [OPTIONS] [COMMAND] [ARGS]...")
    listed = [line.split()[0] for line in out.stdout.split("Commands:\n")[1].splitlines() if line.strip()]
    assert sorted(listed) == sorted(ALIASES.values())


NO_COMMAND = [([], "give a command: generate, serve, convert, info, plan, selftest, menubar"),
              (["nope"], "no command 'nope': give one of generate, serve"),
              (["generate", "--nope"], "No such option '--nope'")]


@pytest.mark.parametrize("args,phrase", NO_COMMAND)
def test_no_command_or_an_unknown_one_is_one_line(warm, args, phrase):
    one_line_error(text(warm.run("mlx_qwen3", *args)), phrase)


@pytest.mark.parametrize("module", ALIASES)
def test_each_alias_is_its_command(warm, module):
    """python -m mlx_qwen3.X --help says what `python -m mlx_qwen3 COMMAND --help` says, under its own name,
    with a clean stderr (runpy's warning about a module run twice is filtered for generate and load)."""
    alias = text(warm.run(f"mlx_qwen3.{module}", "--help"))
    command = text(warm.run("mlx_qwen3", ALIASES[module], "--help"))
    assert alias.returncode == command.returncode == 0 and alias.stderr == command.stderr == "", alias.stderr
    assert alias.stdout.startswith(f"Usage: python -m mlx_qwen3.{module} ")
    assert alias.stdout.split("\n", 1)[1] == command.stdout.split("\n", 1)[1]


def test_the_load_alias_and_info_print_the_same(warm):
    alias = text(warm.run("mlx_qwen3.load", warm.model))
    info = text(warm.run("mlx_qwen3", "info", warm.model))
    assert alias.returncode == info.returncode == 0 and alias.stderr == info.stderr == "", alias.stderr
    assert json.loads(alias.stdout) == json.loads(info.stdout) and json.loads(info.stdout)["layers"] == 1


@pytest.mark.parametrize("form", ["alias", "group"])
def test_bad_input_is_one_line_in_every_form(tmp_path, form):
    server = ["mlx_qwen3.server"] if form == "alias" else ["mlx_qwen3", "serve"]
    one_line_error(run(sys.executable, "-m", *server, "--model", str(tmp_path / "none")), "does not exist")
    out = run(*COMMAND_FORMS[form](tmp_path), "--model", str(tmp_path / "nope"), "--prompt", "hi",
              stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert out.returncode == 1 and out.stderr == "error: cannot write the output: stdout is closed\n", out.stderr


def test_importing_generate_gives_the_module():
    import types

    import mlx_qwen3
    import mlx_qwen3.generate as m
    from mlx_qwen3.generate import generate

    assert isinstance(m, types.ModuleType) and m.__name__ == "mlx_qwen3.generate" and mlx_qwen3.generate is m
    assert callable(generate) and generate is m.generate
    import mlx_qwen3.load  # noqa: F401  (the submodule is imported; the package's `load` stays the function)

    assert callable(mlx_qwen3.load) and not isinstance(mlx_qwen3.load, types.ModuleType)
    assert mlx_qwen3.ChatSession is m.ChatSession and mlx_qwen3.stream_generate is m.stream_generate


def hub_env(hf_home):
    env = {k: v for k, v in cwd_env().items() if not k.startswith("HF_")}
    return dict(env, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")


def test_without_model_the_default_runs_through_the_hub_cache(model_dir, tmp_path):
    """The default id goes through load.resolve -> huggingface_hub.snapshot_download, here offline on a
    cache that holds a stand-in under that id."""
    import shutil

    from mlx_qwen3.cli import DEFAULT_MODEL

    repo = tmp_path / "hub" / ("models--" + DEFAULT_MODEL.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = run(sys.executable, "-m", "mlx_qwen3.generate", "--prompt", "hi", "--max-tokens", "2", env=hub_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<think>\n") and "generation: 2 tokens" in out.stderr


def test_without_model_and_offline_the_default_is_named_in_one_line(tmp_path):
    from mlx_qwen3.cli import DEFAULT_MODEL

    out = run(sys.executable, "-m", "mlx_qwen3", "generate", "--prompt", "hi", env=hub_env(tmp_path))
    one_line_error(out, DEFAULT_MODEL, "HF_HUB_OFFLINE")


@pytest.mark.parametrize("command", ["generate", "serve", "menubar"])
def test_help_shows_the_default_model(warm, command):
    from mlx_qwen3.cli import DEFAULT_MODEL

    out = text(warm.run("mlx_qwen3", command, "--help"))
    assert out.returncode == 0 and DEFAULT_MODEL in " ".join(out.stdout.split()), out.stdout


def test_the_installed_script_runs_the_group():
    import shutil

    script = shutil.which("mlx-qwen3")
    if script is None:
        pytest.skip("mlx-qwen3 is not installed here (pip install -e . writes it)")
    out = run(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith("Usage: mlx-qwen3 "), out.stderr


def test_a_stream_cut_short_on_a_terminal_leaves_it_undimmed(capsys):
    """A second Ctrl-C mid-thought (or a failed write) must not leave the user's terminal dim."""
    import threading

    from mlx_qwen3.terminal import DIM, RESET, Printer, show_stream
    from mlx_qwen3.thinking import Event

    closed = []

    def events():
        try:
            yield Event("thinking", "Hmm")
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    with pytest.raises(KeyboardInterrupt):
        show_stream(events(), Printer(as_json=False, hide_thinking=False, tty=True), threading.Event())
    out = capsys.readouterr().out
    assert out.startswith(DIM + "Thinking:\nHmm") and out.endswith(RESET + "\n")
    assert closed  # and the stream was closed then, not left to the garbage collector
