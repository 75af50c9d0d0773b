"""Conversion: the quantization policy, interchange with mlx-lm both ways, sharding, atomicity, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import copy_tokenizer, prompt, rel_err
from test_load import _fake_hub_cache, _truncate, edit_config

from mlx_qwen3 import UserError, load_model
from mlx_qwen3 import convert as convert_module
from mlx_qwen3.convert import convert


def mlx_lm_model(folder):
    from mlx_lm.utils import load_model

    return load_model(folder)[0]


def same_logits(a, b, ids=None):
    ids = mx.array(prompt(2, 24)) if ids is None else ids
    return rel_err(a(ids), b(ids))


def run_convert(*args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "mlx_qwen3.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)


@pytest.mark.parametrize("name,bits", [("qwen3", 4), ("qwen3", 8), ("qwen3_moe", 4), ("qwen3_moe", 8)])
def test_our_folder_loads_in_mlx_lm_with_the_same_logits(checkpoint, tmp_path, name, bits):
    src, _ = checkpoint(name)
    out = convert(src, tmp_path / "out", quantize=True, bits=bits, group_size=32)
    ours, config = load_model(out)
    assert config["quantization"]["bits"] == bits
    assert same_logits(ours, mlx_lm_model(out)) < 1e-5
    # each weight within one quantization step of the float one it came from
    q, w = ours.model.layers[0].self_attn.q_proj, load_model(src)[0].model.layers[0].self_attn.q_proj.weight
    assert isinstance(q, nn.QuantizedLinear)
    back = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    step = (w.reshape(-1, 32).max(axis=1) - w.reshape(-1, 32).min(axis=1)) / (2**bits - 1)
    assert ((back - w).abs().reshape(-1, 32).max(axis=1) <= step * 1.01 + 1e-6).all().item()


@pytest.mark.parametrize("name,bits", [("qwen3", 4), ("qwen3_moe", 8)])
def test_mlx_lm_convert_folder_loads_in_ours_with_the_same_logits(checkpoint, tmp_path, name, bits):
    from mlx_lm import convert as mlx_lm_convert

    src, _ = checkpoint(name)
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    copy_tokenizer(hf)  # mlx_lm.convert needs a tokenizer
    out = tmp_path / "mlx_lm_out"
    mlx_lm_convert(str(hf), str(out), quantize=True, q_bits=bits, q_group_size=32)
    assert same_logits(load_model(out)[0], mlx_lm_model(out)) < 1e-5


def test_policy_router_float_embeddings_quantized_odd_inputs_float(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe")
    out = convert(src, tmp_path / "out", quantize=True, group_size=64)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["group_size"] == 64 and q["bits"] == 4 and q["mode"] == "affine"
    model, _ = load_model(out)
    moe, dense = model.layers[0].mlp, model.layers[1].mlp  # layer 1 is in mlp_only_layers
    assert q["model.layers.0.mlp.gate"] is False and type(moe.gate).__name__ == "Linear"
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    # intermediate_size 96 is not a multiple of 64: the dense down_proj stays float
    assert q["model.layers.1.mlp.down_proj"] is False and type(dense.down_proj).__name__ == "Linear"
    assert type(dense.up_proj).__name__ == "QuantizedLinear"
    # and the RMSNorms are never touched
    assert model.model.norm.weight.dtype == mx.float32
    assert same_logits(model, mlx_lm_model(out)) < 1e-5


def test_float_embeddings_opt_out(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = convert(src, tmp_path / "out", quantize=True, group_size=32, quantize_embeddings=False)
    model, config = load_model(out)
    assert config["quantization"]["model.embed_tokens"] is False
    assert type(model.model.embed_tokens).__name__ == "Embedding"
    assert type(model.lm_head).__name__ == "Linear"


def test_mixed_recipe_is_recorded_per_layer(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe")  # 3 layers: layer 2 is the last eighth
    out = convert(src, tmp_path / "out", mixed="mixed_4_8", group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    high = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["lm_head"] == high
    assert q["model.layers.2.self_attn.v_proj"] == high
    assert q["model.layers.2.mlp.switch_mlp.down_proj"] == high
    assert "model.layers.0.self_attn.v_proj" not in q  # the default, 4 bits
    model, _ = load_model(out)
    assert model.layers[2].self_attn.v_proj.bits == 8 and model.layers[0].self_attn.v_proj.bits == 4
    assert same_logits(model, mlx_lm_model(out)) < 1e-5


def test_float_conversion_dtype_and_side_files(checkpoint, tmp_path):
    src, hf = checkpoint("qwen3")
    hf_copy = tmp_path / "hf"
    shutil.copytree(src, hf_copy)
    copy_tokenizer(hf_copy)
    (hf_copy / "chat_template.jinja").write_text("{{ messages }}")
    out = convert(hf_copy, tmp_path / "out", dtype="float16")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization" not in config
    model, _ = load_model(out)
    assert model.model.embed_tokens.weight.dtype == mx.float16
    assert same_logits(model, mlx_lm_model(out)) < 1e-3


def test_shards_stay_under_the_limit(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe")
    out = convert(src, tmp_path / "out", quantize=True, group_size=32, max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    # a shard exceeds the limit only when one tensor alone does
    assert same_logits(load_model(out)[0], mlx_lm_model(out)) < 1e-5


def test_transformers5_config_gets_mlx_lm_spellings(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe_yarn")  # num_local_experts, rope_parameters
    out = convert(src, tmp_path / "out", quantize=True, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 8 and config["rope_theta"] == 1e6
    load_model(out)


def test_existing_output_needs_force(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="exists; pass --force"):
        convert(src, out)
    assert (out / "keep").exists()
    convert(src, out, force=True)
    assert not (out / "keep").exists() and (out / "config.json").exists()


def test_an_exception_mid_conversion_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint("qwen3_moe")
    calls = []

    def failing(file, tensors):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(file, tensors)

    real = convert_module.write_safetensors
    monkeypatch.setattr(convert_module, "write_safetensors", failing)
    with pytest.raises(OSError):
        convert(src, tmp_path / "out", quantize=True, group_size=32, max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []


# The child converts with a slow disk (a sleep after the first shard), so the signal lands mid-way.
SLOW = """
import sys, time
import mlx_qwen3.convert as c
real = c.write_safetensors
def slow(file, tensors):
    real(file, tensors)
    time.sleep(60)
c.write_safetensors = slow
sys.argv = ["convert"] + sys.argv[1:]
c.main()
"""


def _start_slow(src, out):
    args = ["--hf-path", str(src), "--mlx-path", str(out), "-q", "--group-size", "32"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.parent.glob(f".{out.name}.partial-*/model*.safetensors")):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_kill_mid_conversion_leaves_nothing(checkpoint, tmp_path, sig):
    src, _ = checkpoint("qwen3")
    out = tmp_path / "out"
    proc = _start_slow(src, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_conversion(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = tmp_path / "out"
    proc = _start_slow(src, out)
    proc.kill()
    proc.wait()
    assert not out.exists()
    convert(src, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hub_id_converts_from_the_cache_offline(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    _fake_hub_cache(tmp_path / "hf_home", "Qwen/Qwen3-Tiny", src)
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    done = run_convert("--hf-path", "Qwen/Qwen3-Tiny", "--mlx-path", str(tmp_path / "out"), "-q",
                       "--group-size", "32", env=env)
    assert done.returncode == 0, done.stderr
    assert load_model(tmp_path / "out")[1]["quantization"]["bits"] == 4
    missing = run_convert("--hf-path", "Qwen/Nope", "--mlx-path", str(tmp_path / "o2"), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not a local folder nor in the Hugging Face cache" in missing.stderr
    assert not (tmp_path / "o2").exists()


def _break(kind, folder):
    if kind == "model type":
        edit_config(folder, model_type="llama")
    elif kind == "truncated shard":
        _truncate(folder)
    elif kind == "missing shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}}))


BAD_SOURCES = {
    "model type": "'llama' is not supported; supported: qwen2, qwen3, qwen3_moe",
    "truncated shard": "model.safetensors is truncated",
    "missing shard": "lacks shards named in its index: model-2.safetensors",
}


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_is_one_line_and_writes_nothing(checkpoint, tmp_path, kind):
    src, _ = checkpoint("qwen3")
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    _break(kind, hf)
    done = run_convert("--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"), "-q")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and BAD_SOURCES[kind] in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


BAD_OPTIONS = {
    ("--bits", "5"): "--bits 5 is not supported; use 4 or 8",
    ("--group-size", "48"): "--group-size 48 is not supported; use 32, 64 or 128",
    ("--dtype", "int8"): "--dtype int8 is not supported",
    ("--mixed", "mixed_8_4"): "is not a recipe; use mixed_LOW_HIGH",
}


@pytest.mark.parametrize("option", BAD_OPTIONS)
def test_bad_options_are_one_line(checkpoint, tmp_path, option):
    src, _ = checkpoint("qwen3")
    done = run_convert("--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), *option)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert BAD_OPTIONS[option] in done.stderr
    assert not (tmp_path / "out").exists()


def test_output_inside_the_input_is_refused(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    with pytest.raises(UserError, match="is inside the input folder"):
        convert(src, src / "mlx")
    assert not (src / "mlx").exists()


def test_too_little_disk_is_refused_before_writing(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint("qwen3")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough free disk at .*: the output needs 0\.\d MB, 0\.0 MB are free"):
        convert(src, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_mlx_quantized_folder_is_not_an_input(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    q = convert(src, tmp_path / "q", quantize=True, group_size=32)
    with pytest.raises(UserError, match="already an MLX quantized folder"):
        convert(q, tmp_path / "again")


PEAK = """
import resource, sys
from mlx_qwen3.convert import convert
if sys.argv[1] != "-":
    convert(sys.argv[1], sys.argv[2], quantize=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Peak memory grows by about the largest tensor, not by the checkpoint (200 MB here)."""
    import numpy as np
    from safetensors.numpy import save_file

    H, I, layers = 1024, 3072, 4
    config = dict(model_type="qwen3", hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=4096,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  torch_dtype="float16")  # fp32 files cast to fp16: the cast must stream too
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (4096, H), "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (H, H), f"{p}.self_attn.k_proj.weight": (512, H),
                       f"{p}.self_attn.v_proj.weight": (512, H), f"{p}.self_attn.o_proj.weight": (H, H),
                       f"{p}.self_attn.q_norm.weight": (128,), f"{p}.self_attn.k_norm.weight": (128,),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I), f"{p}.input_layernorm.weight": (H,),
                       f"{p}.post_attention_layernorm.weight": (H,)})
        save_file({k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}, src / f"model-{i}.safetensors")
        shapes = {}
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert total > 200e6

    def peak_kb(*args):
        out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    grew = (peak_kb(str(src), str(tmp_path / "out")) - peak_kb("-", "-")) * 1024
    largest = I * H * 4
    assert grew < 4 * largest < total / 3, f"grew {grew / 1e6:.0f} MB converting {total / 1e6:.0f} MB"
