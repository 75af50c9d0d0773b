"""Thin wrapper: python scripts/convert.py --hf-path ... --mlx-path ... [-q] (see python -m mlx_qwen3.convert -h)."""

from mlx_qwen3.convert import main

if __name__ == "__main__":
    main()
