"""The prompt cache on disk: a saved and loaded cache gives the logits of the one it was saved from (16-bit,
8/4-bit, under and past kv_start); a file for another model, KV setting or rope factor, a damaged one and a
failed save are one line and leave the file as it was; the CLI writes the prompt once and reuses it."""

import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from chain import build, successors
from checkpoints import random_mlx_model

from mlx_qwen3 import load, prompt_file
from mlx_qwen3.errors import UserError
from mlx_qwen3.decode import process_prompt
from mlx_qwen3.models.cache import CacheSetting, PromptCache
from mlx_qwen3.prompt_file import load_prompt_cache, model_identity, read_setting, save_prompt_cache

CONFIG = dict(model_type="qwen3", hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=256, max_position_embeddings=40960,
              rope_theta=1e6, tie_word_embeddings=False)


def random_model(seed: int = 0, **overrides):
    return random_mlx_model({**CONFIG, **overrides}, seed)


@pytest.fixture(scope="module")
def model():
    return random_model()


def processed(model, setting: CacheSetting, n: int = 200) -> PromptCache:
    ids = mx.random.randint(0, 256, (n,), key=mx.random.key(3))
    cache = PromptCache.new(model, setting)
    process_prompt(model, ids[None], cache.layers, chunk_size=64)
    cache.ids = ids.tolist()
    return cache


def continued(model, cache: PromptCache, n: int = 120) -> np.ndarray:
    """Logits of `n` more tokens fed through `cache`: 40 at once, then one at a time."""
    ids = mx.random.randint(0, 256, (1, n), key=mx.random.key(4))
    out = [model(ids[:, :40], cache=cache.layers)]
    out += [model(ids[:, i : i + 1], cache=cache.layers) for i in range(40, n)]
    return np.array(mx.concatenate(out, axis=1))


SETTINGS = [CacheSetting(rope_factor=1.0), CacheSetting(8, rope_factor=1.0), CacheSetting(4, rope_factor=1.0),
            CacheSetting(8, kv_start=100, rope_factor=1.0),
            CacheSetting(4, kv_start=250, rope_factor=1.0)]  # 200 positions: past its kv_start (quantized), then under it (16-bit)


@pytest.mark.parametrize("setting", SETTINGS, ids=["16", "8", "4", "8-start100", "4-start250"])
def test_a_loaded_cache_gives_the_logits_of_the_one_saved(model, tmp_path, setting):
    cache = processed(model, setting)
    file = tmp_path / "prompt.cache"
    save_prompt_cache(file, cache, model)
    loaded = load_prompt_cache(file, model, setting)
    assert loaded.ids == cache.ids and loaded.setting == cache.setting and loaded.consistent
    assert [type(c) for c in loaded.layers] == [type(c) for c in cache.layers]
    if setting.kv_start:  # the same side of kv_start as the saved layers: plain under it, quantized past it
        past = setting.kv_start < 200
        assert [c.quantized for c in loaded.layers] == [c.quantized for c in cache.layers] == [past] * 2
    # 120 more tokens cross kv_start 250 on the way: the loaded layers switch exactly as the saved ones do
    assert np.array_equal(continued(model, loaded), continued(model, cache))
    assert read_setting(file) == setting


def test_the_saved_cache_holds_only_its_positions(model, tmp_path):
    """A copy trimmed to the prompt is what is saved, not the preallocated buffer nor the reply."""
    cache = processed(model, CacheSetting(rope_factor=1.0))
    continued(model, cache, 50)  # a reply: the layers hold 250 positions, the copy 200
    cache.ids += [0] * 50
    save_prompt_cache(tmp_path / "f", cache.copy(200), model)
    loaded = load_prompt_cache(tmp_path / "f", model, CacheSetting(rope_factor=1.0))
    assert loaded.ids == cache.ids[:200] and all(c.keys.shape[2] == 200 for c in loaded.layers)


def test_the_identity_tells_models_apart_by_their_weights(model):
    assert model_identity(model) == model_identity(random_model())  # the same weights, built again
    assert model_identity(model) != model_identity(random_model(seed=1))  # the same shapes, other weights
    assert model_identity(model) != model_identity(random_model(rope_theta=1e4))  # the same weights, other config


# ---- refusals: one line, and nothing is changed ----

def refused(file, model, setting, *phrases):
    before = file.read_bytes()
    with pytest.raises(UserError) as e:
        load_prompt_cache(file, model, setting)
    message = str(e.value)
    assert "\n" not in message and all(p in message for p in phrases), message
    assert file.read_bytes() == before
    return message


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    file = tmp_path_factory.mktemp("saved") / "doc.cache"
    save_prompt_cache(file, processed(model, CacheSetting(8, rope_factor=1.0), 100), model)
    return file


def test_another_model_is_refused(saved):
    refused(saved, random_model(seed=1), CacheSetting(8), "was made for another model")


@pytest.mark.parametrize("setting,phrases", [
    (CacheSetting(), ["made with 8-bit KV; this run uses 16-bit KV", "run with --kv-bits 8"]),
    (CacheSetting(4), ["made with 8-bit KV; this run uses 4-bit KV", "--kv-bits 8"]),
    (CacheSetting(8, kv_start=64), ["this run uses 8-bit KV from position 64", "run with --kv-bits 8, or"]),
    (CacheSetting(8, rope_factor=2.0), ["made with rope factor 1; this run's context needs 2"]),
])
def test_another_setting_is_refused(model, saved, setting, phrases):
    refused(saved, model, setting, *phrases)


def test_a_file_of_a_larger_rope_factor_serves_a_shorter_context(model, tmp_path):
    file = tmp_path / "f"
    save_prompt_cache(file, processed(model, CacheSetting(None, 0, 2.0), 50), model)
    loaded = load_prompt_cache(file, model, CacheSetting(None, 0, 1.0))  # the cache keeps its factor
    assert loaded.setting.rope_factor == 2.0 and all(c.rope_factor == 2.0 for c in loaded.layers)
    refused(file, model, CacheSetting(None, 0, 4.0), "made with rope factor 2; this run's context needs 4")


def test_a_file_under_kv_start_is_refused_by_name_of_its_flags(model, tmp_path):
    file = tmp_path / "f"
    save_prompt_cache(file, processed(model, CacheSetting(4, kv_start=64), 10), model)
    refused(file, model, CacheSetting(), "made with 4-bit KV from position 64", "run with --kv-bits 4 --kv-start 64")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "weights", "empty", "other format"])
def test_a_damaged_file_or_another_kind_is_refused(model, saved, tmp_path, damage):
    file = tmp_path / "f"
    data = saved.read_bytes()
    if damage == "garbage":
        file.write_bytes(b"not a cache at all" * 100)
    elif damage == "truncated":
        file.write_bytes(data[: len(data) - 100])
    elif damage == "weights":  # a safetensors file, but model weights
        mx.save_safetensors(str(file), {"w": mx.zeros((2, 2))})
        os.replace(str(file) + ".safetensors", file)
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        mx.save_safetensors(str(file), {"ids": mx.zeros((2,), mx.int32)}, metadata={"format": "something 9"})
        os.replace(str(file) + ".safetensors", file)
    message = refused(file, model, CacheSetting(8), "is not a prompt cache file, or it is damaged",
                      "remove it to make a new one")
    assert damage != "truncated" or "truncated" in message


def test_a_directory_is_refused(model, tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        load_prompt_cache(tmp_path, model)


def test_a_failed_save_leaves_the_previous_file_whole(model, saved, tmp_path, monkeypatch):
    file = tmp_path / "doc.cache"
    file.write_bytes(saved.read_bytes())

    def full_disk(f, arrays, metadata):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_file.mx, "save_safetensors", full_disk)
    with pytest.raises(UserError, match="could not write .*No space left on device.*it is unchanged"):
        save_prompt_cache(file, processed(model, CacheSetting(8), 30), model)
    assert file.read_bytes() == saved.read_bytes() and os.listdir(tmp_path) == ["doc.cache"]
    monkeypatch.undo()
    assert load_prompt_cache(file, model, CacheSetting(8)).ids == load_prompt_cache(saved, model).ids


def test_a_save_into_a_missing_folder_is_one_line(model, tmp_path):
    with pytest.raises(UserError, match="could not write .*it is unchanged"):
        save_prompt_cache(tmp_path / "no" / "f", processed(model, CacheSetting(), 10), model)


def test_a_sharded_model_is_refused(model, saved, tmp_path, monkeypatch):
    class Two:
        def size(self):
            return 2

    cache = processed(model, CacheSetting(), 10)
    monkeypatch.setattr(model, "group", Two(), raising=False)
    for attempt in (lambda: save_prompt_cache(tmp_path / "f", cache, model), lambda: load_prompt_cache(saved, model)):
        with pytest.raises(UserError, match="split across 2 ranks: run without --prompt-cache-file"):
            attempt()
    assert not (tmp_path / "f").exists()


# ---- the CLI, end to end on a scripted model ----

def cli(*args, stdin=None):
    cmd = [sys.executable, "-m", "mlx_qwen3.generate", "--temp", "0", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def one_line(out, *phrases):
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert all(p in out.stderr for p in phrases), out.stderr


DOCUMENT = "Read this report carefully. " * 20


@pytest.mark.parametrize("kv", [[], ["--kv-bits", "8", "--kv-start", "40"]], ids=["16", "8-start40"])
def test_the_first_run_saves_the_prompt_and_later_runs_start_from_it(thinking_dir, tmp_path, kv):
    base = ["--model", str(thinking_dir), "--system", DOCUMENT, *kv]
    plain = cli(*base, "--prompt", "What is 2+2?")
    assert plain.returncode == 0 and "The answer is 4." in plain.stdout, plain.stderr
    file = tmp_path / "report.cache"
    first = cli(*base, "--prompt", "What is 2+2?", "--prompt-cache-file", str(file))
    assert first.returncode == 0 and first.stdout == plain.stdout, first.stderr
    n = int(re.search(r"saved the prompt's (\d+) tokens to (.*)\n", first.stderr).group(1))
    assert f"saved the prompt's {n} tokens to {file}\n" in first.stderr
    saved = file.read_bytes()
    assert len(load_prompt_cache(file, load(thinking_dir)[0]).ids) == n
    assert os.listdir(tmp_path) == ["report.cache"]

    again = cli(*base, "--prompt", "What is 2+2?", "--prompt-cache-file", str(file))
    assert again.returncode == 0 and again.stdout == plain.stdout, again.stderr
    assert f"{n - 1} of the prompt's {n} tokens came from {file}\n" in again.stderr  # the last is fed for its logits

    other = cli(*base, "--prompt", "And what is 3+3, please?", "--prompt-cache-file", str(file))
    assert other.returncode == 0 and "The answer is 4." in other.stdout, other.stderr
    reused, total = map(int, re.search(r"(\d+) of the prompt's (\d+) tokens came from", other.stderr).groups())
    assert 100 < reused < n < total  # the system prompt came from the file, the new question did not
    assert file.read_bytes() == saved  # a file is never rewritten


def test_a_chat_starts_from_the_file(thinking_dir, tmp_path):
    file = tmp_path / "f.cache"
    base = ["--model", str(thinking_dir), "--system", DOCUMENT]
    assert cli(*base, "--prompt", "What is 2+2?", "--prompt-cache-file", str(file)).returncode == 0
    out = cli(*base, "--chat", "--prompt-cache-file", str(file), stdin="What is 2+2?\nAnd 3+3?\n")
    assert out.returncode == 0 and out.stdout.count("The answer is 4.") == 2, out.stderr
    assert "the chat starts from the " in out.stderr and f"prompt tokens in {file}\n" in out.stderr


def test_refusals_are_one_line_and_leave_the_file(thinking_dir, tmp_path):
    file = tmp_path / "f.cache"
    base = ["--model", str(thinking_dir), "--prompt", "What is 2+2?", "--prompt-cache-file", str(file)]
    assert cli(*base).returncode == 0
    saved = file.read_bytes()
    one_line(cli(*base, "--kv-bits", "8"), "made with 16-bit KV; this run uses 8-bit KV: run with no --kv-bits")
    other = build(tmp_path / "other", successors([1, 2]), seed=1)
    one_line(cli(*base[2:], "--model", str(other)), "the prompt cache file was made for another model")
    one_line(cli("--model", str(thinking_dir), "--chat", "--prompt-cache-file", str(tmp_path / "none")),
             "does not exist: --chat starts from a prompt cache file made by a --prompt run")
    assert file.read_bytes() == saved
    file.write_bytes(saved[:-10])
    one_line(cli(*base), "is not a prompt cache file, or it is damaged (it is truncated")
    assert file.read_bytes() == saved[:-10]
    one_line(cli(*base[:-1], str(tmp_path / "no" / "f")), "is not a folder: give a --prompt-cache-file in an existing")
    one_line(cli(*base[:-1], str(tmp_path)), "is not a file; give a prompt cache file")
    assert sorted(os.listdir(tmp_path)) == ["f.cache", "other"]


@pytest.mark.parametrize("change", ["ids", "shape", "dtype", "missing", "extra"])
def test_arrays_that_do_not_fit_the_model_are_refused(model, saved, tmp_path, change):
    """A file whose header is whole and whose metadata is this model's, but whose arrays are not what its
    attention takes: refused on loading, never a crash in the middle of a generation."""
    arrays, meta = mx.load(str(saved), format="safetensors", return_metadata=True)
    if change == "ids":
        arrays["ids"] = mx.full((100,), 300, mx.int32)  # past the 256-row vocabulary
    elif change == "shape":
        arrays["1.keys.1"] = mx.concatenate([arrays["1.keys.1"]] * 2, axis=-1)
    elif change == "dtype":
        arrays["0.values.0"] = arrays["0.values.0"].astype(mx.float32)
    elif change == "missing":
        del arrays["1.values.2"]
    else:
        arrays["2.keys"] = arrays["ids"]
    file = tmp_path / "f.safetensors"
    mx.save_safetensors(str(file), arrays, metadata=meta)
    refused(file, model, CacheSetting(8), "is not a prompt cache file, or it is damaged")
