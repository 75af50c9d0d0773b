from . import qwen3, qwen3_moe

# model_type in config.json -> the module holding its ModelArgs and Model.
MODELS = {"qwen3": qwen3, "qwen2": qwen3, "qwen3_moe": qwen3_moe}
