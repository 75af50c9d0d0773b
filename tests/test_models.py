"""Our models against transformers (the reference) and mlx-lm (the peer), on tiny random checkpoints."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import SPECS, prompt, reference_logits, rel_err

from mlx_qwen3 import load_model
from mlx_qwen3.models import qwen3_moe
from mlx_qwen3.decode import process_prompt
from mlx_qwen3.models.cache import KVCache, make_cache

TOL = 1e-4  # fp32, relative to the largest logit


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """loaded(name) -> (our model, transformers model, folder)."""
    made = {}

    def get(name):
        if name not in made:
            folder, hf = checkpoint(name)
            made[name] = (load_model(folder)[0], hf, folder)
        return made[name]

    return get


@pytest.mark.parametrize("name", SPECS)
def test_logits_equal_transformers(loaded, name):
    model, hf, _ = loaded(name)
    ids = prompt(2, 80)  # longer than YaRN's original_max_position_embeddings (32)
    out = model(mx.array(ids))
    assert out.shape == (2, 80, 256)
    assert rel_err(out, reference_logits(hf, ids)) < TOL


@pytest.mark.parametrize("name", SPECS)
def test_prompt_then_decode_equals_one_pass(loaded, name, monkeypatch):
    monkeypatch.setattr(KVCache, "step", 16)  # make the cache grow several times
    model, _, _ = loaded(name)
    ids = mx.array(prompt(2, 80, seed=2))
    full = model(ids)
    cache = make_cache(model)
    steps = [process_prompt(model, ids[:, :70], cache, chunk_size=24)]  # chunks of 24, 24, 21, then 1
    for t in range(70, 79):
        steps.append(model(ids[:, t : t + 1], cache=cache)[:, -1])
    assert cache[0].offset == 79
    assert rel_err(mx.stack(steps, axis=1), full[:, 69:79]) < TOL


def test_cache_trim_rewinds(loaded):
    model, _, _ = loaded("qwen3")
    ids = mx.array(prompt(1, 30, seed=4))
    cache = make_cache(model)
    process_prompt(model, ids[:, :20], cache)
    assert [c.trim(5) for c in cache] == [5] * len(cache)
    again = process_prompt(model, ids[:, 15:30], cache)
    assert rel_err(again, model(ids)[:, -1]) < TOL


def test_cache_copy_shares_a_prefix_and_leaves_the_original_whole(loaded):
    model, _, _ = loaded("qwen3")
    a = prompt(1, 30, seed=4)
    b = np.concatenate([a[:, :12], prompt(1, 18, seed=5)], axis=1)  # shares a's first 12 tokens
    cache = make_cache(model)
    process_prompt(model, mx.array(a[:, :20]), cache)
    copied = [c.copy(12) for c in cache]
    assert rel_err(process_prompt(model, mx.array(b[:, 12:]), copied), model(mx.array(b))[:, -1]) < TOL
    assert rel_err(process_prompt(model, mx.array(a[:, 20:]), cache), model(mx.array(a))[:, -1]) < TOL


@pytest.mark.parametrize("name", SPECS)
def test_batch_rows_are_independent(loaded, name):
    model, _, _ = loaded(name)
    ids = mx.array(prompt(2, 20, seed=3))
    both = model(ids)
    for b in range(2):
        assert rel_err(both[b], model(ids[b : b + 1])[0]) < TOL


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "qwen2"])
def test_float16_runs_close_to_float32(loaded, name):
    if name == "qwen3_moe" and mx.default_device() == mx.cpu:
        pytest.skip("MLX's CPU gather_mm computes only float32 (Metal does float16 and bfloat16)")
    _, hf, folder = loaded(name)
    model, _ = load_model(folder, rope="config")  # the reference's YaRN is static
    model.set_dtype(mx.float16)
    ids = prompt(1, 40)
    out = model(mx.array(ids))
    assert out.dtype == mx.float16
    assert rel_err(out, reference_logits(hf, ids)) < 2e-2


# mlx-lm's qwen3_moe has no YaRN and reads only the Hub's config spelling, so it sits out qwen3_moe_yarn.
@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied_yarn", "qwen3_moe", "qwen2"])
def test_logits_equal_mlx_lm(loaded, name):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _, folder = loaded(name)
    peer, _ = mlx_lm_load_model(folder)
    ids = mx.array(prompt(2, 80, seed=5))
    assert rel_err(model(ids), peer(ids)) < TOL


def _random_moe(num_experts=64):
    args = qwen3_moe.ModelArgs.from_dict(dict(
        model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=256, num_experts=num_experts,
        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
    ))
    mx.random.seed(0)
    model = qwen3_moe.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("length", [3, 40])  # 40 tokens x 2 experts takes the sorted gather path
def test_moe_reads_only_the_selected_experts(length):
    model = _random_moe()
    blocks = [layer.mlp for layer in model.layers]
    chosen = {}
    for i, block in enumerate(blocks):
        def recording(x, block=block, i=i):
            inds, scores = type(block).route(block, x)
            chosen[i] = set(np.array(inds).flatten().tolist())
            return inds, scores
        block.route = recording

    ids = mx.array(prompt(1, length, vocab=64))
    before = model(ids)
    mx.eval(before)

    def poison(i, experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(blocks[i].switch_mlp, proj)
            w = np.array(lin.weight)
            w[list(experts)] = np.nan
            lin.weight = mx.array(w)

    for i in range(len(blocks)):
        unused = set(range(64)) - chosen[i]
        assert unused, "every expert was chosen; the test needs a shorter prompt"
        poison(i, unused)
    after = model(ids)
    assert np.isfinite(np.array(after)).all()
    assert rel_err(after, before) == 0.0

    poison(0, {min(chosen[0])})  # the control: a chosen expert's NaN must reach the logits
    assert np.isnan(np.array(model(ids))).any()
