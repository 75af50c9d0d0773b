"""Run under `mlx.launch`: each rank loads the folders named on the command line sharded as asked and
saves its logits for the same prompt (and, with --mlx-lm, those of mlx-lm's sharded model) into OUT.

    mlx.launch --backend ring -n 2 python tests/ranks.py OUT PARALLEL FOLDER...
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen3 import distributed, memory
from mlx_qwen3.load import load_model

IDS = [[3, 17, 42, 99, 5, 250, 7, 64, 128, 1, 2, 200]]


def main(out: str, parallel: str, *folders: str):
    out = Path(out)
    rank = distributed.rank()
    for folder in folders:
        name = Path(folder).name
        model, _ = load_model(folder, parallel=parallel)
        logits = model(mx.array(IDS)).astype(mx.float32)
        np.save(out / f"{name}-{parallel}-rank{rank}.npy", np.array(logits))
        (out / f"{name}-{parallel}-rank{rank}.bytes").write_text(str(memory.weight_bytes(model)))
        if parallel == "tensor" and "--mlx-lm" in sys.argv:
            from mlx_lm.utils import sharded_load

            theirs, _ = sharded_load(folder, tensor_group=distributed.group())
            logits = theirs(mx.array(IDS)).astype(mx.float32)
            np.save(out / f"{name}-mlx_lm-rank{rank}.npy", np.array(logits))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--")])
