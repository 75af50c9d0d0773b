"""Run MLX custom Metal kernels on the CPU: the exact source MLX generates, compiled as C++.

1. The source: inside mx.export_function tracing, mx.fast.metal_kernel does not need Metal, and
   with verbose=True it prints the Metal source MLX builds around the kernel body.
2. The compiler: that text plus metal_shim.h (address spaces, types, SIMD-group functions, a fiber
   scheduler) and a small generated main(), built with clang++ or g++ (optionally with ASan).
3. The run: each threadgroup's threads are fibers, switched at every barrier and SIMD-group call,
   in a chosen order (forward, reverse, random); threadgroup memory and outputs start poisoned.
"""

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(tempfile.gettempdir()) / "mlx_qwen3_metal_executor"
ORDERS = ("forward", "reverse", "random")
_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.uint32: np.uint32,
       mx.int32: np.int32, mx.uint8: np.uint8, mx.int64: np.int64}


def compiler() -> str:
    for cc in ("clang++", "g++"):
        if shutil.which(cc):
            return cc
    return None


# ---- 1. the source MLX generates ----

def generated_source(kernel_fn, inputs, **kwargs) -> str:
    """Trace one call of `kernel_fn` (an mx.fast.metal_kernel) and return the Metal source it prints."""
    def call(*xs):
        return kernel_fn(inputs=list(xs), verbose=True, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stdout"
        saved = os.dup(1)
        with open(out, "w") as f:
            os.dup2(f.fileno(), 1)
            try:
                mx.export_function(str(Path(tmp) / "trace.mlxfn"), call, *inputs)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        text = out.read_text()
    m = re.search(r"```\n(.*?)\n```", text, re.S)
    assert m, f"no generated source in: {text[:500]}"
    return m.group(1)


# ---- 2. the harness ----

_SIGNATURE = re.compile(r"\[\[kernel\]\] void (\w+)\((.*?)\)\s*\{", re.S)
_PARAM = re.compile(r"^\s*(.*?)\s*([&*]?)\s*(\w+)\s*\[\[(\w+)(?:\((\d+)\))?\]\]\s*$", re.S)
_INSTANCE = re.compile(r"^template \[\[host_name.*?decltype\((\w+<.*?>)\).*$", re.M)
_TG_DECL = re.compile(r"threadgroup\s+([\w:]+)\s+(\w+)\s*\[([^\]]+)\]\s*;")


def parse(source: str):
    """-> (function name with template arguments, [(kind, c type, name)]) in the signature's order."""
    name, params = _SIGNATURE.search(source).groups()
    instance = _INSTANCE.search(source)  # only a templated kernel has one
    call = instance.group(1) if instance else name
    out = []
    for p in params.split(",\n"):
        ctype, ref, pname, attr, _ = _PARAM.match(p).groups()
        kind = "buffer" if attr == "buffer" else "attribute"
        out.append((kind, ctype.replace("device", "").replace("constant", "").strip(), ref, pname))
    return call, out


def harness(source: str, audit: bool = False) -> str:
    """The C++ program: the kernel, its arguments, and a main() that reads the buffers from a file.
    With `audit`, main runs only the threadgroups listed in argv[11] under tests/metal_audit.h's
    counters and writes their figures to argv[12]."""
    call, params = parse(source)
    body = _INSTANCE.sub("", source)
    body = _TG_DECL.sub(r"auto& \2 = exec::tg_array<\1, \3>();", body)
    args, b = [], 0
    for kind, ctype, ref, name in params:
        if kind == "buffer":
            args.append(f"*({ctype}*)B[{b}]" if ref == "&" else f"({ctype}*)B[{b}]")
            b += 1
        else:
            args.append(f"id.{name}")
    include = '#include "metal_shim.h"\n' + ('#include "metal_audit.h"\n' if audit else "")
    run_grid = ("audit::run(thread_body, grid, size, argv[9], unsigned(atoi(argv[10])), B, sizes, n, argv[11], argv[12]);"
                if audit else "exec::run_grid(thread_body, grid, size, argv[9], unsigned(atoi(argv[10])));")
    return f"""{include}static void* B[{max(b, 1)}];
{body}
static void thread_body(const exec::Ids& id) {{ {call}({", ".join(args)}); }}

int main(int argc, char** argv) {{
  // argv: inputs file, outputs file, grid x y z, threadgroup x y z, order, seed
  FILE* in = std::fopen(argv[1], "rb");
  uint64_t n, sizes[{max(b, 1)}];
  if (std::fread(&n, 8, 1, in) != 1 || n != {b}) exec::fail("bad input file");
  for (uint64_t i = 0; i < n; i++) {{
    if (std::fread(&sizes[i], 8, 1, in) != 1) exec::fail("bad input file");
    if (sizes[i] >> 63) {{  // zero-filled, not in the file (the audit's big weights: pages never touched cost nothing)
      sizes[i] &= ~(1ull << 63);
      B[i] = std::calloc(sizes[i] ? sizes[i] : 1, 1);
      continue;
    }}
    B[i] = std::malloc(sizes[i] ? sizes[i] : 1);  // exactly the size: ASan sees any overrun
    if (std::fread(B[i], 1, sizes[i], in) != sizes[i]) exec::fail("bad input file");
  }}
  std::fclose(in);
  uint3 grid = {{uint(atoi(argv[3])), uint(atoi(argv[4])), uint(atoi(argv[5]))}};
  uint3 size = {{uint(atoi(argv[6])), uint(atoi(argv[7])), uint(atoi(argv[8]))}};
  {run_grid}
  FILE* out = std::fopen(argv[2], "wb");
  for (uint64_t i = 0; i < n; i++) std::fwrite(B[i], 1, sizes[i], out);
  std::fclose(out);
  return 0;
}}
"""


def build(source: str, sanitize: bool = False) -> Path:
    cc = compiler()
    assert cc, "no C++ compiler (clang++ or g++) on PATH"
    code = harness(source)
    tag = hashlib.sha1((code + cc + str(sanitize)).encode()).hexdigest()[:16]
    exe = CACHE / f"k_{tag}{'_asan' if sanitize else ''}"
    if not exe.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"k_{tag}.cpp"
        src.write_text(code)
        flags = ["-std=c++17", "-O1", "-w", f"-I{HERE}"]
        if sanitize:
            # alignment: a vector load (uint2, uint4: aligned in metal_shim.h as in Metal) off its alignment
            flags += ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer",
                      "-g"]
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        done = subprocess.run([cc, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the generated kernel did not compile:\n{done.stderr[-4000:]}")
        tmp.rename(exe)
    return exe


# ---- 3. running it ----

def _bytes(a) -> bytes:
    a = mx.contiguous(a)
    return np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).tobytes()


def buffers(source, inputs, input_names, output_shapes, output_dtypes, zero_from=None):
    """The kernel's buffers in signature order: bytes, or a size (an int) for an input of at least
    `zero_from` bytes, which the harness then fills with zeros; and where each output lies."""
    _, params = parse(source)
    by_name = dict(zip(input_names or [], inputs))
    out, outputs = [], []
    for kind, ctype, ref, name in [p for p in params if p[0] == "buffer"]:
        if name in by_name:
            a = by_name[name]
            big = zero_from is not None and a.nbytes >= zero_from
            out.append(a.nbytes if big else _bytes(a))
        elif name.endswith("_shape"):
            out.append(np.array(by_name[name[:-6]].shape, np.int32).tobytes())
        elif name.endswith("_strides"):
            a = by_name[name[:-8]]
            strides = np.cumprod([1] + list(a.shape[::-1]))[:-1][::-1] if a.ndim else []
            out.append(np.array(strides, np.int64).tobytes())
        elif name.endswith("_ndim"):
            out.append(np.array(by_name[name[:-5]].ndim, np.int32).tobytes())
        else:  # an output: poisoned, so an element the kernel never writes shows
            i = len(outputs)
            outputs.append((len(out), output_shapes[i], output_dtypes[i]))
            n = int(np.prod(output_shapes[i])) * output_dtypes[i].size
            out.append(b"\xff" * n)
    return out, outputs


def execute(exe, bufs, outputs, grid, threadgroup, order="forward", seed=0, extra=()):
    """Run a built harness on `bufs`; returns the outputs as mx arrays."""
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "in", Path(tmp) / "out"
        with open(fin, "wb") as f:
            f.write(struct.pack("<Q", len(bufs)))
            for x in bufs:
                f.write(struct.pack("<Q", x | 1 << 63) if isinstance(x, int) else struct.pack("<Q", len(x)) + x)
        args = [str(exe), str(fin), str(fout), *map(str, grid), *map(str, threadgroup), order, str(seed), *extra]
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"the kernel failed on the CPU ({done.returncode}):\n{done.stderr[-4000:]}")
        data = fout.read_bytes()
    offsets = np.cumsum([0] + [x if isinstance(x, int) else len(x) for x in bufs])
    result = []
    for index, shape, dtype in outputs:
        raw = np.frombuffer(data[offsets[index]:offsets[index + 1]], _NP[dtype]).reshape(shape)
        arr = mx.array(raw)
        result.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
    return result


def run(kernel_fn, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
        order="forward", seed=0, sanitize=False, input_names=None):
    """Execute the kernel on the CPU; returns its outputs as mx arrays."""
    source = generated_source(kernel_fn, inputs, template=template, grid=grid, threadgroup=threadgroup,
                              output_shapes=output_shapes, output_dtypes=output_dtypes)
    exe = build(source, sanitize)
    bufs, outputs = buffers(source, inputs, input_names, output_shapes, output_dtypes)
    return execute(exe, bufs, outputs, grid, threadgroup, order, seed)


def launch(kernel, order="forward", sanitize=False, **kwargs):
    """A stand-in for mlx_qwen3.kernels.launch that runs the kernel here."""
    return run(kernel.fn, order=order, sanitize=sanitize, input_names=kernel.inputs, **kwargs)
