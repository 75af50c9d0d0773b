"""convert's progress: the `progress` callback, the bar on a terminal (and nothing elsewhere)."""

import io
import os
import pty
import re
import select
import subprocess
import sys

import mlx.core as mx

from mlx_qwen3.convert import convert
from mlx_qwen3.terminal import ConvertBar, convert_progress

BAR = re.compile(r"convert \[[#.]{20}\] ([\d,]+)/([\d,]+) tensors, ([\d.]+ (?:[kMG]B|B))/([\d.]+ (?:[kMG]B|B))")


class FakeTty(io.StringIO):
    def isatty(self):
        return True


def written(folder) -> tuple:
    """(tensors, bytes of tensor data) in an MLX folder's shards."""
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    return len(tensors), sum(t.nbytes for t in tensors.values())


def test_the_callback_counts_every_tensor_and_byte_across_shards(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe")
    calls = []
    out = convert(src, tmp_path / "out", quantize=True, group_size=32, max_shard_bytes=40_000,
                  progress=lambda *a: calls.append(a))
    assert len(list(out.glob("model-*.safetensors"))) > 2
    tensors, nbytes = written(out)
    assert [c[0] for c in calls] == list(range(1, tensors + 1))  # one call per tensor, counting on across shards
    assert {c[1] for c in calls} == {tensors} and {c[3] for c in calls} == {nbytes}
    done = [c[2] for c in calls]
    assert done == sorted(done) and done[-1] == nbytes and done[0] > 0


def test_the_bar_draws_at_most_ten_times_a_second_and_always_the_end():
    now = [0.0]
    out = FakeTty()
    bar = ConvertBar(out, clock=lambda: now[0])
    for i in range(1, 101):  # 100 tensors of 10 MB, about 2 ms each (2**-9 s: exact in binary)
        now[0] += 2**-9
        bar(i, 100, i * 10**7, 10**9)
    lines = out.getvalue().split("\r\x1b[2K")[1:]
    assert len(lines) == 3  # the first, one 0.1 s later, the last
    assert lines[0] == "convert [....................] 1/100 tensors, 10.0 MB/1.0 GB"  # no rate from one point
    assert lines[1] == "convert [##########..........] 53/100 tensors, 530.0 MB/1.0 GB, 0:00 left"
    assert lines[2] == "convert [####################] 100/100 tensors, 1.0 GB/1.0 GB, 0:00 left"
    assert "\n" not in out.getvalue()  # redrawn in place
    bar.clear()
    assert out.getvalue().endswith("\r\x1b[2K")


def test_time_left_comes_from_the_bytes_so_far():
    now = [0.0]
    out = FakeTty()
    bar = ConvertBar(out, clock=lambda: now[0])
    bar(1, 10, 10**8, 10**9)
    now[0] += 10.0
    bar(2, 10, 2 * 10**8, 10**9)  # 100 MB in 10 s: 800 MB to go is 80 s
    assert out.getvalue().endswith("2/10 tensors, 200.0 MB/1.0 GB, 1:20 left")


def test_a_bar_only_on_a_terminal_and_erased_even_on_an_error():
    with convert_progress(io.StringIO()) as progress:
        assert progress is None
    out = FakeTty()
    try:
        with convert_progress(out) as progress:
            progress(1, 2, 100, 200)
            raise OSError("disk on fire")
    except OSError:
        pass
    assert out.getvalue().startswith("\r\x1b[2Kconvert [") and out.getvalue().endswith("\r\x1b[2K")


def test_a_conversion_through_the_bar(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = FakeTty()
    with convert_progress(out) as progress:
        folder = convert(src, tmp_path / "out", progress=progress)
    tensors, nbytes = written(folder)
    last = BAR.findall(out.getvalue())[-1]
    assert last[0] == last[1] == f"{tensors:,}" and last[2] == last[3]
    assert float(last[3].split()[0]) > 0


def _convert_on_a_terminal(args) -> tuple:
    """Run `python -m mlx_qwen3.convert` with stderr on a pty -> (stdout, what the terminal got, exit status)."""
    main, tty = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_qwen3.convert", *args], stdout=subprocess.PIPE, stderr=tty)
    os.close(tty)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        try:
            chunk = os.read(main, 4096) if ready else b""
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    stdout, _ = proc.communicate(timeout=120)
    return stdout.decode(), seen.decode("utf-8", "replace"), proc.returncode


def test_the_cli_shows_the_bar_on_a_terminal_and_nothing_in_a_pipe(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    stdout, terminal, code = _convert_on_a_terminal(["--hf-path", str(src), "--mlx-path", str(tmp_path / "a")])
    assert code == 0 and stdout.startswith("wrote "), (stdout, terminal)
    tensors, nbytes = written(tmp_path / "a")
    bars = BAR.findall(terminal)
    assert bars and bars[-1][0] == bars[-1][1] == f"{tensors:,}", terminal
    assert terminal.endswith("\r\x1b[2K")  # erased: the shell's prompt starts on a clean line

    piped = subprocess.run([sys.executable, "-m", "mlx_qwen3.convert", "--hf-path", str(src),
                            "--mlx-path", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith("wrote "), piped.stderr
    assert "convert [" not in piped.stderr + piped.stdout and "\x1b" not in piped.stderr + piped.stdout
