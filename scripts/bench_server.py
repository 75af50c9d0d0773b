"""Benchmark: 1, 4, 8 and 16 concurrent streaming clients against our server and mlx_lm.server.

Both serve one 4-bit random checkpoint (the "tiny" shape by default: Qwen3's vocabulary, 4 small
layers; --shape qwen3-0.6b on a fast machine). One server at a time, each in its own process, started
once and reused across the client counts. Per count and server: aggregate generated tok/s, time to
first token (p50, p90), and whether every client got its own non-empty text; for ours also the forward
passes per generated token, from the "decoding" counters of /health. Prints one JSON object.

    python scripts/bench_server.py [--clients 1,4,8,16] [--max-tokens 64] [--shape tiny] [--model MLX_FOLDER]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SHAPES = ("tiny", "qwen3-0.6b", "qwen3-1.7b")  # random_checkpoint.py's
TOPICS = ("a cat who learns to swim", "the history of Rome", "how to bake bread", "the moons of Jupiter",
          "a lighthouse keeper", "why the sky is blue", "a chess tournament", "the first train in Japan",
          "a dragon who hates gold", "how bees talk", "a city under the sea", "the invention of paper",
          "a robot gardener", "the coldest place on Earth", "a lost violin", "how volcanoes form")
TIME_SLICED_PASSES_PER_TOKEN = 1.0  # the server before issue 15: one forward pass per token per request


def client_counts(text: str) -> list:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give client counts of 1 or more separated by commas, "
                                         "e.g. 1,4,8,16")
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, port: int, log: Path) -> subprocess.Popen:
    # stderr to a file: uvicorn's and mlx-lm's logs would fill a pipe nobody reads and stall the server
    env = {k: v for k, v in os.environ.items() if k != "MLX_QWEN3_API_KEY"}  # no key: /health tells all
    env["PYTHONFAULTHANDLER"] = "1"  # a server that crashes leaves its threads' stacks in the log we print
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise failed(cmd, proc, log, "exited before serving")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise failed(cmd, proc, log, "did not start in 300 s")


def failed(cmd: list, proc: subprocess.Popen, log: Path, what: str) -> SystemExit:
    status = proc.poll()
    state = "still running" if status is None else f"exit status {status}"
    tail = log.read_text(errors="replace")[-2000:]
    return SystemExit(f"bench_server: {cmd[2]} {what} ({state}); its log ends:\n{tail}")


def request(model: str, prompt: str, max_tokens: int) -> dict:
    """The same body for both servers; mlx-lm ignores `loop_guard`, which it does not have."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}, "loop_guard": False}


def one_client(url: str, body: dict) -> dict:
    """One streamed reply: time to its first text, its text, and its tokens (from the final usage if sent)."""
    tic = time.perf_counter()
    first, pieces, usage = None, [], None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"])[:200]}
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices", []):
                    d = c.get("delta") or {}
                    piece = d.get("content") or d.get("reasoning_content") or d.get("reasoning")
                    if piece:
                        pieces.append(piece)
                        first = first or time.perf_counter() - tic
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    counted = usage is not None and "completion_tokens" in usage
    return {"ttft": first, "text": "".join(pieces), "tokens": usage["completion_tokens"] if counted else len(pieces),
            "counted_by": "usage" if counted else "chunks"}


def percentile(xs: list, q: float):
    if not xs:
        return None
    xs, pos = sorted(xs), q * (len(xs) - 1)
    i = int(pos)
    return xs[i] if i + 1 == len(xs) else xs[i] + (xs[i + 1] - xs[i]) * (pos - i)


def round3(x):
    return None if x is None else round(x, 3)


def decoding(url: str):
    """Ours: the cumulative {"forward_passes", "generated_tokens", "batch_width"} of /health, or None
    while the server does not report them."""
    return httpx.get(f"{url}/health", timeout=10).json().get("decoding")


def run_count(url: str, model: str, n: int, max_tokens: int, ours: bool) -> dict:
    # prompts new at each count: a prompt cache hit from the previous count would flatter the time to first token
    bodies = [request(model, f"Client {i + 1} of {n}: tell me about {TOPICS[i % len(TOPICS)]}.", max_tokens)
              for i in range(n)]
    before = decoding(url) if ours else None
    results = [None] * n

    def client(i):
        results[i] = one_client(url, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    texts = [r["text"] for r in done]
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in done)
    out = {"aggregate_tok_s": round(tokens / wall, 2), "ttft_p50_s": round3(percentile(ttfts, 0.5)),
           "ttft_p90_s": round3(percentile(ttfts, 0.9)), "generated_tokens": tokens, "wall_s": round(wall, 2),
           "tokens_counted_by": sorted({r["counted_by"] for r in done}),
           "ok": not errors and all(texts) and len(set(texts)) == n}
    if errors:
        out["errors"] = errors[:3]
    if ours:
        after = decoding(url)
        per_token = None
        if before and after and after["generated_tokens"] > before["generated_tokens"]:
            per_token = ((after["forward_passes"] - before["forward_passes"])
                         / (after["generated_tokens"] - before["generated_tokens"]))
        out.update({"forward_passes_per_token": round3(per_token),
                    "time_sliced_passes_per_token": TIME_SLICED_PASSES_PER_TOKEN,
                    "passes_per_token_vs_time_sliced": round3(per_token and per_token / TIME_SLICED_PASSES_PER_TOKEN),
                    "batch_width": after.get("batch_width") if after else None})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=client_counts, default=[1, 4, 8, 16],
                    help="concurrent client counts, comma-separated (default 1,4,8,16)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--model", default=None, help="an MLX folder instead of a random checkpoint")
    args = ap.parse_args()
    if args.max_tokens < 1:
        ap.error(f"--max-tokens {args.max_tokens}: give 1 or more")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there; give an MLX model folder")
    parallel = max(args.clients)

    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        work = Path(tmp)
        folder = args.model
        if folder is None:
            subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), str(work / "hf"), "--shape",
                            args.shape], check=True, stdout=subprocess.DEVNULL)
            folder = str(work / "q4")
            subprocess.run([sys.executable, "-m", "mlx_qwen3.convert", "--hf-path", str(work / "hf"), "--mlx-path",
                            folder, "-q"], check=True, stdout=subprocess.DEVNULL)
        sides = {
            "ours": [sys.executable, "-m", "mlx_qwen3.server", "--model", folder, "--parallel", str(parallel)],
            "mlx_lm": [sys.executable, "-m", "mlx_lm", "server", "--model", folder, "--log-level", "ERROR"],
        }
        runs = {str(n): {} for n in args.clients}
        for name, cmd in sides.items():
            port, log = free_port(), work / f"{name}.log"
            proc = start(cmd, port, log)
            url = f"http://127.0.0.1:{port}"
            try:
                one_client(url, request(folder, "Warm up.", 4))  # first-call compilation, outside the timings
                for n in args.clients:
                    runs[str(n)][name] = run_count(url, folder, n, args.max_tokens, name == "ours")
                    if proc.poll() is not None:
                        raise failed(cmd, proc, log, f"stopped during {n} clients")
            except httpx.HTTPError as e:
                raise failed(cmd, proc, log, f"stopped answering ({e})") from None
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    for n, run in runs.items():
        peer = run["mlx_lm"]["aggregate_tok_s"]
        run["ratio_aggregate_tok_s_ours_vs_mlx_lm"] = round3(run["ours"]["aggregate_tok_s"] / peer) if peer else None
    targets = {}
    for n in args.clients:
        run = runs[str(n)]
        if n in (8, 16):
            ratio = run["ratio_aggregate_tok_s_ours_vs_mlx_lm"]
            targets[f"aggregate_tok_s_{n}_ours_vs_mlx_lm >= 1.0"] = None if ratio is None else ratio >= 1.0
        if n > 1:
            per_token = run["ours"]["forward_passes_per_token"]
            targets[f"forward_passes_per_token_{n} <= 1/{n}"] = (
                None if per_token is None else per_token <= TIME_SLICED_PASSES_PER_TOKEN / n + 1e-9)
    print(json.dumps({
        "model": folder if args.model else f"random 4-bit, {args.shape} shape",
        "clients": args.clients, "max_tokens": args.max_tokens,
        "settings": {
            "ours": f"mlx_qwen3.server --parallel {parallel} (the largest client count: all decode at once)",
            "mlx_lm": f"mlx_lm server {version('mlx-lm')} with its defaults (--decode-concurrency 32: up to 32 "
                      "requests decode together; nothing else has to match); --log-level ERROR",
            "requests": "the same body on both sides: streamed, stream_options.include_usage, temperature 0, "
                        f"max_tokens {args.max_tokens}, enable_thinking false, loop_guard false (ours; mlx-lm "
                        "has no loop guard and ignores it), so both may run to max_tokens",
            "prompts": "one per client, distinct, and new at each count (no prompt cache hits across counts "
                       "beyond the chat template's start)",
            "method": "one server at a time, started once, a 4-token warm-up request, then the counts in order. "
                      "aggregate_tok_s: generated tokens of all clients / wall seconds from the first request "
                      "to the last reply (a shared machine: others' work counts against both). ttft: the first "
                      "non-empty text of each client. tokens_counted_by: 'usage' (the final usage chunk) or "
                      "'chunks' (text chunks, where no usage came). forward_passes_per_token: the change of "
                      "/health's decoding.forward_passes over that of decoding.generated_tokens during the "
                      "count (null while the server does not report them). ok: no errors, and every client "
                      "got a non-empty text unlike every other's.",
        },
        "runs": runs,
        "targets": targets,
    }, indent=1))


if __name__ == "__main__":
    main()
