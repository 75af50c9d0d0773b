"""Benchmark: collectives and decode speed on several ranks, ours against mlx-lm's sharded qwen3_moe.

Builds one small random 4-bit Qwen3-MoE folder, times single-process decode, then runs itself under
`mlx.launch --backend ring -n N` on this machine. On every rank it loads ours (tensor parallel with
experts "split" and "whole", and pipeline) and mlx-lm's `Model.shard()` on the same folder, counts the
collective calls and their payload bytes per decoded token (mx.distributed's functions wrapped, as
every sharded layer looks them up at call time), and times greedy decode. Rank 0 prints one JSON object.
Also, in one process, one rank's MoE work per token at Qwen3-30B-A3B's shapes with experts split vs
dealt out whole (the choice between them; decode speeds on a shared CPU are too noisy to decide it).

    python scripts/bench_distributed.py [--ranks 2] [--decode-tokens 64] [--prompt-tokens 16]
"""

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mlx_qwen3 import memory

GREEDY = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731  the same sampler on both sides
REPEATS = 5  # decode timings per model on the ranks; the median is reported
COLLECTIVES = ("all_sum", "all_gather", "send", "recv", "recv_like")
CONFIG = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=512, intermediate_size=1024,
    moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    vocab_size=4096, tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_theta=1000000, torch_dtype="float32",
)


def make_folder(work: Path) -> Path:
    """A random Hugging Face-layout checkpoint, converted to 4-bit (group 64) with our converter."""
    from mlx_qwen3.convert import convert

    c, hf = CONFIG, work / "hf"
    H, D, I = c["hidden_size"], c["head_dim"], c["moe_intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "lm_head.weight": (c["vocab_size"], H),
              "model.norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (c["num_attention_heads"] * D, H),
            f"{p}.self_attn.k_proj.weight": (c["num_key_value_heads"] * D, H),
            f"{p}.self_attn.v_proj.weight": (c["num_key_value_heads"] * D, H),
            f"{p}.self_attn.o_proj.weight": (H, c["num_attention_heads"] * D),
            f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,),
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.mlp.gate.weight": (c["num_experts"], H),
        })
        for e in range(c["num_experts"]):
            q = f"{p}.mlp.experts.{e}"
            shapes.update({f"{q}.gate_proj.weight": (I, H), f"{q}.up_proj.weight": (I, H),
                           f"{q}.down_proj.weight": (H, I)})
    mx.random.seed(0)
    weights = {k: mx.random.normal(s) * 0.05 if len(s) == 2 else mx.ones(s) for k, s in shapes.items()}
    hf.mkdir(parents=True)
    mx.save_safetensors(str(hf / "model.safetensors"), weights, metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(c))
    return convert(str(hf), str(work / "q4"), quantize=True, dtype="float32")  # MLX's CPU gather_mm is float32 only


# ---- what one model does per decoded token ----

@contextmanager
def counting():
    """Count mx.distributed's collective calls and the bytes each is handed, while the block runs."""
    counts = {op: {"calls": 0, "bytes": 0} for op in COLLECTIVES}
    saved = {op: getattr(mx.distributed, op) for op in COLLECTIVES}

    def counted(op):
        def call(x, *args, **kwargs):
            counts[op]["calls"] += 1
            # recv(shape, dtype, src) is handed no array: its bytes are those it receives
            counts[op]["bytes"] += x.nbytes if isinstance(x, mx.array) else math.prod(x) * args[0].size
            return saved[op](x, *args, **kwargs)
        return call

    for op in COLLECTIVES:
        setattr(mx.distributed, op, counted(op))
    try:
        yield counts
    finally:
        for op, fn in saved.items():
            setattr(mx.distributed, op, fn)


def ours_steps(model, prompt: list):
    from mlx_qwen3.decode import generate_step
    from mlx_qwen3.models.cache import PromptCache

    return generate_step(model, mx.array(prompt, dtype=mx.uint32), PromptCache.new(model), GREEDY)


def peer_steps(model, prompt: list):
    from mlx_lm.generate import generate_step

    return (int(t) for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, sampler=GREEDY))


def measure(model, steps_of, prompt: list, decode: int, counted: int = 8) -> dict:
    """Decode tok/s over `decode` greedy tokens, then the collectives per token over `counted` more.

    Both generators build step t+1's graph when step t's token is asked for, so counting across whole
    next() calls counts whole steps."""
    steps = steps_of(model, prompt)
    tokens = [next(steps)]
    tic = time.perf_counter()
    tokens += [next(steps) for _ in range(decode - 1)]
    tps = (decode - 1) / (time.perf_counter() - tic)
    with counting() as counts:
        for _ in range(counted):
            next(steps)
    steps.close()
    per_token = {op: {k: v / counted for k, v in c.items()} for op, c in counts.items() if c["calls"]}
    return {
        "decode_tps": tps,
        "collectives_per_token": sum(c["calls"] for c in per_token.values()),
        "collective_bytes_per_token": sum(c["bytes"] for c in per_token.values()),
        "by_op": per_token,
        "tokens": tokens,
    }


def replicated_bytes(model) -> int:
    """What every rank holds whole under tensor parallel: embeddings, lm_head, norms, routers."""
    from mlx.utils import tree_flatten

    return sum(p.nbytes for k, p in tree_flatten(model.parameters())
               if "layers." not in k or "norm" in k or ".mlp.gate." in k)


def load_ours(folder, g=None, parallel="tensor", experts="split"):
    from mlx_qwen3.models.shard import shard
    from mlx_qwen3.load import load_model

    model, _ = load_model(folder, lazy=True, parallel="none")
    if g is not None:
        shard(model, g, parallel, experts)
    mx.eval(model.parameters())
    return model


def load_peer(folder, g=None):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder), lazy=True)
    if g is not None:
        model.shard(g)
    mx.eval(model.parameters())
    return model


def variants(folder, g):
    """(name, loader, steps) for each model the ranks compare; loaded one at a time."""
    return [
        ("ours_split", lambda: load_ours(folder, g, "tensor", "split"), ours_steps),
        ("ours_whole", lambda: load_ours(folder, g, "tensor", "whole"), ours_steps),
        ("ours_pipeline", lambda: load_ours(folder, g, "pipeline"), ours_steps),
        ("mlx_lm", lambda: load_peer(folder, g), peer_steps),
    ]


# ---- the two sides of the run ----

def single(folder, prompt: list, decode: int) -> dict:
    """Whole models in this one process: the decode speed the ranks are compared against."""
    out = {}
    for name, load, steps in (("ours", lambda: load_ours(folder), ours_steps),
                              ("mlx_lm", lambda: load_peer(folder), peer_steps)):
        model = load()
        measure(model, steps, prompt[:4], 4, counted=1)  # warm up
        out[name] = measure(model, steps, prompt, decode, counted=1)
        out[name]["weight_bytes"] = memory.weight_bytes(model)
        out[name]["replicated_bytes"] = replicated_bytes(model)
        del model
    return out


def moe_share_speed(ranks: int, D: int = 2048, I: int = 768, E: int = 128, k: int = 8, tokens: int = 200) -> dict:
    """One rank's MoE work per decoded token at Qwen3-30B-A3B's shapes, 4-bit, in this one process (no
    collectives): its share as "split" (1/N of each expert) and as "whole" (1/N of the experts, the
    others' picks run at weight 0 to keep shapes fixed), over the same random routings. Microseconds."""
    import mlx.nn as nn

    from mlx_qwen3.models.qwen3_moe import ModelArgs, SparseMoeBlock
    from mlx_qwen3.models.shard import _shard_mlp

    class Rank0:
        def rank(self):
            return 0

        def size(self):
            return ranks

    args = ModelArgs(model_type="qwen3_moe", hidden_size=D, num_hidden_layers=1, intermediate_size=I,
                     num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-6, vocab_size=1,
                     max_position_embeddings=1, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I)
    xs = [mx.random.normal((1, 1, D)) for _ in range(tokens)]
    out = {}
    for experts in ("split", "whole"):
        mx.random.seed(0)
        block = SparseMoeBlock(args)
        nn.quantize(block.switch_mlp, 64, 4)
        share = _shard_mlp(block, Rank0(), experts)
        mx.eval(share.parameters())
        for x in xs[:10]:
            mx.eval(share(x))
        tic = time.perf_counter()
        for x in xs:
            mx.eval(share(x))
        out[experts] = (time.perf_counter() - tic) / tokens * 1e6
    return out


def rank_main(folder: str, prompt: list, decode: int, alone: dict):
    """One rank's part; rank 0 prints the JSON object."""
    from mlx_qwen3.distributed import group

    g = group()
    runs = {}
    for name, load, steps in variants(folder, g):
        model = load()
        measure(model, steps, prompt[:4], 4, counted=1)  # warm up, in step on every rank
        runs[name] = measure(model, steps, prompt, decode)
        # the median of REPEATS runs: two ranks and mlx.launch share this machine's cores, and it shows
        speeds = [runs[name]["decode_tps"]] + [measure(model, steps, prompt, decode)["decode_tps"]
                                              for _ in range(REPEATS - 1)]
        runs[name]["decode_tps"] = statistics.median(speeds)
        runs[name]["weight_bytes_this_rank"] = memory.weight_bytes(model)
        del model
    if g.rank() != 0:
        return
    whole = {"ours": alone["ours"]["weight_bytes"], "mlx_lm": alone["mlx_lm"]["weight_bytes"]}
    report = {}
    for name, r in runs.items():
        side = "mlx_lm" if name == "mlx_lm" else "ours"
        rep = alone[side]["replicated_bytes"]
        share = (whole[side] - rep) / g.size() + rep  # the target: total / N plus the replicated parts
        report[name] = {
            "decode_tps": r["decode_tps"],
            "decode_ratio_vs_1_process": r["decode_tps"] / alone[side]["decode_tps"],
            "collectives_per_token": r["collectives_per_token"],
            "collective_bytes_per_token": r["collective_bytes_per_token"],
            "by_op": r["by_op"],
            "weight_bytes_rank0": r["weight_bytes_this_rank"],
            "weight_share_rank0": r["weight_bytes_this_rank"] / whole[side],
            "weight_bytes_rank0_over_total_by_n_plus_replicated": r["weight_bytes_this_rank"] / share,
            "same_tokens_as_ours_in_1_process": r["tokens"] == alone["ours"]["tokens"],
        }
    peer = report["mlx_lm"]
    print(json.dumps({
        "model": "random 4-bit Qwen3-MoE: " + ", ".join(f"{k} {CONFIG[k]}" for k in (
            "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")),
        "ranks": g.size(),
        "backend": "ring, localhost",
        "device": str(mx.default_device()),
        "prompt_tokens": len(prompt),
        "decode_tokens": decode,
        "moe_block_us_per_token_on_one_rank": alone.pop("moe_us_per_token_one_rank"),
        "one_process": {k: {"decode_tps": v["decode_tps"], "weight_bytes": v["weight_bytes"],
                            "replicated_bytes": v["replicated_bytes"]}
                        for k, v in alone.items()},
        **report,
        "ratios_ours_over_mlx_lm": {
            name: {
                "decode_tps": report[name]["decode_tps"] / peer["decode_tps"],
                "collectives_per_token": report[name]["collectives_per_token"] / peer["collectives_per_token"],
                "collective_bytes_per_token":
                    report[name]["collective_bytes_per_token"] / peer["collective_bytes_per_token"],
            }
            for name in report if name != "mlx_lm"
        },
        "note": "collective bytes: the arrays handed to the collectives (a ring all_sum of 2 ranks sends that "
                f"much per rank); ranks' decode speeds: the median of {REPEATS} runs, on a shared CPU",
    }))


def free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 free here (mlx.launch gives rank i port p + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)  # internal: a JSON job, run as one rank
    args = ap.parse_args()
    if args.ranks not in (2, 4):  # what divides the folder's 4 key/value heads and its quantization groups
        ap.error(f"--ranks {args.ranks}: this benchmark's model splits over 2 or 4 ranks only")
    if args.decode_tokens < 2 or args.prompt_tokens < 4:
        ap.error("--decode-tokens must be at least 2 and --prompt-tokens at least 4")
    if args.rank_of:
        job = json.loads(Path(args.rank_of).read_text())
        return rank_main(job["folder"], job["prompt"], job["decode"], job["alone"])

    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        work = Path(tmp)
        folder = make_folder(work)
        prompt = mx.random.randint(0, CONFIG["vocab_size"], (args.prompt_tokens,)).tolist()
        alone = single(str(folder), prompt, args.decode_tokens)
        alone["moe_us_per_token_one_rank"] = moe_share_speed(args.ranks)
        job = work / "job.json"
        job.write_text(json.dumps({"folder": str(folder), "prompt": prompt, "decode": args.decode_tokens,
                                   "alone": alone}))
        # mlx.launch's own code, run by this interpreter (the module has no __main__ of its own)
        launch = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
                  "--backend", "ring", "-n", str(args.ranks), "--starting-port", str(free_ports(args.ranks)),
                  "--", sys.executable, __file__, "--rank-of", str(job)]
        out = subprocess.run(launch, timeout=600, stdout=subprocess.PIPE, text=True).stdout
    report = [line for line in out.splitlines() if line.startswith("{")]
    if not report:  # mlx.launch exits 0 even when a rank failed: its error is above, on stderr
        sys.exit("bench_distributed: rank 0 printed no result; see the ranks' errors above")
    print(report[-1])


if __name__ == "__main__":
    main()
