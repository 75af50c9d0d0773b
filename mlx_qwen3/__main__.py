"""python -m mlx_qwen3 COMMAND: the same as the mlx-qwen3 script."""

from .cli import main

if __name__ == "__main__":
    main()
