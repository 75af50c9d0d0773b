"""Benchmark: N concurrent streaming clients against our server and mlx_lm.server on the same weights.

Both serve one 4-bit random checkpoint (the "tiny" shape by default: Qwen3's vocabulary, 4 small
layers; --shape qwen3-0.6b on a fast machine). Each side runs in its own process, one after the
other. Prints one JSON object: time to first token (median, p90) and aggregate generated tok/s.

    python scripts/bench_server.py [--clients 8] [--max-tokens 64] [--shape tiny] [--model MLX_FOLDER]
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def one_client(url: str, model: str, i: int, max_tokens: int, out: list):
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: tell me a story."}],
            "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    tic = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                    tokens += 1
                    first = first or time.perf_counter() - tic
    out.append({"ttft": first or float("nan"), "tokens": tokens, "seconds": time.perf_counter() - tic})


def measure(url: str, model: str, clients: int, max_tokens: int) -> dict:
    one_client(url, model, -1, 4, [])  # warm up
    results = []
    threads = [threading.Thread(target=one_client, args=(url, model, i, max_tokens, results))
               for i in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    ttfts = sorted(r["ttft"] for r in results)
    return {"ttft_median_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "aggregate_tps": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--model", default=None, help="an MLX folder instead of a random checkpoint")
    args = ap.parse_args()

    folder = args.model
    if folder is None:
        work = Path(tempfile.mkdtemp(prefix="bench_server_"))
        subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), str(work / "hf"), "--shape", args.shape],
                       check=True, stdout=subprocess.DEVNULL)
        folder = str(work / "q4")
        subprocess.run([sys.executable, "-m", "mlx_qwen3.convert", "--hf-path", str(work / "hf"), "--mlx-path", folder,
                        "-q"], check=True, stdout=subprocess.DEVNULL)
    report = {"model": folder if args.model else f"random 4-bit, {args.shape} shape", "clients": args.clients,
              "max_tokens": args.max_tokens}
    sides = {
        "ours": [sys.executable, "-m", "mlx_qwen3.server", "--model", folder],
        "mlx_lm": [sys.executable, "-m", "mlx_lm", "server", "--model", folder, "--log-level", "ERROR"],
    }
    for name, cmd in sides.items():
        port = free_port()
        proc = start(cmd + ["--port", str(port)], port)
        try:
            report[name] = measure(f"http://127.0.0.1:{port}", folder, args.clients, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    report["ratio_aggregate_tps"] = report["ours"]["aggregate_tps"] / report["mlx_lm"]["aggregate_tps"]
    report["ratio_ttft_median"] = report["ours"]["ttft_median_s"] / report["mlx_lm"]["ttft_median_s"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
