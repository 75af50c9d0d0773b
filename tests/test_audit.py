"""The audit's counters (tests/metal_audit.py) on tiny kernels whose figures are known by hand."""

import mlx.core as mx
import pytest

import metal_audit as au
from mlx_qwen3 import kernels
from test_kernels import quantized
from requires import requires

pytestmark = requires(au.available(), f"the audit needs {au.CLANG} (Debian's clang-15)")

N = 64  # one threadgroup of two simdgroups


def run_tiny(body: str, inp: mx.array, n_out: int = N):
    kernel = mx.fast.metal_kernel(name="tiny", input_names=["inp"], output_names=["out"], source=body)
    _, figures = au.audit(kernel, [inp], template=None, grid=(N, 1, 1), threadgroup=(N, 1, 1),
                          output_shapes=[(n_out,)], output_dtypes=[mx.float32], input_names=["inp"], whole=True)
    return figures["buffers"]["inp"], figures["ops"]


def test_consecutive_lanes_load_contiguously_and_the_minimum():
    got, _ = run_tiny("uint i = thread_position_in_grid.x; out[i] = inp[i];", mx.arange(N, dtype=mx.float32))
    assert got == {"size": 4 * N, "loads": N, "issued": 4 * N, "coalesced": 4 * N, "requests": 2,
                   "noncontiguous": 0, "unique": 4 * N}


def test_a_lane_stride_is_flagged_non_contiguous():
    got, _ = run_tiny("uint i = thread_position_in_grid.x; out[i] = inp[2 * i];", mx.arange(2 * N, dtype=mx.float32))
    assert got["requests"] == 2 and got["noncontiguous"] == 2
    assert got["coalesced"] == got["unique"] == 4 * N  # the bytes asked for: half the buffer


def test_reading_the_input_twice_doubles_the_bytes_but_not_the_unique_ones():
    body = "uint i = thread_position_in_grid.x; out[i] = inp[i] + inp[(i + 32) % 64];"
    got, _ = run_tiny(body, mx.arange(N, dtype=mx.float32))
    assert got["issued"] == got["coalesced"] == 2 * 4 * N
    assert got["unique"] == 4 * N and got["requests"] == 4 and got["noncontiguous"] == 0


def test_one_mask_and_one_convert_per_element():
    body = "uint i = thread_position_in_grid.x; out[i] = float(inp[i] & 0xfu);"
    _, ops = run_tiny(body, mx.arange(N, dtype=mx.uint32))
    assert ops["bitwise"] == N and ops["convert"] == N
    assert ops["fma"] == ops["float"] == ops["int"] == 0


def test_address_arithmetic_is_not_counted_as_unpacking():
    body = "uint i = thread_position_in_grid.x; out[i] = inp[(i >> 1) ^ 1];"  # shifts and xor for the address only
    _, ops = run_tiny(body, mx.arange(N, dtype=mx.float32))
    assert ops["bitwise"] == 0 and ops["address"] >= 2 * N


@pytest.fixture
def record(monkeypatch):
    def use(whole):
        rec = []
        monkeypatch.setattr(kernels, "launch", au.launcher(rec, whole=whole))
        return rec
    return use


def test_qmv_reads_each_weight_byte_once(record):
    rec = record(True)
    w, scales, biases, gs, bits = quantized((24, 512), mx.bfloat16, 64, 4, 0)
    kernels.qmv_custom(mx.ones((512,), mx.bfloat16), w, scales, biases, gs, bits)
    (name, fig), = rec
    b = fig["buffers"]
    assert name == "qmv"
    for key, arr in (("w", w), ("scales", scales), ("biases", biases)):
        assert b[key]["coalesced"] == b[key]["unique"] == arr.nbytes, key
        assert b[key]["noncontiguous"] == 0, key
    assert b["w"]["issued"] == w.nbytes
    assert b["scales"]["issued"] == 4 * scales.nbytes  # the 4 lanes (16 inputs each) of a group of 64 each load it
    assert b["x"]["unique"] == 1024 and b["x"]["coalesced"] == 3 * 2 * 1024  # once per simdgroup
    simdgroups, lanes = 24 // 4, 32
    # one mask per weight, no shift; each lane's prologue makes its 4 row indices (2 shifts, 3 ors)
    assert fig["ops"]["bitwise"] == 24 * 512 + simdgroups * lanes * 5
    # one per weight, one per x value per simdgroup, a scale and a bias per row and lane, one per output
    assert fig["ops"]["convert"] == 24 * 512 + simdgroups * 512 + simdgroups * lanes * 4 * 2 + 24


@pytest.mark.parametrize("op", ["qmv", "moe"])
def test_first_middle_and_last_threadgroups_extrapolate_exactly(record, op):
    def launches(whole):
        rec = record(whole)
        if op == "qmv":  # 7 threadgroups, the last one partial
            w = quantized((53, 320), mx.bfloat16, 32, 8, 0)
            kernels.qmv_custom(mx.ones((320,), mx.bfloat16), *w)
        else:
            projs = [quantized(s, mx.bfloat16, 64, 4, i) for i, s in enumerate([(6, 64, 256), (6, 64, 256), (6, 256, 64)])]
            kernels.moe_custom(mx.ones((256,), mx.bfloat16), mx.array([5, 0, 3], mx.uint32),
                               mx.array([0.5, 0.3, 0.2], mx.bfloat16), *projs)
        return [(n, {**f, "threadgroups_run": None}) for n, f in rec]

    sampled, whole = launches(False), launches(True)
    assert sampled == whole
    assert len(whole) == (1 if op == "qmv" else 2)


def test_a_vector_load_is_one_request_of_its_full_width():
    body = """typedef uint v4 __attribute__((ext_vector_type(4)));
    uint i = thread_position_in_grid.x;
    v4 v = ((const device v4*)inp)[i] & 0xfu;
    out[i] = float(v.x) + float(v.y) + float(v.z) + float(v.w);"""
    got, ops = run_tiny(body, mx.arange(4 * N, dtype=mx.uint32))
    assert got == {"size": 16 * N, "loads": N, "issued": 16 * N, "coalesced": 16 * N, "requests": 2,
                   "noncontiguous": 0, "unique": 16 * N}
    assert ops["bitwise"] == 4 * N and ops["convert"] == 4 * N  # a <4 x i32> mask is 4 lanes' work
