"""Conversion: the quantization policy, interchange with mlx-lm both ways, sharding, atomicity, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import copy_tokenizer, prompt, rel_err
from test_load import _fake_hub_cache, _truncate, edit_config
from warm_cli import run_many

from mlx_qwen3 import UserError, load_model
from mlx_qwen3 import convert as convert_module
from mlx_qwen3.checkpoint import read_config
from mlx_qwen3.convert import convert
from mlx_qwen3.load import model_args


def mlx_lm_model(folder):
    from mlx_lm.utils import load_model

    return load_model(folder)[0]


def same_logits(a, b, ids=None):
    ids = mx.array(prompt(2, 24)) if ids is None else ids
    return rel_err(a(ids), b(ids))


def snapshot(folder) -> dict:
    """Every file below `folder` with its bytes (a folder's state, to compare before and after)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_convert(*args, env=None, timeout=120, **kw):
    env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "mlx_qwen3.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)


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
    sizes = [tensor_bytes(s) for s in shards]  # per shard, its tensors' bytes in file order
    for i, tensors in enumerate(sizes):
        # a shard exceeds the limit only when one tensor alone does
        assert sum(tensors) <= 40_000 or len(tensors) == 1, f"{shards[i].name}: {tensors}"
        # and a new shard starts only when the next tensor would not fit in this one
        if i + 1 < len(sizes):
            assert sum(tensors) + sizes[i + 1][0] > 40_000, f"{shards[i].name} was cut early"
    assert same_logits(load_model(out)[0], mlx_lm_model(out)) < 1e-5


def tensor_bytes(file) -> list:
    """The byte size of each tensor in a safetensors file, in the order they are stored."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return [end - start for start, end in sorted(h["data_offsets"] for h in header.values())]


def test_transformers5_config_gets_mlx_lm_spellings(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_moe_yarn")  # num_local_experts, rope_parameters
    out = convert(src, tmp_path / "out", quantize=True, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 8 and config["rope_theta"] == 1e6
    load_model(out)


def _hub_spelling_only(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("rope_parameters", "num_local_experts")}


@pytest.mark.parametrize("name", ["qwen3_tied_yarn", "qwen3_moe_yarn"])
def test_loading_and_conversion_read_a_config_alike(checkpoint, tmp_path, name):
    """One normalisation of the spellings: a transformers-5 config converts to a config.json that gives
    the original's ModelArgs, also to a reader that knows only the Hub's keys (as mlx-lm does)."""
    src, _ = checkpoint(name)
    original = read_config(src)
    assert "rope_parameters" in original and "rope_scaling" not in original
    written = read_config(convert(src, tmp_path / "out"))
    args = model_args(original)[1]
    assert args.rope_scaling["rope_type"] == "yarn" and args.rope_theta == 1e6
    assert model_args(written)[1] == args
    assert model_args(_hub_spelling_only(written))[1] == args


def test_converted_yarn_config_reads_the_same_in_mlx_lm(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3_tied_yarn")  # rope_parameters only; mlx-lm's qwen3 has YaRN
    out = convert(src, tmp_path / "out")
    file = out / "config.json"
    file.write_text(json.dumps(_hub_spelling_only(json.loads(file.read_text()))))
    ids = mx.array(prompt(2, 80, seed=5))  # past original_max_position_embeddings (32): YaRN matters
    assert same_logits(load_model(src)[0], mlx_lm_model(out), ids) < 1e-5


def test_existing_output_needs_force(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = convert(src, tmp_path / "out", quantize=True, group_size=32)
    before = snapshot(out)
    with pytest.raises(UserError, match="exists; pass --force"):
        convert(src, out)
    assert snapshot(out) == before
    convert(src, out, force=True)  # an earlier conversion of ours: replaced, now float
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_exception_mid_conversion_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint("qwen3_moe")
    calls = []

    def failing(file, tensors, *rest):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(file, tensors, *rest)

    real = convert_module.write_safetensors
    monkeypatch.setattr(convert_module, "write_safetensors", failing)
    with pytest.raises(UserError, match="could not write .*: disk on fire; nothing was written"):
        convert(src, tmp_path / "out", quantize=True, group_size=32, max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []


# The child converts with a slow disk (a sleep after the first shard), so the signal lands mid-way.
SLOW = """
import sys, time
import mlx_qwen3.convert as c
real = c.write_safetensors
def slow(file, tensors, *rest):
    real(file, tensors, *rest)
    time.sleep(60)
c.write_safetensors = slow
sys.argv = ["convert"] + sys.argv[1:]
from mlx_qwen3.cli import main
main("convert")
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


@pytest.fixture(scope="module")
def refused(checkpoint, tmp_path_factory):
    """Each bad source and bad option through `python -m mlx_qwen3.convert`, from one warm interpreter
    (tests/warm_cli.py), each in a folder of its own: (kind or option) -> (CompletedProcess, its folder)."""
    src, _ = checkpoint("qwen3")
    runs, folders = [], {}
    for kind in BAD_SOURCES:
        folders[kind] = tmp_path_factory.mktemp("source")
        shutil.copytree(src, folders[kind] / "hf")
        _break(kind, folders[kind] / "hf")
        runs.append(("mlx_qwen3.convert", ["--hf-path", str(folders[kind] / "hf"), "--mlx-path",
                                           str(folders[kind] / "out"), "-q"], None))
    for option in BAD_OPTIONS:
        folders[option] = tmp_path_factory.mktemp("option")
        runs.append(("mlx_qwen3.convert", ["--hf-path", str(src), "--mlx-path", str(folders[option] / "out"),
                                           *option], None))
    import mlx_qwen3

    done = run_many(runs, tmp_path_factory.mktemp("warm"), Path(mlx_qwen3.__file__).parents[1])
    texts = [subprocess.CompletedProcess(d.args, d.returncode, d.stdout.decode(), d.stderr.decode()) for d in done]
    return {key: (text, folders[key]) for key, text in zip(folders, texts)}


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_is_one_line_and_writes_nothing(refused, kind):
    done, folder = refused[kind]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and BAD_SOURCES[kind] in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["hf"]


BAD_OPTIONS = {
    ("--bits", "5"): "--bits 5 is not supported; use 4 or 8",
    ("--group-size", "48"): "--group-size 48 is not supported; use 32, 64 or 128",
    ("--dtype", "int8"): "--dtype int8 is not supported",
    ("--mixed", "mixed_8_4"): "is not a recipe; use mixed_LOW_HIGH",
}


@pytest.mark.parametrize("option", BAD_OPTIONS)
def test_bad_options_are_one_line(refused, option):
    done, folder = refused[option]
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert BAD_OPTIONS[option] in done.stderr
    assert not (folder / "out").exists()


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
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak if sys.platform == "darwin" else peak * 1024)  # in bytes: ru_maxrss is KiB on Linux, bytes on macOS
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

    def peak_bytes(*args):
        out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    grew = peak_bytes(str(src), str(tmp_path / "out")) - peak_bytes("-", "-")
    largest = I * H * 4
    assert grew < 4 * largest < total / 3, f"grew {grew / 1e6:.0f} MB converting {total / 1e6:.0f} MB"


# ---- --force replaces only an earlier conversion, atomically (issue 9, point 1) ----
# Every target below is made inside pytest's fresh tmp_path: "~" and "." are pointed there (HOME, chdir),
# and "/" is never named (any input lies under it, so the rule "holds the input folder" refuses it).

def _earlier(src, folder):
    return convert(src, folder, quantize=True, group_size=32)


def _target(kind, src, tmp_path, monkeypatch):
    """-> (the --mlx-path argument, the folder that must stay untouched, the phrase of the refusal)."""
    if kind == "other files":
        out = _earlier(src, tmp_path / "out")
        (out / "notes.txt").write_text("mine")
        return str(out), out, "holds what a conversion does not write (notes.txt)"
    if kind == "a subfolder":
        out = _earlier(src, tmp_path / "out")
        (out / "runs").mkdir()
        return str(out), out, "holds what a conversion does not write (runs)"
    if kind == "holds the input":
        hf = tmp_path / "models" / "x" / "hf"
        shutil.copytree(src, hf)
        return str(tmp_path / "models" / "x"), tmp_path / "models", "holds the input folder"
    if kind == "is the input":
        return str(src), src, "is inside the input folder"
    if kind == "a Hugging Face folder":
        hf = tmp_path / "other_hf"
        shutil.copytree(src, hf)
        return str(hf), hf, "is not an earlier MLX conversion"
    if kind == "a symlink":
        out = _earlier(src, tmp_path / "out")
        (tmp_path / "link").symlink_to(out)
        return str(tmp_path / "link"), tmp_path, "is a symbolic link"
    if kind == "a file":
        (tmp_path / "out").write_text("x")
        return str(tmp_path / "out"), tmp_path, "is not a folder"
    if kind == "home":
        home = _earlier(src, tmp_path / "home")
        monkeypatch.setenv("HOME", str(home))
        return "~", home, "is the root, home or current folder"
    if kind == "current folder":
        here = _earlier(src, tmp_path / "here")
        monkeypatch.chdir(here)
        return ".", here, "is the root, home or current folder"
    if kind == "holds the current folder":
        out = _earlier(src, tmp_path / "out")
        (tmp_path / "out" / "sub").mkdir()
        monkeypatch.chdir(tmp_path / "out" / "sub")
        return "..", out, "is the root, home or current folder"
    if kind == "empty string":
        here = _earlier(src, tmp_path / "here")
        monkeypatch.chdir(here)
        return "", here, "--mlx-path is empty"
    raise ValueError(kind)


REFUSED = ["other files", "a subfolder", "holds the input", "is the input", "a Hugging Face folder", "a symlink",
           "a file", "home", "current folder", "holds the current folder", "empty string"]


@pytest.mark.parametrize("kind", REFUSED)
def test_force_refuses_what_is_not_an_earlier_conversion(checkpoint, tmp_path, monkeypatch, kind):
    src, _ = checkpoint("qwen3")
    hf = tmp_path / "input"
    shutil.copytree(src, hf)
    target, keep, phrase = _target(kind, hf if kind != "holds the input" else src, tmp_path, monkeypatch)
    if kind == "holds the input":
        hf = tmp_path / "models" / "x" / "hf"
    before_keep, before_input = snapshot(keep), snapshot(hf)
    done = run_convert("--hf-path", str(hf), "--mlx-path", target, "--force", cwd=os.getcwd(),
                       env={"HOME": os.environ["HOME"]})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and phrase in done.stderr, done.stderr
    assert snapshot(keep) == before_keep and snapshot(hf) == before_input
    assert not [p for p in tmp_path.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def test_force_replaces_our_conversions_mlx_lm_folders_and_empty_folders(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    ours = convert(src, tmp_path / "ours")  # float: only our marker says what it is
    assert json.loads((ours / "config.json").read_text())["converted_by"].startswith("mlx-qwen3 ")
    mlx_lm = _earlier(src, tmp_path / "mlx_lm")  # mlx-lm's layout: no marker, quantized, a model card
    config = json.loads((mlx_lm / "config.json").read_text())
    del config["converted_by"]
    (mlx_lm / "config.json").write_text(json.dumps(config))
    (mlx_lm / "README.md").write_text("# a model card")
    (tmp_path / "empty").mkdir()
    for out in (ours, mlx_lm):
        convert(src, out, quantize=True, bits=8, group_size=32, force=True)
        assert load_model(out)[1]["quantization"]["bits"] == 8 and not (out / "README.md").exists()
    convert(src, tmp_path / "empty")  # nothing to lose: no --force needed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mlx_lm", "ours"]


# The child stops itself with `sig` at a chosen moment of replacing the old folder:
# "aside": as the old folder is about to be renamed aside (the moment it starts to change);
# "between": after it was renamed aside, before the new one goes in; "removing": as the old one is deleted.
AT_THE_SWAP = """
import os, shutil, signal, sys
import mlx_qwen3.convert as c
out, sig, moment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rename, rmtree = os.rename, shutil.rmtree
def patched_rename(a, b):
    if ".partial-" in os.fspath(a) and moment == "refused":
        raise PermissionError(13, "Permission denied")
    if os.fspath(a) == out and moment == "aside":
        os.kill(os.getpid(), sig)
    rename(a, b)
    if os.fspath(a) == out and moment == "between":
        os.kill(os.getpid(), sig)
def patched_rmtree(p, *args, **kw):
    if ".old-" in os.fspath(p) and moment == "removing":
        os.kill(os.getpid(), sig)
    rmtree(p, *args, **kw)
os.rename, shutil.rmtree = patched_rename, patched_rmtree
sys.argv = ["convert"] + sys.argv[4:]
from mlx_qwen3.cli import main
main("convert")
"""


@pytest.mark.parametrize("moment", ["aside", "between", "removing"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_replacing_is_atomic_under_signals(checkpoint, tmp_path, sig, moment):
    src, _ = checkpoint("qwen3")
    out = _earlier(src, tmp_path / "out")
    old = snapshot(out)
    new = snapshot(convert(src, tmp_path / "reference"))
    shutil.rmtree(tmp_path / "reference")
    args = ["--hf-path", str(src), "--mlx-path", str(out), "--force"]
    done = subprocess.run([sys.executable, "-c", AT_THE_SWAP, str(out), str(int(sig)), moment, *args],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    if sig != signal.SIGKILL:  # handled: the swap completes as one step, and the message says so
        assert done.returncode == 130 and done.stderr.count("\n") == 1
        assert f"interrupted; {out} holds the new conversion" in done.stderr
        assert snapshot(out) == new and [p.name for p in tmp_path.iterdir()] == ["out"]
        return
    assert done.returncode == -signal.SIGKILL
    # killed outright: whatever is under the name is whole, old or new, never a mix ...
    if moment == "aside":
        assert snapshot(out) == old
    elif moment == "removing":
        assert snapshot(out) == new
    else:  # ... or, in the instant between the two renames, nothing is, and the old one is whole aside
        assert not out.exists()
        aside = [p for p in tmp_path.iterdir() if ".old-" in p.name]
        assert len(aside) == 1 and snapshot(aside[0]) == old
    # the next conversion puts things right before it begins: the old one back, leftovers removed
    again = run_convert(*args[:-1])
    assert again.returncode == 2 and "exists; pass --force" in again.stderr, again.stderr
    assert snapshot(out) == (new if moment == "removing" else old)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_folder_that_cannot_go_in_leaves_the_old_one_and_says_so(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    out = _earlier(src, tmp_path / "out")
    old = snapshot(out)
    done = subprocess.run([sys.executable, "-c", AT_THE_SWAP, str(out), "0", "refused", "--hf-path", str(src),
                           "--mlx-path", str(out), "--force"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"could not write {out}: Permission denied; {out} is as it was" in done.stderr
    assert snapshot(out) == old and [p.name for p in tmp_path.iterdir()] == ["out"]


# ---- write failures: a full disk, a read-only folder (issue 9, point 10) ----

def _mount_tmpfs(folder, size: str):
    """A tmpfs of `size` at `folder` (root only: elsewhere the test says why it skips)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"a small tmpfs cannot be mounted here ({done.stderr.strip() or 'mount failed'}); needs root")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    yield _mount_tmpfs(tmp_path / "disk", "64k")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], capture_output=True)


@pytest.fixture
def read_only_disk(tmp_path):
    mnt = _mount_tmpfs(tmp_path / "ro", "16m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# The free-disk check is skipped, as if another program filled the disk after it.
NO_DISK_CHECK = """
import collections
import shutil
import sys
usage = collections.namedtuple("usage", "total used free")
shutil.disk_usage = lambda path: usage(2**50, 0, 2**50)  # the check sees a huge free disk
sys.argv = ["convert"] + sys.argv[1:]
from mlx_qwen3.cli import main
main("convert")
"""


def test_a_disk_that_fills_mid_write_is_one_line_and_leaves_the_old_folder(checkpoint, small_disk):
    src, _ = checkpoint("qwen3")  # about 0.3 MB of float32 weights: more than the 64 KiB disk holds
    out = small_disk / "out"
    out.mkdir()
    for f in ("config.json", "model.safetensors"):
        (out / f).write_text(json.dumps({"converted_by": "mlx-qwen3 0.1.0"}) if f == "config.json" else "old")
    old = snapshot(out)
    for args in ([], ["--force"]):
        done = subprocess.run([sys.executable, "-c", NO_DISK_CHECK, "--hf-path", str(src), "--mlx-path",
                               str(small_disk / "new" if not args else out), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr, done.stderr
    assert snapshot(out) == old and sorted(p.name for p in small_disk.iterdir()) == ["out"]


def test_a_read_only_output_folder_is_one_line(checkpoint, read_only_disk):
    src, _ = checkpoint("qwen3")
    done = run_convert("--hf-path", str(src), "--mlx-path", str(read_only_disk / "out"), "-q", "--group-size", "32")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Read-only file system" in done.stderr, done.stderr


def test_integer_weights_are_one_line(checkpoint, tmp_path):
    from test_load import rewrite_weights

    src, _ = checkpoint("qwen3")
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    rewrite_weights(hf, lambda w: w.update({"model.norm.weight": w["model.norm.weight"].astype("int32")}))
    done = run_convert("--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "model.norm.weight" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_config_whose_weights_could_not_exist_is_refused_at_once(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    edit_config(hf, num_hidden_layers=1000000)
    done = run_convert("--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"), timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
