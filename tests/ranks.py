"""What each rank runs in tests/test_distributed.py, under `mlx.launch --backend ring -n N`:

    python tests/ranks.py logits OUT MODES FOLDER... [--mlx-lm]   each rank's logits and weight bytes
    python tests/ranks.py memory OUT FOLDER...                     and the peak memory loading took
    python tests/ranks.py api OUT FOLDER                           generate and ChatSession results
    python tests/ranks.py cli FOLDER_RANK0 FOLDER_OTHERS ARGS...    the generate CLI, --model per rank
"""

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen3 import distributed, memory

IDS = [[3, 17, 42, 99, 5, 250, 7, 64, 128, 1, 2, 200]]


def logits(out: str, modes: str, *folders: str):
    out, rank = Path(out), distributed.rank()
    for folder in folders:
        name = Path(folder).name
        for parallel in modes.split(","):
            model = _load(out, folder, parallel)
            np.save(out / f"{name}-{parallel}-{rank}.npy", np.array(model(mx.array(IDS)).astype(mx.float32)))
        if "--mlx-lm" in sys.argv:
            from mlx_lm.utils import sharded_load

            theirs, _ = sharded_load(folder, tensor_group=distributed.group())
            np.save(out / f"{name}-mlx_lm-{rank}.npy", np.array(theirs(mx.array(IDS)).astype(mx.float32)))


def memory_use(out: str, *folders: str):
    for folder in folders:
        _load(Path(out), folder, "tensor")


def _load(out: Path, folder: str, parallel: str):
    """Load, and write the rank's weight bytes, its layers and the peak memory loading took."""
    from mlx_qwen3.load import load_model

    gc.collect()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model, _ = load_model(folder, parallel=parallel)
    stats = {"bytes": memory.weight_bytes(model), "peak": mx.get_peak_memory() - before, "layers": len(model.layers)}
    (out / f"{Path(folder).name}-{parallel}-{distributed.rank()}.json").write_text(json.dumps(stats))
    return model


def api(out: str, folder: str):
    """The Python API on a sharded model: a thought ended by its budget, a stop string, a chat."""
    from mlx_qwen3 import ChatSession, load
    from mlx_qwen3.generate import generate

    model, tok = load(folder)
    results = {}
    for name, options in {"budget": dict(thinking_budget=1, temperature=0),
                          "stop": dict(stop=["is"], temperature=0),
                          "sampled": dict(seed=3)}.items():
        r = generate(model, tok, "What is 2+2?", **options)
        results[name] = [r.thinking, r.answer, r.finish_reason, r.generation_tokens]
    chat = ChatSession(model, tok, temperature=0)
    results["chat"] = [[r.answer, r.cached_tokens] for r in (chat.send("What is 2+2?"), chat.send("And 3+3?"))]
    (Path(out) / f"api-{distributed.rank()}.json").write_text(json.dumps(results))


def cli(first: str, others: str, *args: str):
    from mlx_qwen3.cli import main

    sys.argv = ["mlx_qwen3.generate", "--model", first if distributed.rank() == 0 else others, *args]
    main("generate")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"logits": logits, "memory": memory_use, "api": api, "cli": cli}[command](*[a for a in rest if a != "--mlx-lm"])
