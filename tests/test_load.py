"""Loading: folders and Hub ids, shards, dtypes, quantized MLX folders, and one clear line for bad input."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from chain import build as build_scripted
from checkpoints import build, copy_tokenizer, prompt, reference_logits, rel_err

from mlx_qwen3 import UserError, load, load_model


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of the tiny Qwen3 checkpoint, free to break."""
    src, _ = checkpoint("qwen3")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def run_cli(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlx_qwen3.load", *args], capture_output=True, text=True, env=env, timeout=120
    )


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def rewrite_weights(folder, change):
    from safetensors.numpy import load_file, save_file

    file = folder / "model.safetensors"
    weights = load_file(file)
    change(weights)
    save_file(weights, file, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_keep_their_dtype(tmp_path, dtype):
    hf = build("qwen3", tmp_path, dtype=dtype)
    model, _ = load_model(tmp_path)
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    ids = prompt(1, 32)
    assert rel_err(model(mx.array(ids)).astype(mx.float32), reference_logits(hf, ids)) < 5e-2


def test_sharded_checkpoint_loads_through_its_index(checkpoint):
    folder, hf = checkpoint("qwen3_moe")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, config = load_model(folder)
    ids = prompt(1, 16)
    assert rel_err(model(mx.array(ids)), reference_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("name,bits", [("qwen3", 4), ("qwen3", 8), ("qwen3_moe", 4), ("qwen2", 8)])
def test_mlx_lm_quantized_folder_loads_with_the_same_logits(checkpoint, tmp_path, name, bits):
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    src, _ = checkpoint(name)
    peer, config = mlx_lm_load_model(src, lazy=True)
    peer, config = quantize_model(peer, config, 32, bits)
    save_model(tmp_path, peer)
    save_config(config, tmp_path / "config.json")

    model, ours_config = load_model(tmp_path, rope="config")  # mlx-lm's YaRN is static
    assert ours_config["quantization"]["bits"] == bits
    peer, _ = mlx_lm_load_model(tmp_path)
    ids = mx.array(prompt(2, 24))
    assert rel_err(model(ids), peer(ids)) < 1e-5


def test_load_returns_the_real_tokenizer(tmp_path):
    model, tok = load(build_scripted(tmp_path, {}))  # an embedding of Qwen3's 151,936 rows
    think = tok.token_id("<think>")
    assert think is not None and tok.decode([think]) == "<think>"
    assert tok.token_id("<|im_end|>") in tok.eos_token_ids
    assert tok.decode(tok.encode("Hello, 世界")) == "Hello, 世界"
    assert "enable_thinking" in tok.chat_template


def test_load_without_tokenizer_says_so(folder):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load(folder)


def _fake_hub_cache(hf_home, repo_id, src):
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_the_cache_offline(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    _fake_hub_cache(tmp_path, "Qwen/Qwen3-Tiny", src)
    out = run_cli("Qwen/Qwen3-Tiny", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_type"] == "qwen3"


def test_hub_id_not_cached_offline_is_one_clear_line(tmp_path):
    out = run_cli("Qwen/Qwen3-Missing", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "Qwen/Qwen3-Missing" in out.stderr and "HF_HUB_OFFLINE" in out.stderr


def test_missing_path_on_the_cli_is_one_clear_line(tmp_path):
    out = run_cli(str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "does not exist" in out.stderr


def _truncate(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _drop_a_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    names = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    index = {"weight_map": {f"w{i}": n for i, n in enumerate(sorted(names))}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BAD = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "unsupported model_type": (
        lambda f: edit_config(f, model_type="llama"),
        r"'llama' is not supported; supported: qwen2, qwen3, qwen3_moe",
    ),
    "config lacks a key": (
        lambda f: edit_config(f, hidden_size=None) or _del_key(f, "hidden_size"),
        "config.json for qwen3: config.json lacks hidden_size",
    ),
    "missing weights": (
        lambda f: rewrite_weights(f, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
        r"missing weights: model.layers.1.mlp.up_proj.weight;",
    ),
    "unexpected weights": (
        lambda f: rewrite_weights(f, lambda w: w.update(extra=np.zeros(3, np.float32))),
        r"unexpected weights: extra;",
    ),
    "wrong shape": (
        lambda f: edit_config(f, intermediate_size=128),
        r"weight model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), the config says \(128, 64\)",
    ),
    "truncated safetensors": (_truncate, r"model.safetensors is truncated"),
    "shard missing from the index": (_drop_a_shard, r"lacks shards named in its index: model-00002-of-00002"),
    "foreign quantization": (
        lambda f: edit_config(f, quantization_config={"quant_method": "fp8"}),
        r"weights quantized with 'fp8' are not supported",
    ),
    "unsupported rope": (
        lambda f: edit_config(f, rope_scaling={"rope_type": "longrope"}),
        r"rope type 'longrope' is not supported",
    ),
}


def _del_key(folder, key):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(folder, case):
    breaks, message = BAD[case]
    breaks(folder)
    with pytest.raises(UserError, match=message) as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_a_file_instead_of_a_folder(folder):
    with pytest.raises(UserError, match="is a file; give the model's folder"):
        load_model(folder / "config.json")


def test_truncated_file_on_the_cli_exits_2_without_traceback(folder):
    _truncate(folder)
    out = run_cli(str(folder))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "truncated" in out.stderr


def test_the_package_exports_functions_not_their_modules():
    import importlib

    import mlx_qwen3

    for module in ("load", "generate"):
        importlib.import_module(f"mlx_qwen3.{module}")
    from mlx_qwen3 import ChatSession, load, stream_generate
    from mlx_qwen3.generate import generate  # mlx_qwen3.generate is the module (tests/test_cli.py)

    assert all(callable(f) and not isinstance(f, type(mlx_qwen3)) for f in (generate, load, stream_generate))
    assert ChatSession.__name__ == "ChatSession"


def test_a_string_boolean_is_refused_not_read_as_true(folder):
    edit_config(folder, tie_word_embeddings="false")  # bool("false") is True: the head would be dropped
    with pytest.raises(UserError, match="tie_word_embeddings must be a boolean \\(true or false\\), not 'false'"):
        load_model(folder)


def test_whole_floats_count_as_integers_and_integers_as_floats(folder):
    edit_config(folder, num_hidden_layers=2.0, rope_theta=10000)  # as some exporters write them
    model, _ = load_model(folder)
    assert model.args.num_hidden_layers == 2 and type(model.args.num_hidden_layers) is int
    assert model.args.rope_theta == 10000.0 and type(model.args.rope_theta) is float
    edit_config(folder, num_hidden_layers=2.5)
    with pytest.raises(UserError, match="num_hidden_layers must be an integer, not 2.5"):
        load_model(folder)


def test_a_config_whose_weights_could_not_exist_is_refused_at_once(folder):
    edit_config(folder, num_hidden_layers=1_000_000)  # built, it took minutes and gigabytes
    start = time.monotonic()
    with pytest.raises(UserError, match=r"describes [\d,]+ parameters \(at least [\d.]+ GB\), but the weights .* hold"):
        load_model(folder)
    assert time.monotonic() - start < 2


def test_a_tokenizer_past_the_embedding_is_refused(folder):
    """The real Qwen3 tokenizer (ids to 151,668) with a 256-row embedding: MLX would read past the table."""
    copy_tokenizer(folder)
    load_model(folder)  # the model alone is fine
    with pytest.raises(UserError, match="the tokenizer's ids reach 151668, but the model's embedding has 256 rows"):
        load(folder)


def test_symlinked_weights_are_followed(checkpoint, tmp_path):
    """The Hugging Face cache links each file from snapshots/<commit>/ to blobs/, old `--local-dir`
    downloads link into the cache, users link weights onto another disk: all of these load. (Only an
    index entry whose name leads out of the folder is refused: tests/test_broken_folders.py.)"""
    src, _ = checkpoint("qwen3_moe")
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-Tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    assert len(load_model(snapshot)[0].layers) == 3

    elsewhere = tmp_path / "other_disk" / "shard.safetensors"
    elsewhere.parent.mkdir()
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    shutil.copy(shard, elsewhere)
    shard.unlink()
    shard.symlink_to(elsewhere)
    assert len(load_model(snapshot)[0].layers) == 3


def test_a_list_of_named_chat_templates_loads(tmp_path):
    """tokenizer_config.json's [{"name", "template"}, ...] form: "default", or "tool_use" when tools are given."""
    folder = build_scripted(tmp_path, {})
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "plain {{ messages[0].content }}"},
                            {"name": "tool_use", "template": "tools {{ tools | length }} {{ messages[0].content }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load(folder)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "plain hi"
    assert tok.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools 1 hi"
    assert set(tok.chat_templates) == {"default", "tool_use"} and tok.chat_template == "plain {{ messages[0].content }}"
