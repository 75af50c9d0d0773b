"""A traffic and work audit of MLX custom Metal kernels, on the CPU (tests/metal_executor.py's harness).

The harness is compiled with clang++-15 to LLVM IR at -O2 (no auto-vectorizing, so the IR's ops stay
the source's scalar ops), keeping the shim's fiber scheduler, SIMD-group functions and bfloat16
conversions out of line. In the kernel function (its helpers inlined) every load gets a call
`__audit_load(ptr, bytes, site)` before it and every basic block a call `__audit_block(id)`;
tests/metal_audit.h counts them. Ops are counted statically per block and multiplied by the
blocks' executions:

- bitwise (and/or/xor/shl/lshr/ashr) and int (add/sub/mul/div/rem/ext/select/icmp; a trunc is free) are
  split by where their result goes: "value" ops feed a number the kernel computes with (an
  int-to-float convert, a store, a call); "address" ops feed only addresses and loop control
  (so is every getelementptr);
- convert: int<->float and float<->float casts, and each call of the shim's bfloat16 conversions
  (one convert each: on Metal a bf16 load is a load and one convert, not the shim's shift);
- fma (llvm.fmuladd / llvm.fma) and float (fadd/fsub/fmul/fdiv/fneg/fcmp, math calls);
- an op on an <N x T> vector counts N times (a GPU lane is scalar).

Loads count only inside the device buffers. One "request" is one load instruction's n-th execution
by the 32 lanes of a simdgroup: the union of their byte ranges is what one coalesced access must
fetch ("coalesced" bytes), and it is contiguous or not.

Whole launches of the big shapes are slow on this CPU, so by default only the first, the middle and
the last threadgroup along x (every y and z) run, and additive figures are scaled: threadgroups
between first and last do identical work (a row-block design). Unique bytes per buffer are the
sampled union plus each middle threadgroup's private bytes times the threadgroups it stands for.
tests/test_audit.py holds sampled and whole runs equal.
"""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

import metal_executor as ex

CLANG = "clang++-15"  # clang 14 cannot compile the shim's _Float16 on x86
CLASSES = ("bitwise", "int", "address", "convert", "fma", "float")

# functions the optimizer must not inline into the kernel: the scheduler, SIMD-group functions,
# barriers and the bfloat16 conversions (counted as one convert per call)
_OUT_OF_LINE = re.compile(r"@(_ZN4exec|_ZNK?10bfloat16_t|_Z\d+simd_|_Z\d+threadgroup_barrier|_Z\d+simdgroup_barrier"
                          r"|_Z\d+custom_kernel_)")
_BF16_TO_FLOAT = "@_ZNK10bfloat16_tcvfEv"
_BF16_FROM_FLOAT = "@_ZN10bfloat16_tC"
_BITWISE = {"and", "or", "xor", "shl", "lshr", "ashr"}
_INT = {"add", "sub", "mul", "udiv", "sdiv", "urem", "srem", "zext", "sext", "select", "icmp"}
_CONVERT = {"uitofp", "sitofp", "fptoui", "fptosi", "fpext", "fptrunc"}
_FLOAT = {"fadd", "fsub", "fmul", "fdiv", "frem", "fneg", "fcmp"}
# free moves a value passes through on its way (not counted as ops); trunc is one: taking the low
# bits of a register is no instruction (x86's optimizer writes element 0 of a loaded uchar4 so)
_THROUGH = {"phi", "extractelement", "insertelement", "shufflevector", "bitcast", "freeze", "trunc"}
_DEF = re.compile(r"^\s*(%[-\w.$]+) = (?:tail |musttail |notail )?(\w+)")
_NAME = re.compile(r"%[-\w.$]+")


def available() -> bool:
    return shutil.which(CLANG) is not None


# ---- the IR ----

def _lanes(line: str) -> int:
    m = re.search(r"<(\d+) x ", line)
    return int(m.group(1)) if m else 1


def _op(line: str):
    """-> (defined name or None, opcode) of one IR line."""
    m = _DEF.match(line)
    if m:
        return m.group(1), m.group(2)
    words = [w for w in line.split() if w not in ("tail", "musttail", "notail")]
    return None, words[0] if words else ""


def _classify(body: list) -> dict:
    """line index -> op class for the kernel's instructions (see the module docstring)."""
    defs = {}
    for i, line in enumerate(body):
        name, op = _op(line)
        if name:
            defs[name] = (i, op)
    # "value" integers: backwards from the uses that make them numbers, through integer ops
    value, todo = set(), []
    for line in body:
        _, op = _op(line)
        if op in _CONVERT or op in ("store", "call", "ret", "insertelement", "bitcast"):
            operands = _NAME.findall(line.split(" = ", 1)[-1])
            todo += operands[:1] if op == "store" else operands  # a store's value, not its address
    while todo:
        name = todo.pop()
        if name in value or name not in defs:
            continue
        i, op = defs[name]
        if op in _BITWISE or op in _INT or op in _THROUGH:
            value.add(name)
            todo += _NAME.findall(body[i].split(" = ", 1)[1])
    classes = {}
    for i, line in enumerate(body):
        name, op = _op(line)
        if op == "select" and not re.search(r"select (\w+ )*i1 [^,]+, (i\d+|<\d+ x i\d+>) ", line):
            classes[i] = "float"  # a select of floats (or pointers): not integer work
        elif op in _BITWISE or op in _INT:
            classes[i] = ("bitwise" if op in _BITWISE else "int") if name in value else "address"
        elif op == "getelementptr":
            classes[i] = "address"
        elif op in _CONVERT:
            classes[i] = "convert"
        elif op in _FLOAT:
            classes[i] = "float"
        elif op == "call":
            if _BF16_TO_FLOAT in line or _BF16_FROM_FLOAT in line:
                classes[i] = "convert"
            elif "@llvm.fmuladd" in line or "@llvm.fma." in line:
                classes[i] = "fma"
            elif re.search(r"@(llvm\.(exp|log|sqrt|fabs|maxnum|minnum|pow)|expf?|logf?|sqrtf?|tanhf?|powf?)\b", line):
                classes[i] = "float"
    return classes


def instrument(ll: str, kernel_name: str = "custom_kernel_"):
    """-> (instrumented IR, static op counts per block id, load sites) for the kernel in `ll`."""
    lines = ll.split("\n")
    start = next(i for i, l in enumerate(lines)
                 if l.startswith("define ") and kernel_name in re.search(r"@[-\w.$]+(?=\()", l).group(0))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    body = lines[start + 1:end]
    classes = _classify(body)
    out, static, sites = [], [], 0

    def new_block():
        static.append(dict.fromkeys(CLASSES, 0))
        return f"  call void @__audit_block(i32 {len(static) - 1})"

    pending = new_block()  # the entry block has no label
    for i, line in enumerate(body):
        if re.match(r"^[\w.$-]+:", line):
            out.append(line)
            pending = new_block()
            continue
        if pending and not re.match(r"\s*%[-\w.$]+ = phi ", line) and line.strip():
            out.append(pending)
            pending = None
        if i in classes:
            static[-1][classes[i]] += _lanes(line)
        if _op(line)[1] == "load":
            ty, ptr = re.match(r".*? = load (?:volatile )?(.+?), ptr (%[-\w.$]+)", line).groups()
            out.append(f"  call void @__audit_load(ptr {ptr}, i64 ptrtoint (ptr getelementptr ({ty}, ptr null, i32 1) to i64), i32 {sites})")
            sites += 1
        elif _BF16_TO_FLOAT in line:  # the conversion loads the 2 bytes at its `this`
            ptr = re.search(r"@_ZNK10bfloat16_tcvfEv\(ptr [^%]*(%[-\w.$]+)\)", line).group(1)
            out.append(f"  call void @__audit_load(ptr {ptr}, i64 2, i32 {sites})")
            sites += 1
        elif re.search(r"call void @llvm\.memcpy", line):
            args = re.search(r"@llvm\.memcpy[\w.]*\(ptr [^,]*?(%[-\w.$]+), ptr [^,]*?(%[-\w.$]+), i64 ([%\w.]+)", line)
            out.append(f"  call void @__audit_load(ptr {args.group(2)}, i64 {args.group(3)}, i32 {sites})")
            sites += 1
        out.append(line)
    decls = "declare void @__audit_load(ptr, i64, i32)\ndeclare void @__audit_block(i32)\n"
    text = "\n".join(lines[:start + 1] + out + lines[end:])
    if "define void @__audit_load" in text or "@__audit_load(ptr noundef" in text:
        decls = ""  # the runtime in the same module defines them
    return text + "\n" + decls, static, sites


def _noinline(ll: str) -> str:
    """The shim's scheduler, SIMD-group functions, barriers and bf16 conversions out of line (kept
    out of the counts); everything else the kernel calls (its helpers, the shim's vector types and
    as_type) inlined into it, however big, so that its loads and ops are counted where they run."""
    def fix(m):
        line = m.group(0)
        name = re.search(r"@[-\w.$]+(?=\()", line).group(0)  # not split("("): `dereferenceable(N)` comes first
        if _OUT_OF_LINE.search(name):
            attr = "noinline"
        elif re.search(r"@(main|_Z\d+thread_body|__audit)", name):
            return line
        else:
            attr = "alwaysinline"
        return re.sub(r"\) (unnamed_addr )?#(\d+)", lambda a: f") {a.group(1) or ''}{attr} #{a.group(2)}", line, count=1)
    return re.sub(r"^define .*$", fix, ll, flags=re.M)


def build(source: str):
    """-> (executable, static op counts per block) for the audited harness of `source`."""
    code = ex.harness(source, audit=True)
    runtime = (ex.HERE / "metal_audit.h").read_text() + Path(__file__).read_text()
    tag = hashlib.sha1((code + runtime).encode()).hexdigest()[:16]
    exe = ex.CACHE / f"audit_{tag}"
    table = exe.with_suffix(".blocks")
    if not exe.exists():
        ex.CACHE.mkdir(parents=True, exist_ok=True)
        src = ex.CACHE / f"audit_{tag}.cpp"
        src.write_text(code)
        tmp = ex.CACHE / f"audit_{tag}.tmp{os.getpid()}"

        def clang(*args):
            done = subprocess.run([CLANG, "-w", *args], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the audited kernel did not compile:\n{done.stderr[-4000:]}")

        # unoptimized IR (but not optnone), the shim's functions kept out of line, then -O2
        clang("-std=c++17", "-O2", "-Xclang", "-disable-llvm-passes", "-S", "-emit-llvm", f"-I{ex.HERE}",
              str(src), "-o", f"{tmp}.0.ll")
        # a vector load stays one load: x86's optimizer would split a uint2 whose words are used
        # one by one into two 4-byte loads, which Metal's compiler has no reason to do
        early = re.sub(r"= load (<\d+ x \w+>)", r"= load volatile \1", Path(f"{tmp}.0.ll").read_text())
        Path(f"{tmp}.1.ll").write_text(_noinline(early))
        clang("-O2", "-fno-vectorize", "-fno-slp-vectorize", "-S", "-emit-llvm", f"{tmp}.1.ll", "-o", f"{tmp}.2.ll")
        text, static, _ = instrument(Path(f"{tmp}.2.ll").read_text())
        Path(f"{tmp}.3.ll").write_text(text)
        clang("-O1", f"{tmp}.3.ll", "-o", str(tmp))
        table.write_text(repr(static))
        for i in range(4):
            Path(f"{tmp}.{i}.ll").unlink()
        tmp.rename(exe)
    return exe, eval(table.read_text())


# ---- running it ----

def sample(grid, threadgroup, whole=False):
    """-> [(threadgroup (x, y, z), how many threadgroups it stands for)]: first, middle and last along
    x at every y and z (all of them if `whole`)."""
    n = [g // t for g, t in zip(grid, threadgroup)]
    if whole or n[0] <= 3:
        xs = [(x, 1) for x in range(n[0])]
    else:
        xs = [(0, 1), (n[0] // 2, n[0] - 2), (n[0] - 1, 1)]
    return [((x, y, z), w) for z in range(n[2]) for y in range(n[1]) for x, w in xs]


def _parse(text: str) -> list:
    groups = []
    for line in text.splitlines():
        head, *rest = line.split()
        if head == "tg":
            groups.append({"tg": tuple(map(int, rest)), "blocks": {}, "bufs": []})
        elif head == "blocks":
            groups[-1]["blocks"] = {int(a): int(b) for a, b in (r.split(":") for r in rest)}
        else:
            figures = list(map(int, rest[1:6]))
            ranges = np.array([tuple(map(int, r.split("-"))) for r in rest[6:]], np.int64).reshape(-1, 2)
            groups[-1]["bufs"].append((figures, ranges))
    return groups


def _union(ranges: np.ndarray) -> int:
    """Bytes covered by a set of [lo, hi) ranges."""
    if not len(ranges):
        return 0
    r = ranges[np.argsort(ranges[:, 0])]
    ends = np.maximum.accumulate(r[:, 1])
    starts = np.maximum(r[:, 0], np.concatenate([[r[0, 0]], ends[:-1]]))
    return int(np.clip(r[:, 1] - starts, 0, None).sum())


def audit(kernel_fn, inputs, template, grid, threadgroup, output_shapes, output_dtypes, input_names,
          whole=False, zero_from=1 << 20):
    """Run the kernel under the counters. -> (outputs, figures). Inputs of at least `zero_from`
    bytes are zero-filled (contents change no count unless control flow reads them: the MoE ids
    are small and passed as they are). figures: per-buffer loads / bytes, op totals by class."""
    source = ex.generated_source(kernel_fn, inputs, template=template, grid=grid, threadgroup=threadgroup,
                                 output_shapes=output_shapes, output_dtypes=output_dtypes)
    exe, static = build(source)
    bufs, outputs = ex.buffers(source, inputs, input_names, output_shapes, output_dtypes, zero_from)
    names = [p[3] for p in ex.parse(source)[1] if p[0] == "buffer"]
    plan = sample(grid, threadgroup, whole)
    weight = dict(plan)
    result_file = ex.CACHE / f"audit_result_{os.getpid()}"
    which = ";".join(",".join(map(str, tg)) for tg, _ in plan)
    outs = ex.execute(exe, bufs, outputs, grid, threadgroup, extra=(which, str(result_file)))
    groups = _parse(result_file.read_text())
    result_file.unlink()
    ops = dict.fromkeys(CLASSES, 0)
    per_buffer = {}
    for b, name in enumerate(names):
        size = bufs[b] if isinstance(bufs[b], int) else len(bufs[b])
        totals = np.zeros(5, np.int64)
        for g in groups:
            totals += weight[g["tg"]] * np.array(g["bufs"][b][0], np.int64)
        sampled = _union(np.concatenate([g["bufs"][b][1] for g in groups]))
        unique = sampled
        for g in groups:  # bytes only this threadgroup touched, once more for each other it stands for
            if weight[g["tg"]] > 1:
                others = [h["bufs"][b][1] for h in groups if h is not g] + [np.zeros((0, 2), np.int64)]
                unique += (weight[g["tg"]] - 1) * (sampled - _union(np.concatenate(others)))
        loads, issued, coalesced, requests, noncontiguous = map(int, totals)
        per_buffer[name] = {"size": size, "loads": loads, "issued": issued, "coalesced": coalesced,
                            "requests": requests, "noncontiguous": noncontiguous, "unique": unique}
    for g in groups:
        for block, count in g["blocks"].items():
            for c in CLASSES:
                ops[c] += weight[g["tg"]] * count * static[block][c]
    n_run = len(plan)
    n_all = int(np.prod([g // t for g, t in zip(grid, threadgroup)]))
    return outs, {"buffers": per_buffer, "ops": ops, "threadgroups": n_all, "threadgroups_run": n_run}


def launcher(record: list, whole=False):
    """A stand-in for mlx_qwen3.kernels.launch that runs each kernel under the counters and appends
    (kernel name, figures) to `record`."""
    def launch(kernel, **kwargs):
        outs, figures = audit(kernel.fn, input_names=kernel.inputs, whole=whole, **kwargs)
        record.append((kernel.name, figures))
        return outs
    return launch
