"""The Metal kernels, executed on the CPU from the source MLX generates, against float64 numpy."""

import json
import logging
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import metal_executor as ex
from mlx_qwen3 import kernel_choices, kernels
from requires import requires

pytestmark = requires(ex.compiler() is not None, "needs a C++ compiler (clang++ or g++) to run Metal source")

EPS = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11}  # half an ulp, relative: the output's rounding


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def qmatvec64(wq, scales, biases, group_size, bits, x) -> np.ndarray:
    """W x in float64 for one (N, K*bits/32) packed matrix, unpacking MLX's affine layout in numpy:
    y[n] = sum over groups g of scale[n, g] * (q[n, g] . x[g]) + bias[n, g] * sum(x[g])."""
    words = np.array(wq)  # uint32: every shift below is under 32
    per = 32 // bits
    q = (words[..., None] >> (bits * np.arange(per, dtype=np.uint32))) & np.uint32((1 << bits) - 1)
    N, G = words.shape[0], np.array(scales.shape)[-1]
    q = q.reshape(N, G, group_size).astype(np.float64)
    xg = np.asarray(x, np.float64).reshape(G, group_size)
    return (f64(scales) * np.einsum("ngk,gk->ng", q, xg) + f64(biases) * xg.sum(-1)).sum(-1)


def quantized(shape, dtype, group_size, bits, seed):
    """Random packed weights in MLX's affine layout, scaled as trained ones are (outputs of order one).
    Drawn directly as words, scales and biases: quantizing random floats is slow on this CPU."""
    rng = np.random.default_rng(seed)
    *lead, K = shape
    words = rng.integers(0, 2**32, (*lead, K * bits // 32), dtype=np.uint64).astype(np.uint32)
    top = 2**bits - 1
    step = 2.0 / (top * K**0.5)
    scales = step * rng.uniform(0.5, 1.5, (*lead, K // group_size))
    biases = -scales * top / 2 + rng.normal(0, 0.1 * step, scales.shape)
    return mx.array(words), mx.array(scales, dtype).astype(dtype), mx.array(biases).astype(dtype), group_size, bits


def assert_close(got: mx.array, ref: np.ndarray, dtype):
    got = f64(got)
    assert np.isfinite(got).all(), "the kernel left outputs unwritten (poison) or made NaN"
    tol = EPS[dtype] * np.abs(ref) + 1e-4 * np.abs(ref).max()
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off; worst {np.abs(got - ref).max():.3g}"


@pytest.fixture
def on_cpu(monkeypatch):
    """Route kernel launches to the CPU executor; returns the list of launches made."""
    launches = []

    def launch(kernel, **kwargs):
        launches.append(kernel.name)
        return ex.launch(kernel, **kwargs)

    monkeypatch.setattr(kernels, "launch", launch)
    return launches


# (K, N): the Qwen3 hidden sizes and expert FFN sizes as inputs, and odd ones. A simdgroup takes 512
# inputs a step, then a tail 256 a step: 2048 and 5120 are whole steps only, 768 one step and a
# 256 tail, 896 one step and a 384 tail (two tail steps for half the lanes), 96 and 160 a tail only
# (some lanes idle). N = 13, 9, 1, 5, 7 leave rows of the last threadgroup past the end (clamped).
QMV_SHAPES = [(1024, 24), (2048, 8), (4096, 16), (5120, 9), (768, 40), (1536, 12), (96, 13), (160, 1), (64, 1000),
              (896, 7), (384, 5)]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_qmv(on_cpu, dtype, bits, group_size):
    for i, (K, N) in enumerate(QMV_SHAPES):
        if K % group_size:
            continue
        w = quantized((N, K), dtype, group_size, bits, seed=i)
        x = mx.random.normal((K,), key=mx.random.key(100 + i)).astype(dtype)
        assert_close(kernels.qmv_custom(x, *w), qmatvec64(*w, f64(x)), dtype)


def expert64(proj, e, v) -> np.ndarray:
    w, sc, b, group_size, bits = proj
    return qmatvec64(w[e], sc[e], b[e], group_size, bits, v)


def gate_up_reference(x, ids, gate, up) -> np.ndarray:
    """float64 h of the selected experts, each expert computed once (ids repeat; this float64 reference
    is most of these tests' time)."""
    ids = np.array(ids).astype(int).tolist()
    g = {e: expert64(gate, e, f64(x)) for e in set(ids)}
    u = {e: expert64(up, e, f64(x)) for e in set(ids)}
    return np.stack([g[e] / (1 + np.exp(-g[e])) * u[e] for e in ids])


def moe_reference(x, ids, scores, gate, up, down, h=None):
    """float64 (h, y) of the selected experts; y from `h` when given (to check the down kernel alone; h is
    then not computed: None), else from the float64 h rounded to x's dtype, as the gate/up kernel writes it."""
    h_ref = gate_up_reference(x, ids, gate, up) if h is None else None
    h = f64(h) if h is not None else f64(mx.array(h_ref.astype(np.float32)).astype(x.dtype))
    y = np.stack([expert64(down, e, h[j]) for j, e in enumerate(np.array(ids).astype(int).tolist())])
    return h_ref, (f64(scores)[:, None] * y).sum(0)


# (D hidden, I expert FFN, E experts, expert ids): Qwen3-30B-A3B / 235B-A22B shapes, repeated and
# adjacent ids, and odd sizes
MOE_CASES = [
    (2048, 768, 128, [0, 1, 2, 64, 64, 126, 127, 127]),
    (4096, 1536, 8, [3, 3, 4, 5, 0, 7, 6, 6]),
    (5120, 1536, 4, [1, 1, 1, 1, 2, 2, 3, 0]),
    (1024, 768, 9, [8, 7, 6]),
    (384, 128, 5, [4, 0, 4]),
    (96, 64, 5, [4, 0, 4]),
]


# every (bits, group size, dtype) on the small cases; the large ones at one setting per dtype
MOE_RUNS = [(case, dtype, bits, gs) for case in (3, 4) for dtype in (mx.bfloat16, mx.float16)
            for bits, gs in ((4, 32), (4, 64), (8, 64), (8, 128), (4, 128))]
MOE_RUNS += [(5, dtype, bits, 32) for dtype in (mx.bfloat16, mx.float16) for bits in (4, 8)]
MOE_RUNS += [(0, mx.bfloat16, 4, 64), (1, mx.bfloat16, 4, 64), (1, mx.float16, 8, 128),
             (2, mx.float16, 4, 128), (2, mx.bfloat16, 8, 32)]


@pytest.mark.parametrize("case,dtype,bits,group_size", MOE_RUNS)
def test_moe_gate_up_and_down(on_cpu, case, dtype, bits, group_size):
    D, I, E, ids = MOE_CASES[case]
    gate, up = quantized((E, I, D), dtype, group_size, bits, 1), quantized((E, I, D), dtype, group_size, bits, 2)
    down = quantized((E, D, I), dtype, group_size, bits, 3)
    x = mx.random.normal((D,), key=mx.random.key(4)).astype(dtype)
    ids = mx.array(ids, dtype=mx.uint32)
    scores = mx.softmax(mx.random.normal((ids.size,), key=mx.random.key(5))).astype(dtype)

    h, bad = kernels.moe_gate_up(x, ids, gate, up)
    h_ref = gate_up_reference(x, ids, gate, up)
    assert_close(h, h_ref, dtype)
    assert bad.tolist() == [0]
    # down + combine, from the kernel's own h (so the check is of this kernel alone)
    y = kernels.moe_down(h, ids, scores, down)
    assert_close(y, moe_reference(x, ids, scores, gate, up, down, h=h)[1], dtype)


def quantized_moe(E, D, I, dtype, group_size, bits):
    """gate, up (E, I, D) and down (E, D, I) projections."""
    return (quantized((E, I, D), dtype, group_size, bits, 1), quantized((E, I, D), dtype, group_size, bits, 2),
            quantized((E, D, I), dtype, group_size, bits, 3))


def down_reference(h, ids, scores, down):
    w, sc, b, group_size, bits = down
    ids = np.array(ids).astype(int).tolist()
    return sum(f64(scores)[j] * qmatvec64(w[e], sc[e], b[e], group_size, bits, f64(h)[j]) for j, e in enumerate(ids))


@pytest.mark.parametrize("dtype,bits,group_size,sanitize", [(mx.bfloat16, 4, 32, True), (mx.float16, 8, 64, False)])
def test_moe_row_counts_that_fill_no_threadgroup(monkeypatch, dtype, bits, group_size, sanitize):
    """gate/up with I = 13 rows (a threadgroup has 8), down with D = 37 rows (a threadgroup has 4) at
    k = 8 (256-thread threadgroups): the rows past the end are read clamped and never stored (ASan)."""
    monkeypatch.setattr(kernels, "launch", lambda k, **kw: ex.launch(k, sanitize=sanitize, **kw))
    E, ids = 10, mx.array([9, 0, 3, 3, 7, 1, 9, 2], dtype=mx.uint32)
    x = mx.random.normal((192,), key=mx.random.key(4)).astype(dtype)
    gate, up, _ = quantized_moe(E, 192, 13, dtype, group_size, bits)
    h, bad = kernels.moe_gate_up(x, ids, gate, up)
    g = np.stack([qmatvec64(*[a[e] for a in gate[:3]], group_size, bits, f64(x)) for e in np.array(ids).tolist()])
    u = np.stack([qmatvec64(*[a[e] for a in up[:3]], group_size, bits, f64(x)) for e in np.array(ids).tolist()])
    assert_close(h, g / (1 + np.exp(-g)) * u, dtype)
    assert bad.tolist() == [0]

    down = quantized((E, 37, 128), dtype, group_size, bits, 3)
    h = mx.random.normal((8, 128), key=mx.random.key(6)).astype(dtype)
    scores = mx.softmax(mx.random.normal((8,), key=mx.random.key(5))).astype(dtype)
    assert_close(kernels.moe_down(h, ids, scores, down), down_reference(h, ids, scores, down), dtype)


def test_out_of_range_expert_ids_read_the_last_expert_and_are_counted(monkeypatch):
    """Under ASan (an unclamped id reads past the weights); the output is the one with those ids as E - 1."""
    monkeypatch.setattr(kernels, "launch", lambda k, **kw: ex.launch(k, sanitize=True, **kw))
    E, dtype = 5, mx.bfloat16
    gate, up, down = quantized_moe(E, 96, 64, dtype, 32, 4)
    x = mx.random.normal((96,), key=mx.random.key(4)).astype(dtype)
    scores = mx.softmax(mx.random.normal((8,), key=mx.random.key(5))).astype(dtype)
    ids = mx.array([5, 0, 7, 0xFFFFFFFF, 4, 2, 1 << 31, 1], dtype=mx.uint32)
    clamped = mx.minimum(ids, E - 1)
    h, bad = kernels.moe_gate_up(x, ids, gate, up)
    h_ok, bad_ok = kernels.moe_gate_up(x, clamped, gate, up)
    assert bad.tolist() == [4] and bad_ok.tolist() == [0]
    assert mx.array_equal(h, h_ok)
    y = kernels.moe_down(h, ids, scores, down)
    assert mx.array_equal(y, kernels.moe_down(h, clamped, scores, down))
    assert_close(y, moe_reference(x, clamped, scores, gate, up, down, h=h)[1], dtype)


@pytest.mark.parametrize("name", ["qmv", "moe", "moe_down"])
def test_every_thread_order_gives_the_same_bits(monkeypatch, name):
    results = []
    for order in ex.ORDERS:
        monkeypatch.setattr(kernels, "launch", lambda k, order=order, **kw: ex.launch(k, order=order, seed=7, **kw))
        if name == "qmv":
            w = quantized((13, 896), mx.bfloat16, 32, 4, 0)
            out = kernels.qmv_custom(mx.random.normal((896,), key=mx.random.key(1)).astype(mx.bfloat16), *w)
        elif name == "moe":
            projs = quantized_moe(5, 96, 64, mx.float16, 32, 8)
            x = mx.random.normal((96,), key=mx.random.key(1)).astype(mx.float16)
            ids = mx.array([4, 0, 4], dtype=mx.uint32)
            out = kernels.moe_custom(x, ids, mx.array([0.5, 0.3, 0.2], dtype=mx.float16), *projs)
        else:  # k = 8: 256-thread threadgroups meet at the barrier; rows 37-39 (the last threadgroup) are past D
            down = quantized((10, 37, 128), mx.bfloat16, 64, 4, 3)
            h = mx.random.normal((8, 128), key=mx.random.key(6)).astype(mx.bfloat16)
            scores = mx.softmax(mx.random.normal((8,), key=mx.random.key(5))).astype(mx.bfloat16)
            out = kernels.moe_down(h, mx.array([9, 0, 3, 3, 7, 1, 9, 2], dtype=mx.uint32), scores, down)
        results.append(np.array(out.astype(mx.float32)))
    assert np.isfinite(results[0]).all()
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype,bits,group_size", [(mx.bfloat16, 4, 32), (mx.float16, 8, 128)])
def test_address_sanitizer_finds_no_out_of_bounds_access(monkeypatch, dtype, bits, group_size):
    """ASan and misaligned-access checks: K = 896 is a whole step and a 384 tail (which half the lanes
    take twice), 13 rows leave three clamped: every kind of load, at 4 and 8 bits."""
    K = 896
    monkeypatch.setattr(kernels, "launch", lambda k, **kw: ex.launch(k, sanitize=True, **kw))
    w = quantized((13, K), dtype, group_size, bits, 0)  # rows that fill no threadgroup evenly
    x = mx.random.normal((K,), key=mx.random.key(1)).astype(dtype)
    assert_close(kernels.qmv_custom(x, *w), qmatvec64(*w, f64(x)), dtype)
    if bits == 4:
        projs = quantized_moe(5, 96, 64, dtype, 32, 8)
        ids, scores = mx.array([4, 0, 4], dtype=mx.uint32), mx.array([0.5, 0.3, 0.2], dtype=dtype)
        x = mx.random.normal((96,), key=mx.random.key(2)).astype(dtype)
        assert_close(kernels.moe_custom(x, ids, scores, *projs), moe_reference(x, ids, scores, *projs)[1], dtype)


# ---- the executor itself: a missing barrier, an overrun and an unwritten output must show ----

SHIFT = """
    uint i = thread_position_in_threadgroup.x;
    threadgroup float buf[64];
    buf[i] = inp[thread_position_in_grid.x];
    {barrier}
    out[thread_position_in_grid.x] = buf[(i + 1) % 64];
"""


def _shift(barrier: bool, order: str):
    body = SHIFT.format(barrier="threadgroup_barrier(mem_flags::mem_threadgroup);" if barrier else "")
    k = mx.fast.metal_kernel(name=f"shift{int(barrier)}", input_names=["inp"], output_names=["out"], source=body)
    x = mx.arange(128, dtype=mx.float32)
    return np.array(ex.run(k, [x], template=[], grid=(128, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(128,)],
                           output_dtypes=[mx.float32], order=order, seed=3, input_names=["inp"])[0])


def test_executor_gives_barriers_their_meaning():
    want = np.concatenate([np.roll(np.arange(64), -1), 64 + np.roll(np.arange(64), -1)])
    for order in ex.ORDERS:
        assert np.array_equal(_shift(True, order), want)
    # without the barrier, some order reads a neighbour's slot before it is written: poison
    assert any(not np.array_equal(_shift(False, order), want) for order in ex.ORDERS)


def test_executor_reports_an_overrun_under_asan():
    body = "out[thread_position_in_grid.x] = inp[thread_position_in_grid.x + 1];"
    k = mx.fast.metal_kernel(name="overrun", input_names=["inp"], output_names=["out"], source=body)
    x = mx.zeros((32,))
    with pytest.raises(RuntimeError, match="AddressSanitizer"):
        ex.run(k, [x], template=[], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
               output_dtypes=[mx.float32], sanitize=True, input_names=["inp"])


def test_executor_reports_a_misaligned_vector_load_under_asan():
    # buffers start 16-byte aligned (the kernels' precondition holds here); a uint4 one word in does not
    body = "uint i = thread_position_in_grid.x; out[i] = (*(const device uint4*)(inp + off[0] + 4 * i)).y;"
    k = mx.fast.metal_kernel(name="vload", input_names=["inp", "off"], output_names=["out"], source=body)

    def run(off):
        inputs = [mx.arange(4 * 32 + 4, dtype=mx.uint32), mx.array([off], dtype=mx.uint32)]
        return ex.run(k, inputs, template=[], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
                      output_dtypes=[mx.uint32], sanitize=True, input_names=["inp", "off"])[0]

    assert run(0).tolist() == list(range(1, 128, 4))
    with pytest.raises(RuntimeError, match="misaligned address"):
        run(1)


def test_executor_shows_unwritten_outputs_and_simd_sum():
    body = """
    float s = simd_sum(inp[thread_position_in_grid.x]);
    if (thread_index_in_simdgroup == 0) out[simdgroup_index_in_threadgroup] = s;
"""
    k = mx.fast.metal_kernel(name="sums", input_names=["inp"], output_names=["out"], source=body)
    out = ex.run(k, [mx.arange(64, dtype=mx.float32)], template=[], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                 output_shapes=[(3,)], output_dtypes=[mx.float32], input_names=["inp"])[0]
    got = np.array(out)
    assert got[:2].tolist() == [sum(range(32)), sum(range(32, 64))] and np.isnan(got[2])


# ---- dispatch ----

@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch, tmp_path):
    """Each test starts with no choices, nothing disabled, and its own cache folder, and leaves
    nothing learnt behind; the executor copies every buffer into its own allocation, so the weights
    count as aligned there."""
    monkeypatch.setattr(kernels, "address", lambda a: 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_QWEN3_KERNELS", raising=False)
    kernels.forget()
    yield
    kernels.forget()


def choose(custom: bool):
    """A stand-in for kernels.measure that launches nothing and returns a fixed verdict."""
    def measure(custom_op, builtin_op, **kw):
        return {"custom_us": 10.0 if custom else 30.0, "builtin_us": 20.0, "custom": custom}

    return measure


def _tiny_moe(dtype=mx.bfloat16, experts=8, k=3):
    from mlx_qwen3.models import qwen3_moe

    args = qwen3_moe.ModelArgs.from_dict(dict(
        model_type="qwen3_moe", vocab_size=256, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-6,
        max_position_embeddings=256, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=64,
        norm_topk_prob=True, mlp_only_layers=[1]))
    mx.random.seed(0)
    model = qwen3_moe.Model(args)
    import mlx.nn as nn

    nn.quantize(model, 32, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("mlp.gate"))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _decode_logits(model):
    from mlx_qwen3.decode import process_prompt
    from mlx_qwen3.models.cache import make_cache

    cache = make_cache(model)
    process_prompt(model, mx.array([[5, 17, 99, 3]]), cache)
    return model(mx.array([[42]]), cache=cache)[0, -1]


def test_a_whole_moe_decode_step_with_the_kernels_equals_the_twins(on_cpu, monkeypatch):
    model = _tiny_moe()
    kernels.set_mode(model, "builtin")
    twins = _decode_logits(model)
    assert on_cpu == []
    kernels.set_mode(model, "auto")
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "measure", choose(custom=True))
    custom = _decode_logits(model)
    kernels.set_mode(model, "builtin")
    model.set_dtype(mx.float32)  # the same quantized weights, float32 activations: the yardstick
    exact = _decode_logits(model)
    # the dense projections, lm_head and both MoE kernels ran here, after their self-checks
    assert {"qmv", "moe_gate_up", "moe_down"} <= set(on_cpu)

    def err(a):
        return float(mx.abs(a.astype(mx.float32) - exact).max() / mx.abs(exact).max())

    print(f"relative error against float32: kernels {err(custom):.4f}, twins {err(twins):.4f}")
    # bf16 rounds differently along the two paths; the kernels are no further from float32 than the twins
    assert err(custom) < 0.05 and err(twins) < 0.05
    assert err(custom) <= 1.5 * err(twins)


@pytest.mark.parametrize("experts,k", [(8, 8), (6, 3)])
def test_the_self_check_launches_the_production_kernel(monkeypatch, experts, k):
    """The check must compile what production runs: the same kernel name, template arguments, k,
    dtypes and buffer kinds (MLX passes inputs under 8 elements as `constant`, under another name)."""
    launches = []

    def record(kernel, **kw):
        launches.append((kernel, kw))
        return ex.launch(kernel, **kw)

    monkeypatch.setattr(kernels, "launch", record)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "measure", choose(custom=True))
    model = _tiny_moe(experts=experts, k=k)
    layer = model.layers[0].mlp
    x = mx.random.normal((1, 1, 128), key=mx.random.key(3)).astype(mx.bfloat16)
    inds = mx.argpartition(-layer.gate(x), kth=k - 1, axis=-1)[..., :k]
    scores = mx.softmax(mx.take_along_axis(layer.gate(x), inds, axis=-1), axis=-1)
    kernels.sparse_moe(layer.switch_mlp, x, inds, scores)
    kernels.quantized_linear(model.layers[0].self_attn.q_proj, x)
    names = [kern.name for kern, _ in launches]
    # check (gate_up, down), production (gate_up, down); check (qmv), production (qmv)
    assert names == ["moe_gate_up", "moe_down", "moe_gate_up", "moe_down", "qmv", "qmv"]

    def source(kern, kw):
        rest = {n: kw[n] for n in ("template", "grid", "threadgroup", "output_shapes", "output_dtypes")}
        return ex.generated_source(kern.fn, kw["inputs"], **rest)

    for check, production in [(0, 2), (1, 3), (4, 5)]:
        (kern, kw_check), (_, kw_prod) = launches[check], launches[production]
        assert source(kern, kw_check) == source(kern, kw_prod)
        assert kw_check["threadgroup"] == kw_prod["threadgroup"]  # the device's thread limit is per pipeline
        assert kw_check["template"] == kw_prod["template"]
    # the check ran small: fewer experts or rows than production
    assert launches[0][1]["inputs"][2].shape[0] < experts or experts <= 4
    assert launches[4][1]["inputs"][1].shape[0] < launches[5][1]["inputs"][1].shape[0]


def test_a_failing_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    def broken(kernel, **kwargs):
        raise RuntimeError("Unable to build metal library from source")

    monkeypatch.setattr(kernels, "launch", broken)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    model = _tiny_moe()
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        first = _decode_logits(model)
        second = _decode_logits(model)
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "qmv" in w]) == 1 and len([w for w in warnings if "moe" in w]) == 1
    assert "Unable to build metal library" in warnings[0]
    kernels.set_mode(model, "builtin")
    assert mx.array_equal(first, _decode_logits(model)) and mx.array_equal(first, second)


def test_a_launch_that_raises_after_its_check_falls_back_with_one_warning(on_cpu, monkeypatch, caplog):
    real = kernels.launch
    checked = set()

    def fails_after_the_check(kernel, **kwargs):
        if kernel.name in checked:
            raise ValueError("Thread group size (256) is greater than the maximum allowed threads per threadgroup")
        checked.add(kernel.name)
        return real(kernel, **kwargs)

    monkeypatch.setattr(kernels, "launch", fails_after_the_check)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "measure", choose(custom=True))
    model = _tiny_moe()
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        got = [_decode_logits(model) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "raised at launch" in w]) == 2, warnings  # qmv once, moe once
    assert set(kernels.disabled()) == {"qmv", "moe"}
    kernels.set_mode(model, "builtin")
    want = _decode_logits(model)
    assert all(mx.array_equal(g, want) for g in got)
    # forced custom: the error is the user's to see
    kernels.set_mode(model, "custom")
    kernels.forget()
    with pytest.raises(ValueError, match="Thread group size"):
        _decode_logits(model)


def test_a_kernel_that_fails_at_the_real_shape_while_timed_falls_back(on_cpu, monkeypatch, caplog):
    real = kernels.launch

    def only_small(kernel, **kwargs):
        if kwargs["inputs"][1].shape[0] > 8:  # the check's 8 rows pass, the layer's 16 do not
            raise ValueError("Unable to allocate threadgroup memory")
        return real(kernel, **kwargs)

    monkeypatch.setattr(kernels, "launch", only_small)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    w = quantized((16, 64), mx.bfloat16, 32, 4, 0)
    x = mx.random.normal((1, 64), key=mx.random.key(1)).astype(mx.bfloat16)
    layer = nn_quantized(w)
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        y = kernels.quantized_linear(layer, x)
    assert "while being timed" in caplog.text and "qmv" in kernels.disabled()
    kernels.set_mode(layer, "builtin")
    assert mx.array_equal(y, kernels.quantized_linear(layer, x))
    assert not kernels.store().path.exists()  # nothing stored: a later run tries again


def test_a_wrong_kernel_is_caught_by_its_self_check(on_cpu, monkeypatch, caplog):
    real = kernels.launch

    def wrong(kernel, **kwargs):
        return [o * 1.5 for o in real(kernel, **kwargs)]

    monkeypatch.setattr(kernels, "launch", wrong)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    w = quantized((8, 64), mx.bfloat16, 32, 4, 0)
    layer = nn_quantized(w)
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        kernels.quantized_linear(layer, mx.ones((1, 1, 64), dtype=mx.bfloat16))
    assert "failed its self-check" in caplog.text and "relative error" in caplog.text
    assert "qmv" in kernels.disabled()


def nn_quantized(w):
    """A QuantizedLinear holding the packed (weight, scales, biases, group_size, bits) w."""
    import mlx.nn as nn

    layer = nn.QuantizedLinear(w[0].shape[1] * 32 // w[4], w[0].shape[0], bias=False, group_size=w[3], bits=w[4])
    layer.update({"weight": w[0], "scales": w[1], "biases": w[2]})
    return layer


def test_the_measured_choice_is_used_and_stored(on_cpu, monkeypatch):
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    layer = nn_quantized(quantized((16, 64), mx.bfloat16, 32, 4, 0))
    x = mx.random.normal((1, 64), key=mx.random.key(1)).astype(mx.bfloat16)
    kernels.set_mode(layer, "builtin")
    want = kernels.quantized_linear(layer, x)

    monkeypatch.setattr(kernels, "measure", choose(custom=False))
    kernels.set_mode(layer, "auto")
    assert mx.array_equal(kernels.quantized_linear(layer, x), want)
    assert on_cpu == ["qmv"]  # the self-check ran; production took the built-in, which measured faster
    stored = json.loads(kernels.store().path.read_text())
    assert stored["machine"] == kernel_choices.machine(kernels.SOURCES)
    assert list(stored["choices"].values()) == [{"custom_us": 30.0, "builtin_us": 20.0, "custom": False}]
    assert kernels.store().path.parent == Path(os.environ["XDG_CACHE_HOME"]) / "mlx_qwen3"

    # a later process: the stored choice is taken as it is (no timing) and a built-in needs no check
    def never(*a, **kw):
        raise AssertionError("measured again")

    kernels.forget()
    monkeypatch.setattr(kernels, "measure", never)
    on_cpu.clear()
    kernels.quantized_linear(layer, x)
    assert on_cpu == []

    # where the custom kernel measured faster, it runs (checked again in each process)
    path = kernels.store().path
    data = json.loads(path.read_text())
    data["choices"] = {k: {**c, "custom": True} for k, c in data["choices"].items()}
    path.write_text(json.dumps(data))
    kernels.forget()
    y = kernels.quantized_linear(layer, x)
    assert on_cpu == ["qmv", "qmv"]
    assert_close(y.reshape(-1), qmatvec64(*quantized((16, 64), mx.bfloat16, 32, 4, 0), f64(x.reshape(-1))),
                 mx.bfloat16)


def test_another_machine_or_version_measures_again(monkeypatch):
    a = kernel_choices.ChoiceStore(Path(os.environ["XDG_CACHE_HOME"]), {"chip": "Apple M2", "mlx": "0.32.4"})
    a.put("qmv x", {"custom_us": 1.0, "builtin_us": 2.0, "custom": True})
    b = kernel_choices.ChoiceStore(Path(os.environ["XDG_CACHE_HOME"]), {"chip": "Apple M2", "mlx": "0.33.0"})
    assert b.path != a.path and b.get("qmv x") is None
    again = kernel_choices.ChoiceStore(Path(os.environ["XDG_CACHE_HOME"]), {"chip": "Apple M2", "mlx": "0.32.4"})
    assert again.get("qmv x") == {"custom_us": 1.0, "builtin_us": 2.0, "custom": True}
    # the kernel sources are part of what a choice holds for
    assert set(kernel_choices.machine(kernels.SOURCES)) >= {"chip", "os", "mlx", "mlx_qwen3", "kernel_sources"}


def test_two_processes_storing_choices_keep_both(tmp_path):
    folder = tmp_path / "c"
    first, second = (kernel_choices.ChoiceStore(folder, {"chip": "x"}) for _ in range(2))
    first.put("a", {"custom_us": 1.0, "builtin_us": 2.0, "custom": True})
    second.put("b", {"custom_us": 3.0, "builtin_us": 2.0, "custom": False})
    assert set(kernel_choices.ChoiceStore(folder, {"chip": "x"}).choices) == {"a", "b"}
    assert [p.name for p in folder.iterdir()] == [first.path.name]  # no temporary file left


@pytest.mark.parametrize("content", ["{not json", '{"machine": {"chip": "x"}, "choices": {"a": {"custom": "yes"}}}',
                                     '[1, 2]', '{"machine": {"chip": "other"}, "choices": {}}'])
def test_a_damaged_choice_file_costs_a_warning_and_a_new_measurement(tmp_path, caplog, content):
    folder = tmp_path / "c"
    store = kernel_choices.ChoiceStore(folder, {"chip": "x"})
    folder.mkdir()
    store.path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernel_choices"):
        again = kernel_choices.ChoiceStore(folder, {"chip": "x"})
    assert again.choices == {} and "measuring again" in caplog.text
    again.put("a", {"custom_us": 1.0, "builtin_us": 2.0, "custom": True})
    assert kernel_choices.ChoiceStore(folder, {"chip": "x"}).get("a")["custom"] is True


def test_an_unwritable_cache_folder_costs_one_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = kernel_choices.ChoiceStore(blocker / "mlx_qwen3", {"chip": "x"})
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernel_choices"):
        for key in "ab":
            store.put(key, {"custom_us": 1.0, "builtin_us": 2.0, "custom": True})
    assert caplog.text.count("cannot store kernel choices") == 1
    assert store.get("b")["custom"] is True  # still known to this process
    assert blocker.read_text() == "not a folder"


class Clock:
    """A fake perf_counter: each op advances it by its own cost, so measure() sees exact times."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def op(self, seconds):
        def run():
            self.now += seconds
            return mx.array(0)

        return run


@pytest.mark.parametrize("custom,builtin,wins", [(10e-6, 12e-6, True), (10e-6, 10e-6, False),
                                                 (9.8e-6, 10e-6, False), (12e-6, 10e-6, False)])
def test_the_custom_kernel_is_chosen_only_where_it_is_clearly_faster(custom, builtin, wins):
    clock = Clock()
    m = kernels.measure(clock.op(custom), clock.op(builtin), clock=clock)
    assert m["custom"] is wins
    assert m["custom_us"] == pytest.approx(custom * 1e6) and m["builtin_us"] == pytest.approx(builtin * 1e6)


def test_measure_times_the_median_so_one_stall_does_not_decide(monkeypatch):
    clock = Clock()
    costs = iter([10e-6] * 10 + [500e-6] * 10 + [10e-6] * 200)  # the first timed round of custom stalls
    c = clock.op(0)

    def custom():
        clock.now += next(costs)
        return mx.array(0)

    m = kernels.measure(custom, clock.op(12e-6), clock=clock)
    assert m["custom"] is True and m["custom_us"] == pytest.approx(10.0)


def test_weights_off_the_vector_alignment_take_the_builtins(on_cpu, monkeypatch):
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "measure", choose(custom=True))
    w = quantized((16, 64), mx.bfloat16, 32, 4, 0)
    layer = nn_quantized(w)
    x = mx.ones((1, 64), dtype=mx.bfloat16)
    monkeypatch.setattr(kernels, "address", lambda a: 4096 + 4)
    kernels.quantized_linear(layer, x)
    assert on_cpu == []
    # a new weight array is looked at afresh
    monkeypatch.setattr(kernels, "address", lambda a: 4096)
    layer.update({"weight": mx.array(w[0])})
    kernels.quantized_linear(layer, x)
    assert on_cpu == ["qmv", "qmv"]


REAL_ADDRESS = kernels.address  # taken before the fixture above replaces it


def test_address_sees_the_offset_of_a_view():
    base = mx.arange(64, dtype=mx.uint32)
    mx.eval(base)
    view = base[1:33].reshape(4, 8)
    assert REAL_ADDRESS(view) - REAL_ADDRESS(base) == 4  # so at most one of the two is 16-byte aligned


def test_modes(monkeypatch):
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    assert not kernels._use("builtin", ("qmv",), lambda: "never checked", None)
    assert kernels._use("custom", ("qmv",), lambda: "custom skips the check", None)
    monkeypatch.setattr(kernels, "on_metal", lambda: False)
    assert not kernels._use("custom", ("qmv",), lambda: None, None)  # off Metal the twins run, whatever the mode
    layer = nn_quantized(quantized((8, 64), mx.bfloat16, 32, 4, 0))
    with pytest.raises(ValueError, match="kernels must be one of auto, custom, builtin"):
        kernels.set_mode(layer, "fast")
    # a model's own mode, else the environment's, else auto
    monkeypatch.setenv("MLX_QWEN3_KERNELS", "builtin")
    assert kernels.mode(layer) == "builtin"
    kernels.set_mode(layer, "custom")
    assert kernels.mode(layer) == "custom" and kernels.mode() == "builtin"
    kernels.set_mode(layer, None)
    monkeypatch.delenv("MLX_QWEN3_KERNELS")
    assert kernels.mode(layer) == "auto"


def test_two_models_in_one_process_keep_their_own_kernel_mode(on_cpu, monkeypatch):
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "measure", choose(custom=True))
    plain, fast = _tiny_moe(), _tiny_moe()
    kernels.set_mode(plain, "builtin")
    kernels.set_mode(fast, "auto")
    want = _decode_logits(plain)
    assert on_cpu == []  # the built-in model launched nothing
    got = _decode_logits(fast)
    assert {"qmv", "moe_gate_up", "moe_down"} <= set(on_cpu)
    on_cpu.clear()
    assert mx.array_equal(_decode_logits(plain), want) and on_cpu == []  # still its own after the other ran
    assert mx.isfinite(got.astype(mx.float32)).all()  # accuracy: test_a_whole_moe_decode_step_...


# ---- python -m mlx_qwen3.selftest ----

SMALL = {"tiny-moe": dict(D=256, I=128, E=6, k=3, dense=[(24, 256), (8, 768)])}


def test_selftest_report_with_the_kernels(on_cpu, monkeypatch):
    from mlx_qwen3.selftest import op_report

    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    rows = op_report(SMALL, iters=1)
    assert [r["op"] for r in rows] == ["qmv", "qmv", "moe (gate+up+down)"]
    # what a 24x256 4-bit mat-vec must read: packed weights, bf16 scales and biases per 64, bf16 x
    assert rows[0]["bytes"] == 24 * 256 // 2 + 2 * (24 * 256 // 64 * 2) + 256 * 2
    assert rows[0]["custom_gbs"] == round(rows[0]["bytes"] / rows[0]["custom_us"] / 1e3, 1)
    for r in rows:
        assert r["ok"] is True and r["max_rel_err"] < 1e-2 and r["custom_us"] > 0 and r["builtin_us"] > 0
        # the choice follows the dispatcher's rule (here the CPU executor is far slower than MLX)
        assert r["choice"] == ("custom" if r["custom_us"] < r["builtin_us"] * (1 - kernels.MARGIN) else "builtin")


def test_selftest_off_metal_times_the_builtins_and_says_why(monkeypatch):
    from mlx_qwen3.selftest import op_report

    monkeypatch.setattr(kernels, "on_metal", lambda: False)
    rows = op_report(SMALL, iters=1)
    assert all("not run: no Metal device" in r["custom"] and r["builtin_us"] > 0 for r in rows)


# python -m mlx_qwen3.selftest ARGS with kernels.on_metal() False, as off Metal (on a Mac too)
OFF_METAL = """
import runpy, sys
from mlx_qwen3 import kernels
kernels.on_metal = lambda: False
sys.argv = ["mlx_qwen3.selftest"] + sys.argv[1:]
runpy.run_module("mlx_qwen3.selftest", run_name="__main__", alter_sys=True)
"""


def test_selftest_cli_off_metal_with_a_model(tmp_path):
    import subprocess
    import sys

    from mlx_qwen3.convert import write_safetensors
    from mlx.utils import tree_flatten

    model = _tiny_moe()
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", dict(tree_flatten(model.parameters())))
    config = dict(model.args.__dict__, quantization={"group_size": 32, "bits": 4})
    (folder / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-c", OFF_METAL, "--model", str(folder), "--tokens", "3", "--no-ops"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["environment"]["metal"] is False and report["model"]["decode_tps_builtin"] > 0
    assert "decode_tps_auto" not in report["model"]  # off Metal only the built-ins are timed
    assert report["stored_choices"]["choices"] == [] and "kernels-" in report["stored_choices"]["file"]
    assert Path(report["stored_choices"]["file"]).parent == Path(os.environ["XDG_CACHE_HOME"]) / "mlx_qwen3"


def test_load_sets_the_kernel_mode_of_that_model_only(tmp_path):
    from mlx.utils import tree_flatten

    from mlx_qwen3 import UserError
    from mlx_qwen3.convert import write_safetensors
    from mlx_qwen3.load import load_model

    model = _tiny_moe()
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(dict(model.args.__dict__, quantization={"group_size": 32, "bits": 4})))
    builtin, _ = load_model(folder, kernels="builtin")
    other, _ = load_model(folder)
    assert kernels.mode(builtin.layers[0].self_attn.q_proj) == "builtin"
    assert kernels.mode(builtin.layers[0].mlp.switch_mlp) == "builtin"
    assert kernels.mode(other.layers[0].self_attn.q_proj) == "auto"
    with pytest.raises(UserError, match="kernels must be one of auto, custom, builtin, not 'fast'"):
        load_model(folder, kernels="fast")


def test_a_bad_environment_value_warns_once(monkeypatch, caplog):
    monkeypatch.setenv("MLX_QWEN3_KERNELS", "turbo")
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        assert [kernels.mode() for _ in range(3)] == ["auto"] * 3
    assert caplog.text.count("MLX_QWEN3_KERNELS=turbo") == 1


def test_forget_starts_the_process_afresh(monkeypatch, caplog, tmp_path):
    def broken(kernel, **kwargs):
        raise RuntimeError("Unable to build metal library from source")

    monkeypatch.setattr(kernels, "launch", broken)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setenv("MLX_QWEN3_KERNELS", "turbo")
    with caplog.at_level(logging.WARNING, logger="mlx_qwen3.kernels"):
        kernels.quantized_linear(nn_quantized(quantized((8, 64), mx.bfloat16, 32, 4, 0)), mx.ones((1, 64), mx.bfloat16))
        assert set(kernels.disabled()) == {"qmv"} and kernels.mode() == "auto"
        before = kernels.store().path
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
        assert kernels.store().path == before  # the store is opened once per process, until forget()
        kernels.forget()
        assert kernels.disabled() == {} and kernels.store().path.parent == tmp_path / "elsewhere" / "mlx_qwen3"
        kernels.mode()
    assert caplog.text.count("MLX_QWEN3_KERNELS=turbo") == 2  # the one-time message is said again
