"""The memory plan: KV bytes per setting, what fits in a given memory, the `plan` command (local folders
and Hub models planned from their config and safetensors headers, without their weights)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mlx_qwen3 import checkpoint as ckpt
from mlx_qwen3 import memory
from mlx_qwen3.errors import UserError
from mlx_qwen3.load import model_args

QWQ = dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
           num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=152064,
           max_position_embeddings=40960)


def test_kv_bytes_per_token_at_each_setting():
    """QwQ-32B: 64 layers x 8 kv heads x 128 x (k, v) x 2 bytes = 256 KB a token in float16; 8 and 4 bits
    with a float16 scale and bias per 64 values."""
    _, args = model_args(QWQ)
    full = memory.kv_bytes_per_token(args, 16)
    assert full == 64 * 8 * 128 * 2 * 2 == 262144
    assert memory.kv_bytes_per_token(args, 8) / full == pytest.approx((1 + 4 / 64) / 2)  # 0.53
    assert memory.kv_bytes_per_token(args, 4) / full == pytest.approx((0.5 + 4 / 64) / 2)  # 0.28


def test_the_longest_context_that_fits_is_the_edge_of_fitting():
    _, args = model_args(QWQ)
    weights = 18 * 2**30
    for limit_gb in (24, 40, 64):
        limit = limit_gb * 2**30
        for row in memory.plan(args, weights, 1000, limit):
            edge = row["longest_context"]
            bits = row["kv_bits"]
            at = {r["kv_bits"]: r for r in memory.plan(args, weights, edge, limit)}[bits]
            beyond = {r["kv_bits"]: r for r in memory.plan(args, weights, edge + 1, limit)}[bits]
            assert at["fits"] and (not beyond["fits"] or edge == args.context_window), (limit_gb, row)


def plan(folder, *args, memory_gb="2"):
    return subprocess.run([sys.executable, "-m", "mlx_qwen3", "plan", "--model", str(folder), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "MLX_QWEN3_MEMORY_GB": memory_gb})


def test_plan_command_on_a_folder(checkpoint):
    folder, _ = checkpoint("qwen3")
    out = plan(folder, "--context", "100", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["memory_limit_bytes"] == 2 * 2**30 and got["context"] == 100
    assert got["weight_bytes"] == checkpoint_bytes(folder)
    assert [r["kv_bits"] for r in got["kv"]] == [16, 8, 4] and all(r["fits"] for r in got["kv"])
    table = plan(folder)
    assert table.returncode == 0 and "longest context that fits" in table.stdout and "float16" in table.stdout
    tiny = plan(folder, memory_gb="0.0001")  # not even the weights
    assert "nothing fits 128 tokens" in tiny.stderr and tiny.stdout.count(" no ") == 3


def checkpoint_bytes(folder) -> int:
    return ckpt.stored_bytes(folder)


def test_plan_refuses_bad_input_in_one_line(checkpoint):
    folder, _ = checkpoint("qwen3")
    over = plan(folder, "--context", "100000")
    assert over.returncode == 2 and over.stderr.strip().splitlines() == [
        f"error: --context 100,000 is more than {folder}'s context window, 128 tokens"]
    bad = plan(folder, memory_gb="lots")
    assert bad.returncode == 2 and "MLX_QWEN3_MEMORY_GB='lots' is not a positive number" in bad.stderr
    assert "Traceback" not in over.stderr + bad.stderr


def test_a_hub_model_is_planned_without_its_weights(checkpoint, monkeypatch, tmp_path):
    """From config.json and the safetensors headers the Hub serves (stand-ins here); the weights are never
    downloaded."""
    import huggingface_hub

    folder, _ = checkpoint("qwen3")
    header = ckpt.safetensors_header(next(iter(ckpt.weight_files(folder))))
    tensors = {k: SimpleNamespace(data_offsets=t["data_offsets"]) for k, t in header.items() if k != "__metadata__"}
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: asked.append(name) or str(folder / name))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata",
                        lambda repo: SimpleNamespace(files_metadata={"model.safetensors": SimpleNamespace(tensors=tensors)}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded the weights"))
    config, weights = ckpt.describe("Qwen/Qwen3-Tiny-Standin")
    assert asked == ["config.json"] and config == json.loads((folder / "config.json").read_text())
    assert weights == checkpoint_bytes(folder)


def test_a_hub_model_without_safetensors_is_one_line(monkeypatch, checkpoint):
    import huggingface_hub
    from huggingface_hub.errors import NotASafetensorsRepoError

    folder, _ = checkpoint("qwen3")

    def missing(repo):
        raise NotASafetensorsRepoError("no model.safetensors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(folder / name))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", missing)
    with pytest.raises(UserError, match="has no readable safetensors weights"):
        ckpt.describe("Qwen/Nothing-Here")
