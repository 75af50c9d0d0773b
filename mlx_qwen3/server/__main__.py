from ..cli import main  # python -m mlx_qwen3.server is `mlx-qwen3 serve`

main("serve")
