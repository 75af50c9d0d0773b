"""The server on 2 ranks (mlx.launch, ring backend, this machine's CPU): rank 0 serves, rank 1 follows its
rounds. One scripted model: thinking, it thinks "Let me think" and answers "The answer is 4."; not
thinking, it answers "a ba ba b..." without end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from chain import build, ids_of, successors, tokenizer
from conftest import _tail, free_ports, wait_for_health

from mlx_qwen3 import load
from mlx_qwen3.generate import generate, prepare
from mlx_qwen3.models.cache import PromptCache
from mlx_qwen3.server.engine import from_wire, position_bytes, to_wire

ROOT = Path(__file__).resolve().parents[1]
NAME = "qwen3-scripted"  # the model folder's name: what requests call it
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tokenizer()
    think = [_tail(tok)] + ids_of(tok, ["<think>", "Let me think", "</think>", "The answer is 4.", "<|im_end|>"])
    loop = [_tail(tok, enable_thinking=False)] + ids_of(tok, ["a b", "a"])
    return build(tmp_path_factory.mktemp("models") / NAME, successors(think, loop), max_position_embeddings=100000)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _launcher() -> str:
    beside = Path(sys.executable).with_name("mlx.launch")
    return str(beside) if beside.exists() else shutil.which("mlx.launch")


@contextmanager
def launched(tmp_path, *command):
    """`mlx.launch -n 2 python COMMAND` in its own process group, killed whatever happens; yields the
    launcher's process and the path of its output (its --verbose lines say how each rank ended)."""
    log = tmp_path / "launch.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([_launcher(), "--verbose", "--backend", "ring", "-n", "2", "--starting-port",
                                 str(free_ports(2)), sys.executable, *command], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=tmp_path, start_new_session=True)
    try:
        yield proc, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # every process of the group has ended
            pass
        proc.wait()


@contextmanager
def serving(folder, tmp_path, *command):
    """The server on 2 ranks (`command`: how python runs it); yields (launcher, log, url)."""
    port = free_ports(1)
    with launched(tmp_path, *command, "--model", str(folder), "--port", str(port)) as (proc, log):
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, lambda: proc.poll() is None, log.read_text, 60)
        yield proc, log, url


def stop_with_ctrl_c(proc, log):
    """Ctrl-C, as a terminal sends it to every rank (rank 1 ignores it and waits for rank 0's stop): every
    rank exits 0 within 15 s, and so mlx.launch does. (Not sent to mlx.launch itself: it does not catch it,
    and its KeyboardInterrupt can strike while it holds a queue's lock, leaving it stuck after its ranks.)"""
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    tic = time.time()
    for pid in ranks:
        os.kill(int(pid), signal.SIGINT)
    proc.wait(timeout=15)
    text = log.read_text()
    assert proc.returncode == 0 and time.time() - tic < 15, text
    assert "Node with rank 0 completed" in text and "Node with rank 1 completed" in text, text  # exit status 0
    assert "Traceback" not in text and "[WARN]" not in text, text


def ask_streaming(url, content, **kwargs):
    stream = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                                 stream=True, **kwargs)
    reasoning, answer, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            answer += c.delta.content or ""
            finish = c.finish_reason or finish
    return reasoning, answer, finish


def wait_idle(url):
    deadline = time.time() + 10
    while httpx.get(f"{url}/health").json()["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["waiting"] == 0


def test_two_ranks_serve_streams_at_once_a_client_that_leaves_and_the_prompt_cache(folder, tmp_path):
    # decoded together, drafting on both ranks (the model drafts for itself: every draft accepted)
    with serving(folder, tmp_path, "-m", "mlx_qwen3.server", "--prompt-lookup", "--draft-model", str(folder)) as \
            (proc, log, url):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: ask_streaming(url, f"{i} + {i}?"), range(4)))
        assert answers == [("Let me think", "The answer is 4.", "stop")] * 4

        # a reply without end, whose client hangs up: rank 0's cancel ends it on both ranks after one token
        body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 50000, **NO_THINK}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
        assert ask_streaming(url, "go", max_tokens=4, temperature=0, extra_body=NO_THINK) == ("", "a ba b", "length")
        wait_idle(url)

        messages = [{"role": "user", "content": "tell me " * 30}]
        first, second = (client(url).chat.completions.create(model=NAME, messages=messages) for _ in range(2))
        cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, second)]
        assert cached[0] < cached[1] == first.usage.prompt_tokens - 1  # all but the last token, kept on both ranks
        assert second.choices[0].message.content == "The answer is 4."
        health = httpx.get(f"{url}/health").json()
        assert health["cached_prompts"] > 0 and health["waiting"] == 0
        assert health["decoding"]["forward_passes"] < health["decoding"]["generated_tokens"]  # drafts accepted
        stop_with_ctrl_c(proc, log)


# Every rank's decoder: a step with a request for 13 tokens in it fails at its fourth pass (as a failing
# allocation would), on every rank alike.
FAILING = """
import mlx_qwen3.decode as decode

real, passes = decode.Decoder._decode, []


def failing(self, rows):
    if any(getattr(row.taker, "max_tokens", None) == 13 for row in rows):
        passes.append(1)
        if len(passes) == 4:
            raise RuntimeError("injected failure")
    return real(self, rows)


decode.Decoder._decode = failing
from mlx_qwen3.cli import main

main("serve")
"""


def test_a_job_that_fails_stops_the_sharded_server_with_one_line(folder, tmp_path):
    """A step that fails may have stopped between two collectives (an allocation failing on the smaller
    Mac): the ranks cannot go on in step, so the rank says why, in one line, and ends; the others follow."""
    with serving(folder, tmp_path, "-c", FAILING) as (proc, log, url):
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 13, **NO_THINK}
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        proc.wait(timeout=60)
        text = log.read_text()
    ours = [line for line in text.splitlines() if line.startswith("mlx-qwen3 rank")]
    assert any(line.startswith("mlx-qwen3 rank 0 of 2: a generation failed (injected failure); the ranks "
                               "cannot stay in step; stopping") for line in ours), text
    assert "Traceback" not in text, text


# What the follower relies on: the same stream_generate on the same Prompt, with no cancel flag of its
# own, yields rank 0's events and ends after the same token when rank 0's is set (here, sampled at
# temperature 1 with another seed on each rank: only rank 0's draws count).
SAME_STREAM = """
import json, sys, threading
from mlx_qwen3 import distributed, load
from mlx_qwen3.generate import prepare, stream_generate

model, tok = load(sys.argv[1])
rank = distributed.rank()
# loop_guard off: the loop guard would hold back the repeated "a b" (no events to count) and stop it
prompt = prepare(model, tok, "go", enable_thinking=False, max_tokens=100000, temperature=1.0, top_k=0, loop_guard=False)
cancel = threading.Event() if rank == 0 else None
events = []
for i, event in enumerate(stream_generate(model, tok, prompt, cancel=cancel)):
    events.append([event.type, event.text])
    if rank == 0 and i == 25:
        cancel.set()
with open(f"rank{rank}.json", "w") as f:
    json.dump({"events": events, "finish": event.finish_reason, "tokens": event.generation_tokens}, f)
"""


def test_a_follower_without_a_cancel_flag_ends_where_rank_0_is_cancelled(folder, tmp_path):
    with launched(tmp_path, "-c", "import mlx.core as mx; mx.random.seed(__import__('os').getpid())\n" + SAME_STREAM,
                  str(folder)) as (proc, log):
        proc.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["finish"] == "cancelled" and 25 <= rank0["tokens"] <= 28
    assert rank1 == rank0


# ---- in one process: what the ranks share, and the pool's unit ----

def test_a_prompt_comes_back_equal_from_its_wire_form(folder):
    model, tok = load(folder)
    prompt = prepare(model, tok, [{"role": "user", "content": "héllo"}], temperature=0.3, top_p=0.5, seed=2**63 + 1,
                     stop=["a", "b"], max_tokens=77, thinking_budget=5, wrap_up="ok", system="be brief",
                     tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                     chat_template_kwargs={"x": [1, 2.5]}, repetition_penalty=1.5)
    again = from_wire(json.loads(json.dumps(to_wire(prompt))))
    assert again == prompt and again.options.stopping.stop == ("a", "b")


def test_a_cache_takes_its_positions_times_position_bytes(folder):
    """The pool's limit is agreed in positions: a cache's bytes must be its preallocated positions times
    position_bytes, on any rank."""
    model, tok = load(folder)
    cache = PromptCache.new(model)
    generate(model, tok, "go " * 200, cache=cache, max_tokens=100, enable_thinking=False)
    allocated = cache.layers[0].keys.shape[2]
    assert len(cache.ids) > 256 and allocated > 256
    assert cache.nbytes == allocated * position_bytes(model) > 0
    assert cache.copy(100).nbytes == 100 * position_bytes(model)
    mx.clear_cache()


# Every rank runs the same jobs through its Rounds, as a follower would rank 0's; each rank is given
# another byte budget, and under pipeline parallel its cache takes other bytes per position.
POOL = """
import json, sys
from mlx_qwen3 import distributed, load
from mlx_qwen3.generate import prepare
from mlx_qwen3.server.engine import Rounds, position_bytes
from mlx_qwen3.server.follow import Unheard

model, tok = load(sys.argv[1], parallel="pipeline")
rank, per_position = distributed.rank(), position_bytes(model)
rounds = Rounds(model, tok, 4, 1100 * per_position if rank == 0 else 10**12)
kept = []
for n in (300, 10, 600, 20, 300, 5):
    rounds.start(Unheard(prepare(model, tok, "go " * n, enable_thinking=False, max_tokens=5)))
    while rounds.active:
        rounds.step()
    # the pool's own measure (the same on every rank), and what its entries hold on this rank, in positions
    kept.append([len(rounds.pool), rounds.pool.nbytes, sum(c.nbytes for c in rounds.pool._entries) // per_position])
with open(f"rank{rank}.json", "w") as f:
    json.dump({"kept": kept, "per_position": per_position, "layers": len(model.layers)}, f)
"""


def test_under_pipeline_parallel_the_pools_decide_alike_on_other_bytes(folder, tmp_path):
    deep = tmp_path / "three-layers"  # the scripted model thrice: its blocks add nothing to the residual
    shutil.copytree(folder, deep)
    weights = mx.load(str(deep / "model.safetensors"))
    for name in [k for k in weights if k.startswith("model.layers.0.")]:
        for i in (1, 2):
            weights[name.replace(".0.", f".{i}.", 1)] = weights[name]
    mx.save_safetensors(str(deep / "model.safetensors"), weights)
    config = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with launched(tmp_path, "-c", POOL, str(deep)) as (proc, log):
        proc.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["layers"] + rank1["layers"] == 3 and rank0["per_position"] != rank1["per_position"]
    assert [k[:2] for k in rank0["kept"]] == [k[:2] for k in rank1["kept"]]
    assert max(positions for *_, positions in rank0["kept"]) <= 1100
    assert [n for n, *_ in rank0["kept"]] != list(range(1, 7))  # some were dropped for room
