"""Benchmark: convert a random multi-shard bf16 checkpoint to 4-bit with ours and with mlx_lm.convert.

Prints one JSON object: wall time and peak RSS of each converter (each in its own process), and
ours / mlx-lm ratios. Needs mlx-lm and the real tokenizer in ../shared/qwen3-tokenizer (mlx-lm's
converter insists on a tokenizer).

    python scripts/bench_convert.py [--layers 8] [--repeat 1] [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "qwen3-tokenizer"
MAKE = Path(__file__).resolve().parent / "random_checkpoint.py"


def measure(code: str) -> dict:
    """Run `code` in a fresh Python; its wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"conversion failed: {proc.stderr.read().decode()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (a temp folder)")
    args = ap.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"error: the Qwen3 tokenizer is not at {TOKENIZER}; mlx_lm.convert needs one")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    src = work / "hf"
    src.mkdir(parents=True, exist_ok=True)
    # Made in a child process: a child's peak RSS counts its parent's at fork time.
    # Qwen3-1.7B's shapes, untied, 8 layers: about 2 GB of bf16 in 4 shards.
    subprocess.run([sys.executable, str(MAKE), str(src), "--shape", "qwen3-1.7b", "--layers", str(args.layers)],
                   check=True, stdout=subprocess.DEVNULL)
    size = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    ours_code = f"from mlx_qwen3.convert import convert; convert({str(src)!r}, {str(work / 'ours')!r}, quantize=True)"
    peer_code = (
        "from mlx_lm import convert; "
        f"convert({str(src)!r}, {str(work / 'mlx_lm')!r}, quantize=True, q_bits=4, q_group_size=64)"
    )
    runs = {"ours": [], "mlx_lm": []}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits both alike
        for name, code in (("ours", ours_code), ("mlx_lm", peer_code)):
            shutil.rmtree(work / name, ignore_errors=True)
            runs[name].append(measure(code))
    best = {k: {m: min(r[m] for r in v) for m in ("seconds", "peak_rss_gb")} for k, v in runs.items()}
    print(json.dumps({
        "checkpoint_gb": round(size / 1e9, 3),
        "shards": len(list(src.glob("*.safetensors"))),
        "ours": best["ours"],
        "mlx_lm": best["mlx_lm"],
        "ratio_time": round(best["ours"]["seconds"] / best["mlx_lm"]["seconds"], 3),
        "ratio_peak_rss": round(best["ours"]["peak_rss_gb"] / best["mlx_lm"]["peak_rss_gb"], 3),
        "runs": runs,
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
