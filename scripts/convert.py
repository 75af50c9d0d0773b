"""Thin wrapper: python scripts/convert.py --hf-path ... --mlx-path ... [-q] (see mlx-qwen3 convert -h)."""

from mlx_qwen3.cli import main

if __name__ == "__main__":
    main("convert")
