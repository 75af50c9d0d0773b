"""Several ranks on this machine (`mlx.launch --backend ring`, CPU): the logits, the CLI, the Python API
and the faults of a model split across 2 and 4 processes, against one process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from chain import build as build_scripted
from chain import ids_of, successors, tokenizer
from checkpoints import build, copy_tokenizer, rel_err
from conftest import _tail, free_ports

from mlx_qwen3 import distributed, load, memory
from mlx_qwen3.convert import convert
from mlx_qwen3.errors import UserError
from mlx_qwen3.load import load_model
from mlx_qwen3.models.shard import balance, shard

HERE = Path(__file__).parent
LAUNCHER = shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCHER is None, reason="mlx.launch (installed with mlx) is not on PATH")
# ours (Hugging Face fp32, 4-bit by our converter) and an mlx-community-style folder (8-bit by mlx-lm's)
FOLDERS = ("qwen3_wide", "qwen3_moe_wide", "qwen3_wide-4bit", "qwen3_moe_wide-4bit", "qwen3_moe_wide-mlx_lm")


def launch(n: int, *command, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Run `command` on n ranks of this machine; its own process group, killed whatever happens."""
    port = free_ports(n)  # one per rank (tests may run beside other launches)
    args = [LAUNCHER, "--backend", "ring", "-n", str(n), "--starting-port", str(port), sys.executable, *command]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, **(env or {})}, cwd=HERE)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _kill(p)
    result = subprocess.CompletedProcess(args, p.returncode, out, err)
    if check:
        assert "exited with code" not in err, err[-3000:]  # mlx.launch itself exits 0 whatever its ranks did
    return result


def _kill(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The wide checkpoints (every split in whole 4-bit groups, 2 kv heads for 4 ranks), fp32 and 4-bit;
    and a bigger bf16 one ("mid", and 4-bit), where memory is measured (tiny tensors measure the allocator)."""
    root = tmp_path_factory.mktemp("wide")
    for name in FOLDERS[:2]:
        build(name, root / name)
        convert(str(root / name), str(root / f"{name}-4bit"), quantize=True)
    build("qwen2", root / "qwen2")  # QwQ's architecture: q, k and v biases, tied embeddings, YaRN
    from mlx_lm import convert as mlx_lm_convert

    hf = tmp_path_factory.mktemp("hf") / "qwen3_moe_wide"
    shutil.copytree(root / "qwen3_moe_wide", hf)
    copy_tokenizer(hf)  # mlx_lm.convert needs one
    mlx_lm_convert(str(hf), str(root / "qwen3_moe_wide-mlx_lm"), quantize=True, q_bits=8, q_group_size=64)
    _mid(root / "mid")
    convert(str(root / "mid"), str(root / "mid-4bit"), quantize=True)
    return root


def _mid(folder: Path, H: int = 512, I: int = 1536, V: int = 4096, layers: int = 2):
    folder.mkdir()
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (H, H), f"{p}.self_attn.k_proj.weight": (H // 2, H),
                       f"{p}.self_attn.v_proj.weight": (H // 2, H), f"{p}.self_attn.o_proj.weight": (H, H),
                       f"{p}.self_attn.q_norm.weight": (64,), f"{p}.self_attn.k_norm.weight": (64,),
                       f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I)})
    key = mx.random.key(0)
    mx.save_safetensors(str(folder / "model.safetensors"), {
        k: (0.05 * mx.random.normal(s, key=key) if len(s) == 2 else mx.ones(s)).astype(mx.bfloat16)
        for k, s in shapes.items()})
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=H, intermediate_size=I,
        num_hidden_layers=layers, num_attention_heads=H // 64, num_key_value_heads=H // 128, head_dim=64,
        vocab_size=V, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, torch_dtype="bfloat16")))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """Thinks "Let me think" and answers "The answer is 4."; 4 heads and 4 layers, to split 4 ways."""
    tok = tokenizer()
    think = [_tail(tok)] + ids_of(tok, ["<think>", "Let me think", "</think>", "The answer is 4.", "<|im_end|>"])
    plain = [_tail(tok, enable_thinking=False)] + ids_of(tok, ["Hi there!", "<|im_end|>"])
    return build_scripted(tmp_path_factory.mktemp("scripted"), successors(think, plain), heads=4, layers=4,
                          max_position_embeddings=256)


@pytest.mark.parametrize("n", [2, 4])
def test_every_rank_has_the_single_process_logits(folders, tmp_path, n):
    """Tensor and pipeline parallel, dense and MoE, fp32 and 4-bit: each rank's logits are one process's
    (1e-4 relative), each rank holds its share of the weights, and loading peaks near that share."""
    extra = ["--mlx-lm"] if n == 2 else []  # mlx-lm's shard() needs the kv heads divisible by the ranks
    names = FOLDERS + (("qwen2",) if n == 2 else ())  # 2 layers: not 4 pipeline stages
    launch(n, "ranks.py", "logits", str(tmp_path), "tensor,pipeline", *[str(folders / f) for f in names], *extra)
    if n == 2:
        launch(n, "ranks.py", "memory", str(tmp_path), str(folders / "mid"), str(folders / "mid-4bit"))
    from ranks import IDS

    for name in names:
        model, _ = load_model(folders / name)
        want = np.array(model(mx.array(IDS)).astype(mx.float32))
        static = np.array(load_model(folders / name, rope="config")[0](mx.array(IDS)).astype(mx.float32))
        total, replicated, outside, kv = _bytes(model)
        held = {}
        for parallel in ["tensor", "pipeline"] + (["mlx_lm"] if extra else []):
            for rank in range(n):
                got = np.load(tmp_path / f"{name}-{parallel}-{rank}.npy")
                wanted = static if parallel == "mlx_lm" else want  # mlx-lm's YaRN is static (qwen2's config has it)
                assert rel_err(got, wanted) < 1e-4, (name, parallel, rank, rel_err(got, wanted))
                if parallel == "mlx_lm":
                    continue
                stats = json.loads((tmp_path / f"{name}-{parallel}-{rank}.json").read_text())
                held.setdefault(parallel, []).append(stats)
        # more ranks than kv heads: each kv head is held by n / kv ranks
        extra_kv = kv * (1 / min(n, model.args.num_key_value_heads) - 1 / n)
        for stats in held["tensor"]:
            assert stats["bytes"] <= (total - replicated) / n + replicated + extra_kv + 1, (name, stats, total)
        pipeline = held["pipeline"]
        assert sum(s["layers"] for s in pipeline) == model.args.num_hidden_layers
        assert sum(s["bytes"] for s in pipeline) == total + (n - 1) * outside  # each layer on one rank


    for name in ("mid", "mid-4bit") if n == 2 else ():
        model, _ = load_model(folders / name)
        total, replicated, _, _ = _bytes(model)
        largest = max(v.nbytes for _, v in _leaves(model))
        for rank in range(n):
            stats = json.loads((tmp_path / f"{name}-tensor-{rank}.json").read_text())
            assert stats["bytes"] <= (total - replicated) / n + replicated, (name, stats, total)
            # loading reads one whole tensor at a time before keeping this rank's share of it
            assert stats["peak"] <= stats["bytes"] + largest, (name, stats, largest)


def _leaves(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def _bytes(model):
    """(all weight bytes, those every rank holds in tensor parallel: embeddings, norms, routers; those
    outside the layers; the k and v projections)."""
    total = memory.weight_bytes(model)
    replicated = outside = kv = 0
    for path, v in _leaves(model):
        if "layers." not in path:
            outside += v.nbytes
        if "layers." not in path or "norm" in path or ".mlp.gate." in path:
            replicated += v.nbytes
        elif "k_proj" in path or "v_proj" in path:
            kv += v.nbytes
    return total, replicated, outside, kv


def test_whole_experts_give_the_same_logits(folders, tmp_path):
    """The other way to split a MoE (whole experts per rank), measured in scripts/bench_distributed.py."""
    script = tmp_path / "whole.py"
    script.write_text(f"""
import mlx.core as mx, numpy as np
from mlx_qwen3 import distributed
from mlx_qwen3.load import load_model
from mlx_qwen3.models.shard import shard
from ranks import IDS
model, _ = load_model({str(folders / 'qwen3_moe_wide-4bit')!r}, lazy=True, parallel="none")
shard(model, distributed.group(), "tensor", experts="whole")
np.save({str(tmp_path)!r} + f"/whole-{{distributed.rank()}}.npy", np.array(model(mx.array(IDS))))
""")
    launch(2, str(script), env={"PYTHONPATH": str(HERE)})
    model, _ = load_model(folders / "qwen3_moe_wide-4bit")
    from ranks import IDS

    want = np.array(model(mx.array(IDS)))
    for rank in range(2):
        assert rel_err(np.load(tmp_path / f"whole-{rank}.npy"), want) < 1e-4


def test_a_split_the_model_cannot_take_is_one_line(folders):
    model, _ = load_model(folders / "qwen3_wide", lazy=True)

    class Three:
        def size(self):
            return 3

        def rank(self):
            return 0

    with pytest.raises(UserError, match="3 ranks cannot share 8 attention heads"):
        shard(model, Three())
    with pytest.raises(UserError, match="parallel='data' is not one of"):
        load_model(folders / "qwen3_wide", parallel="data")


def test_pipeline_ranges_balance_bytes():
    assert balance([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert balance([1, 1, 1], 3) == [0, 1, 2, 3]
    assert balance([9, 1, 1, 1], 3) == [0, 1, 3, 4]  # the big layer alone; no empty range


def single(folder, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def alone(scripted):
    """alone(*args): single(scripted, *args), run once per args (2 and 4 ranks compare with the same run)."""
    done = {}

    def get(*args):
        if args not in done:
            done[args] = single(scripted, *args)
        return done[args]

    return get


@pytest.mark.parametrize("n, pipeline", [(2, False), (2, True), (4, False), (4, True)])
def test_the_cli_prints_on_rank_0_what_one_process_prints(scripted, alone, n, pipeline):
    args = ["--prompt", "What is 2+2?", "--temp", "0", "--json"] + (["--pipeline"] if pipeline else [])
    want = alone(*args)
    assert want.returncode == 0, want.stderr
    got = launch(n, "-m", "mlx_qwen3.generate", "--model", str(scripted), *args)
    events = [json.loads(line) for line in got.stdout.splitlines()]
    assert [e for e in events if e["type"] != "done"] == [json.loads(x) for x in want.stdout.splitlines()[:-1]]
    assert events[-1]["answer"] == "The answer is 4." and events[-1]["finish_reason"] == "stop"
    assert len([e for e in events if e["type"] == "done"]) == 1  # rank 0 alone printed


def test_chat_lines_are_read_by_rank_0_for_every_rank(scripted):
    lines = "What is 2+2?\n/no_think\nhello\n/exit\n"  # mlx.launch never closes its ranks' stdin: no EOF
    want = subprocess.run([sys.executable, "-m", "mlx_qwen3.generate", "--model", str(scripted), "--chat",
                           "--temp", "0"], input=lines, capture_output=True, text=True, timeout=120)
    p = subprocess.Popen([LAUNCHER, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)),
                          sys.executable, "-m", "mlx_qwen3.generate", "--model", str(scripted), "--chat", "--temp", "0"],
                         stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(lines, timeout=120)
    finally:
        _kill(p)
    assert "exited with code" not in err, err
    assert out == want.stdout and "Hi there!" in out and "The answer is 4." in out


def test_the_python_api_on_two_ranks(scripted, tmp_path):
    """generate (a budget that ends the thought, a stop string, a seeded sample) and a ChatSession whose
    second turn reuses the cache: every rank gets what one process gets."""
    launch(2, "ranks.py", "api", str(tmp_path), str(scripted))
    model, tok = load(scripted)
    from mlx_qwen3 import ChatSession
    from mlx_qwen3.generate import generate

    want = {}
    for name, options in {"budget": dict(thinking_budget=1, temperature=0),
                          "stop": dict(stop=["is"], temperature=0), "sampled": dict(seed=3)}.items():
        r = generate(model, tok, "What is 2+2?", **options)
        want[name] = [r.thinking, r.answer, r.finish_reason, r.generation_tokens]
    chat = ChatSession(model, tok, temperature=0)
    want["chat"] = [[r.answer, r.cached_tokens] for r in (chat.send("What is 2+2?"), chat.send("And 3+3?"))]
    assert want["stop"][1] == "The answer " and want["chat"][1][1] > 0
    for rank in range(2):
        assert json.loads((tmp_path / f"api-{rank}.json").read_text()) == want


def test_ranks_with_other_files_are_refused_in_one_line(scripted, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(scripted, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    got = launch(2, "ranks.py", "cli", str(scripted), str(other), "--prompt", "hi", check=False)
    ours = [line for line in got.stderr.splitlines() if not line.startswith(("[ring]", "\x1b[33m[WARN]"))]
    assert ours == [f"error: rank 1 has other model files than rank 0 ({_digest(other)} vs {_digest(scripted)}); "
                    "install the same mlx-qwen3 and mlx, and copy the same model folder, on every Mac"], got.stderr
    missing = launch(2, "ranks.py", "cli", str(scripted), str(tmp_path / "nothing"), "--prompt", "hi", check=False)
    ours = [line for line in missing.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 1: ") and "nothing" in ours[0], missing.stderr


def _digest(folder) -> str:
    return distributed.fingerprint(Path(folder))["model files"]


def _rank_pid(folder, rank: int, deadline: float):
    """The pid of the given rank of a launch running on `folder` (Linux: read from /proc)."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if str(folder) in (proc / "cmdline").read_text() and \
                        f"MLX_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} did not start")


def _endless(folder, env=None):
    """The generate CLI on 2 ranks with conftest's looping_dir, which answers "a ba b..." without end."""
    p = subprocess.Popen([LAUNCHER, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports(2)),
                          sys.executable, "-m", "mlx_qwen3.generate", "--model", str(folder), "--prompt", "go",
                          "--no-think", "--temp", "0", "--max-tokens", "1000000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env={**os.environ, **(env or {})})
    return p, folder


on_linux = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes in /proc")


@on_linux
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_rank_ends_the_others_with_one_line(looping_dir, how):
    """Killed (its links close) or stopped (silent, as a pulled cable): rank 0 says which rank it lost and
    exits within 60 s (here the watchdog waits 5 s), never hangs."""
    p, folder = _endless(looping_dir, {"MLX_QWEN3_PEER_TIMEOUT": "5"})
    try:
        victim = _rank_pid(folder, 1, time.monotonic() + 60)
        assert p.stdout.read(20).startswith("a b")  # generating
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        lines = []
        while not any("mlx-qwen3 rank 0 of 2" in line for line in lines):
            line = p.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        took = time.monotonic() - t0
    finally:
        _kill(p)
        p.communicate()
    ours = [line for line in lines if "mlx-qwen3 rank" in line]
    # killed: rank 0 sees the link close, or mlx.launch, seeing rank 1 end, stops it first, or (when MLX
    # leaves the wait pending) the watchdog sees no answer
    reasons = ("no answer from rank 1 for 5 s",) + (("lost rank 1", "rank 1 ended") if how == "killed" else ())
    assert len(ours) == 1 and any(r in ours[0] for r in reasons), lines
    assert took < 60


@on_linux
def test_ctrl_c_stops_every_rank_after_the_same_token(looping_dir):
    """A terminal's Ctrl-C reaches every rank: rank 0's stop is everyone's, and only rank 0 exits 130."""
    p, folder = _endless(looping_dir)
    try:
        ranks = [_rank_pid(folder, r, time.monotonic() + 60) for r in range(2)]
        assert p.stdout.read(20).startswith("a b")
        for pid in ranks:
            os.kill(pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        _kill(p)
    assert "finish: cancelled" in err, err
    # rank 1 exits 0, unless mlx.launch, seeing rank 0 end with 130 first, stops it while it exits
    assert "rank 0 exited with code 130" in err, err
    assert "rank 1 exited" not in err or "rank 1 exited with code -15" in err, err


# Rank 1 reads its weights 8 s later than rank 0 (a slower disk, or no copy in its page cache yet).
SLOW_READ = """
import importlib, time
from mlx_qwen3 import distributed
load = importlib.import_module("mlx_qwen3.load")
read = load.read_weights


def slow(*args):
    if distributed.rank() == 1:
        time.sleep(8)
    return read(*args)


load.read_weights = slow
from mlx_qwen3.cli import main
main("generate")
"""


def test_a_rank_slower_to_load_than_the_watchdog_waits_is_no_fault(scripted):
    """Loading takes as long as the slowest rank's disk: the watchdog times only the waits after it."""
    got = launch(2, "-c", SLOW_READ, "--model", str(scripted), "--prompt", "What is 2+2?", "--temp", "0", "--json",
                 env={"MLX_QWEN3_PEER_TIMEOUT": "3"}, check=False)
    assert "mlx-qwen3 rank" not in got.stderr and "exited with code" not in got.stderr, got.stderr[-3000:]
    assert json.loads(got.stdout.splitlines()[-1])["answer"] == "The answer is 4."


@pytest.mark.parametrize("name, text", [
    ("generation_config.json", '{"eos_token_id": [151645, 151643, 151668]}'),  # </think> ends the reply there
    ("chat_template.jinja", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
])
def test_ranks_with_other_tokenizer_files_are_refused_in_one_line(scripted, tmp_path, name, text):
    other = tmp_path / "other"
    shutil.copytree(scripted, other)
    (other / name).write_text(text)
    got = launch(2, "ranks.py", "cli", str(scripted), str(other), "--prompt", "hi", check=False)
    ours = [line for line in got.stderr.splitlines() if line.startswith(("error", "mlx-qwen3"))]
    assert ours == [f"error: rank 1 has other model files than rank 0 ({_digest(other)} vs {_digest(scripted)}); "
                    "install the same mlx-qwen3 and mlx, and copy the same model folder, on every Mac"], got.stderr


# Ctrl-C at the >>> prompt of the --chat REPL, on 2 ranks: what each rank's repl returns (its exit status).
CTRL_C_AT_PROMPT = """
import sys
from mlx_qwen3 import distributed, load
from mlx_qwen3.generate import ChatSession
from mlx_qwen3.terminal import Printer, repl


def read(prompt):
    raise KeyboardInterrupt


model, tok = load(sys.argv[1])
shared = distributed.reader(read, distributed.group())
status = repl(ChatSession(model, tok), Printer(False, False, False), None, shared)
open(f"status-{distributed.rank()}", "w").write(str(status))
"""


def test_ctrl_c_at_the_chat_prompt_ends_rank_0_with_130_and_the_others_with_0(scripted, tmp_path):
    """Rank 0 says how the chat ended; another rank ending non-zero first would make mlx.launch stop rank 0
    (exit -15 instead of 130), so the others leave as at an end of input."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(f"import os; os.chdir({str(tmp_path)!r})\n" + CTRL_C_AT_PROMPT)
    launch(2, str(script), str(scripted))
    assert [(tmp_path / f"status-{r}").read_text() for r in range(2)] == ["130", "0"]
