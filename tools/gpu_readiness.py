#!/usr/bin/env python3
"""Ahead-of-time compile matrix of every Triton kernel, for GPUs this machine does not have.

    python tools/gpu_readiness.py --arch 80 90                  # every paper model, fp32 / fp16 / bf16
    python tools/gpu_readiness.py --quick --markdown            # one model per op, fp16
    python tools/gpu_readiness.py --models nat_mini --dtypes bfloat16 --arch 90

The interpreter (TRITON_INTERPRET=1) runs programs the compiler rejects or runs badly, so
this compiles each kernel as the host code would launch it, with no GPU:

1. Op calls: every paper model (the registered names without ``test_``) runs one training
   step on the meta device in each dtype (``model.to(dtype)``), with each op's dispatch
   pointed at its Triton module; the calls into that module are recorded with their
   argument shapes, strides and dtypes.
2. Launches: each distinct call is replayed on CPU tensors of those shapes through the
   Triton module's own host code, forward then backward, with every ``@triton.jit``
   kernel's ``run`` replaced by a recorder: block sizes, num_warps, num_stages and flags
   are what the launchers choose, nothing is copied here.
3. Compile: each distinct specialization is compiled with ``triton.compile`` for
   ``GPUTarget("cuda", arch, 32)``; the bundled ``cuobjdump`` reads registers, stack /
   local memory and static shared memory (plus Triton's dynamic shared memory) from the
   cubin, and its SASS shows the tensor-core instructions (HMMA; HGMMA, i.e. wgmma, on
   sm_90); where there is a stack frame, ``ptxas -v`` says how much of it is spills; the
   TTGIR tells which ``tl.dot`` lowered to tensor cores (``tc_dots``: on MMA / all).
   A ptxas run past ``--ptxas-timeout`` fails its row rather than stall the matrix.

One row per specialization, then one per kernel, arch and dtype (its worst case); exit
status 1 on a compile failure, a spill, shared memory over the arch's per-block limit or
registers over the SM's file. Rows are keyed by the
kernel's declared constexprs, the int arguments Triton specialises to 1 (e.g. dilation
1), the pointer dtypes and the launch options; argument alignment is not part of the
key (the first launch seen is compiled). Kernels of the ``torch.compile`` path (the gate
primitives as custom ops) share the eager launchers' block choices and are not
enumerated separately.
"""
import argparse
import contextlib
import dataclasses
import importlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter replaces every @triton.jit function at decoration time; nothing compiles
    raise SystemExit("error: gpu_readiness compiles kernels; run it without TRITON_INTERPRET=1")

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _common as C  # noqa: E402
import attnzoo  # noqa: E402
from attnzoo.ops import _dispatch  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

OPS = ("gate", "neighborhood", "routing", "agent", "linear")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# per-block shared memory an opt-in launch may use (CUDA programming guide, compute capabilities)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
REGS_PER_SM = 64 * 1024
# one model per op that launches all of the op's kernels (CBAM: both gates, so every gate kernel)
QUICK_MODELS = ("cbam_resnet18", "nat_mini", "biformer_tiny", "agent_pvt_tiny", "mala_tiny")
COLUMNS = ["kernel", "arch", "dtype", "config", "warps", "stages", "regs", "spill_b", "stack_b", "smem_b",
           "tc_dots", "sass_mma", "models", "status"]
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# ----------------------------------------------------------------------------- 1. op calls (meta)

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    requires_grad: bool

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype).zero_()
        return t.requires_grad_(self.requires_grad)


def _spec(x):
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_spec(v) for v in x)
    return x


def _make(x):
    if isinstance(x, TensorSpec):
        return x.make()
    if isinstance(x, (list, tuple)):
        return type(x)(_make(v) for v in x)
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One call into a Triton backend module, e.g. ``neighborhood.triton.na2d(q, k, v, ...)``."""
    module: str
    fn: str
    args: tuple


class _Recorder:
    """Stands in for a Triton module as a backend's ``impl``: records each call, and runs the
    module's host code on the meta tensors (launches suppressed) so the model's shapes flow on.
    The output is tied to every input that needs a gradient, so the backward reaches the raw
    passes that ``_FusedGate.backward`` calls through ``impl``."""

    def __init__(self, impl, calls: Dict[OpCall, set], model: str):
        self._impl, self._calls, self._model = impl, calls, model

    def __getattr__(self, name):
        fn = getattr(self._impl, name)

        def call(*args):
            self._calls.setdefault(OpCall(fn.__module__, name, _spec(args)), set()).add(self._model)
            with torch.no_grad():
                out = fn(*args)
            return _tied(out, args)

        return call


def _tied(out, args):
    """``out`` tied to every input of ``args`` that needs a gradient (meta: only the graph is built)."""
    deps = [t for t in _tensors(args) if t.requires_grad]
    if torch.is_grad_enabled() and deps and isinstance(out, torch.Tensor) and out.is_floating_point():
        return out + sum(t.sum() for t in deps) * 0
    return out


class _Refused:
    """The ``impl`` of a Triton backend whose op-specific ``can_run`` refuses a call (neighborhood's
    ``query_stride > 1``): a GPU's dispatch would not send it there, so nothing is recorded; a meta
    output on q's grid (and tied to the inputs needing a gradient) keeps the training step going."""

    def __getattr__(self, name):
        def call(q, *args):
            return _tied(q.new_empty(q.shape), (q, *args))

        return call


def _refusal(backend, tensors) -> Optional[str]:
    """What the backend's own ``can_run`` says of ``tensors`` with the device check passed (the
    tensors are on meta here, the kernels would run on CUDA)."""
    generic = _dispatch.can_run_triton
    if backend.can_run is generic:
        return None
    _dispatch.can_run_triton = lambda *a, **k: None
    try:
        return backend.can_run(tensors, True)
    finally:
        _dispatch.can_run_triton = generic


@contextlib.contextmanager
def _recording(calls: Dict[OpCall, set], model: str):
    choose = _dispatch.choose_backend

    def choose_triton(op, backends, tensors, backend=None):
        tri = next(b for b in backends if b.name == "triton")
        if _refusal(tri, tensors) is not None:
            return dataclasses.replace(tri, impl=_Refused())
        return dataclasses.replace(tri, impl=_Recorder(tri.impl, calls, model))

    _dispatch.choose_backend = choose_triton
    try:
        yield
    finally:
        _dispatch.choose_backend = choose


def record_op_calls(models: Sequence[str], dtypes: Sequence[torch.dtype], batch: int) -> Dict[OpCall, set]:
    """Distinct Triton-module calls of one training step of each model, and the models making them."""
    calls: Dict[OpCall, set] = {}
    with _launches_suppressed():
        for name in models:
            with torch.device("meta"):
                model = timm.create_model(name)
            model.train()
            size = model.pretrained_cfg["input_size"]
            for dtype in dtypes:
                model.to(dtype)
                x = torch.randn(batch, *size, device="meta", dtype=dtype)
                with _recording(calls, name):
                    model(x).sum().backward()
    return calls


# ----------------------------------------------------------------------------- 2. launches (CPU)

@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict


def _kernels() -> List[JITFunction]:
    """Every ``@triton.jit`` function of the ops' Triton modules (kernels and helpers alike)."""
    out = []
    for op in OPS:
        module = importlib.import_module(f"attnzoo.ops.{op}.triton")
        out += [v for v in vars(module).values() if isinstance(v, JITFunction) and v.__module__ == module.__name__]
    return out


def launched_kernels() -> List[JITFunction]:
    """Those called from the host: the ones that read ``tl.program_id``."""
    return [k for k in _kernels() if "tl.program_id" in k.src]


@contextlib.contextmanager
def _launches_suppressed(sink: Optional[List[Launch]] = None):
    """Every kernel's ``run`` (what ``kernel[grid](...)`` calls) records instead of launching."""

    def run(self, *args, grid, warmup, **kwargs):
        if sink is not None:
            sink.append(Launch(self, args, kwargs))

    kernels = _kernels()
    for k in kernels:
        k.run = types.MethodType(run, k)
    try:
        yield
    finally:
        for k in kernels:
            del k.run


def capture_launches(call: OpCall) -> List[Launch]:
    """The kernel launches of ``call``, forward and (where an input needs a gradient) backward."""
    sink: List[Launch] = []
    fn = getattr(importlib.import_module(call.module), call.fn)
    with _launches_suppressed(sink):
        args = _make(call.args)
        out = fn(*args)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward(torch.zeros_like(out))
    return sink


# ----------------------------------------------------------------------------- 3. compile

@dataclasses.dataclass
class Spec:
    """A launch specialised for one target, as ``JITFunction.run`` would compile it."""
    kernel: JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    def key(self):
        declared = {p.name for p in self.kernel.params if p.is_constexpr}
        ptrs = tuple(v for v in self.signature.values() if isinstance(v, str) and v.startswith("*"))
        return (self.kernel.__name__, self.kernel.__module__, self.arch, ptrs, self.config(declared),
                self.options.num_warps, self.options.num_stages)

    def config(self, declared=None) -> str:
        """Declared constexprs (``NAME=value``; True flags by name; False flags, the accumulator
        dtype and, for half inputs, the fp32 matmul precision left out), then the int arguments
        Triton specialised to 1. Absent (None) pointers show in the flags that guard them."""
        names = self.kernel.arg_names
        declared = declared or {p.name for p in self.kernel.params if p.is_constexpr}
        half = any(v in ("*fp16", "*bf16") for v in self.signature.values())
        parts, ones = [], []
        for (i,), v in sorted(self.constexprs.items()):
            name = names[i]
            if v is None or v is False or name in ("ACC", "UPCAST") or (half and name == "PREC"):
                continue
            if name not in declared:
                ones.append(f"{name}={v}")
            else:
                parts.append(name if v is True else f"{name}={v}")
        return " ".join(parts + ones)


def specialize(launch: Launch, arch: int) -> Spec:
    """Signature, constexprs and attributes of ``launch`` for ``arch``, by Triton's own binder."""
    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Spec(fn, arch, signature, constexprs, attrs, options)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^,]*, (#\w+)")


def _cuobjdump(*args) -> str:
    return subprocess.run([str(_BIN / "cuobjdump"), *args], capture_output=True, text=True, check=True).stdout


def _ptxas_spills(ptx: str, spec: Spec) -> int:
    """Bytes of spill stores ptxas reports for ``ptx``, assembled as Triton assembles it."""
    ptxas = get_ptxas(spec.arch).path
    fmad = [] if spec.options.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", *fmad,
                               f"--gpu-name={sm_arch_from_capability(spec.arch)}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return sum(map(int, spills)) if proc.returncode == 0 and spills else -1  # -1: unknown, counted as a spill


@contextlib.contextmanager
def ptxas_timeout(seconds: int):
    """Triton's ptxas behind ``timeout``: a kernel ptxas grinds on for minutes (FMA dots it
    unrolls into tens of thousands of instructions) fails its row instead of stalling the run."""
    real = get_ptxas(80).path
    with tempfile.TemporaryDirectory() as d:
        wrapper = Path(d) / "ptxas"
        wrapper.write_text(f'#!/bin/sh\nexec timeout -k 5 {seconds} "{real}" "$@"\n')
        wrapper.chmod(0o755)
        old = os.environ.get("TRITON_PTXAS_PATH")
        os.environ["TRITON_PTXAS_PATH"] = str(wrapper)
        try:
            yield
        finally:
            if old is None:
                del os.environ["TRITON_PTXAS_PATH"]
            else:
                os.environ["TRITON_PTXAS_PATH"] = old


def compile_spec(spec: Spec) -> dict:
    """Compile ``spec`` and read its resources; a dict of the table's measured columns."""
    target = GPUTarget("cuda", spec.arch, 32)
    try:
        # Triton prints the whole PTX when ptxas fails: the table owns stdout
        with contextlib.redirect_stdout(io.StringIO()):
            k = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                               target=target, options=spec.options.__dict__)
    except Exception as e:  # the row says why; the run fails at the end
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return dict(status="ptxas timed out" if "error code 124" in msg else "compile failed: " + msg)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        reg, stack, static_smem, local = map(int, _RES.search(_cuobjdump("--dump-resource-usage", f.name)).groups())
        sass = _cuobjdump("-sass", f.name)
    # a stack frame is not always a spill (a dynamically indexed array also lives there): ptxas tells
    spill = _ptxas_spills(k.asm["ptx"], spec) if stack + local else 0
    # a dot is on tensor cores when its result has an MMA layout (wgmma on sm_90: warp_group_dot)
    dots = [(op == "ttng.warp_group_dot" or enc.startswith("#mma")) for op, enc in _DOT.findall(k.asm["ttgir"])]
    mma = sorted({m.split(".")[0] for m in re.findall(r"\b(H?GMMA\.\S+|HMMA\.\S+)", sass)})
    threads = spec.options.num_warps * 32
    row = dict(regs=reg, spill_b=spill, stack_b=stack + local, smem_b=k.metadata.shared + static_smem,
               tc_dots=f"{sum(dots)}/{len(dots)}" if dots else "-", sass_mma=" ".join(mma) or "-")
    problems = []
    if spill:
        problems.append("spill")
    if row["smem_b"] > SMEM_LIMIT.get(spec.arch, 48 * 1024):
        problems.append(f"smem>{SMEM_LIMIT.get(spec.arch, 48 * 1024) // 1024}K")
    if reg * threads > REGS_PER_SM:
        problems.append("regs>SM")
    row["status"] = " ".join(problems) or "ok"
    row["no_tc"] = bool(dots) and not any(dots)
    return row


# ----------------------------------------------------------------------------- driver

def _family(model: str) -> str:
    return timm.models.model_entrypoint(model).__module__.rsplit(".", 1)[-1]


def _dtype_name(spec: Spec) -> str:
    ptr = next(v for v in spec.signature.values() if isinstance(v, str) and v.startswith("*"))
    return {"*fp32": "float32", "*fp16": "float16", "*bf16": "bfloat16", "*fp64": "float64"}.get(ptr, ptr[1:])


_SPECS: List[Spec] = []  # what the forked compile workers read


def _compile_nth(i: int) -> dict:
    return compile_spec(_SPECS[i])


def build_matrix(models, dtypes, archs, batch, quick=False, jobs=1, log=print) -> List[dict]:
    t0 = time.time()
    calls = record_op_calls(models, dtypes, batch)
    log(f"{len(calls)} distinct op calls from {len(models)} models ({time.time() - t0:.0f} s)")
    found: Dict[tuple, tuple] = {}  # key -> (spec, models)
    for call, users in calls.items():
        for launch in capture_launches(call):
            for arch in archs:
                spec = specialize(launch, arch)
                key = spec.key()[:4] if quick else spec.key()  # quick: the first launch per kernel and dtype
                _, seen = found.setdefault(key, (spec, set()))
                seen |= users
    entries = sorted(found.values(), key=lambda e: e[0].key())
    log(f"{len(entries)} specializations to compile ({time.time() - t0:.0f} s)")
    _SPECS[:] = [spec for spec, _ in entries]
    if jobs > 1:  # forked workers: the specs hold kernels, which do not pickle
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_compile_nth, range(len(_SPECS)))
    else:
        pool, results = None, map(_compile_nth, range(len(_SPECS)))
    rows = []
    try:
        for i, ((spec, users), measured) in enumerate(zip(entries, results)):
            op = spec.kernel.__module__.split(".")[-2]
            row = dict(kernel=f"{op}.{spec.kernel.__name__.lstrip('_')}", arch=f"sm_{spec.arch}",
                       dtype=_dtype_name(spec), config=spec.config(), warps=spec.options.num_warps,
                       stages=spec.options.num_stages, models=" ".join(sorted({_family(m) for m in users})))
            row.update(measured)
            rows.append(row)
            if row["status"] != "ok":
                log(f"  FAIL {row['kernel']} {row['arch']} {row['dtype']} [{row['config']}]: {row['status']}")
            if (i + 1) % 25 == 0:
                log(f"  compiled {i + 1}/{len(entries)} ({time.time() - t0:.0f} s)")
    finally:
        if pool is not None:
            pool.terminate()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--models", nargs="+", default=None, help="default: every paper model (--quick: one per op)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default: all three (--quick: float16)")
    p.add_argument("--batch", type=int, default=2,
                   help="batch of the recorded step (grids depend on it, and neighborhood's RPB_SLOTS = "
                        "min(16, programs per head))")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls, as the launchers then choose")
    p.add_argument("--quick", action="store_true",
                   help=f"models {' '.join(QUICK_MODELS)}, float16, the first launch of each kernel only")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many forked processes")
    p.add_argument("--ptxas-timeout", type=int, default=180, help="seconds before one ptxas run counts as failed")
    p.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    p.add_argument("--out", default=None, help="also write the rows (.csv or .json)")
    return p.parse_args(argv)


SUMMARY_COLUMNS = ["kernel", "arch", "dtype", "specs", "warps", "max_regs", "max_smem_kb", "tc_dots", "failing"]


def summarize(rows: Sequence[dict]) -> List[dict]:
    """One row per kernel, arch and dtype: the worst case over its specializations."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    out = []
    for (kernel, arch, dtype), rs in groups.items():
        ok = [r for r in rs if "regs" in r]
        out.append(dict(kernel=kernel, arch=arch, dtype=dtype, specs=len(rs),
                        warps=" ".join(sorted({str(r["warps"]) for r in rs})),
                        max_regs=max((int(r["regs"]) for r in ok), default=None),
                        max_smem_kb=max((int(r["smem_b"]) for r in ok), default=0) / 1024,
                        tc_dots=" ".join(sorted({r["tc_dots"] for r in ok})) or "-",
                        failing=sum(r["status"] != "ok" for r in rs)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    models = args.models or (list(QUICK_MODELS) if args.quick else
                             [m for m in attnzoo.list_models() if not m.startswith("test_")])
    for m in models:
        C.check_model_name(m)
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float16"] if args.quick else list(DTYPES)))]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  (the table alone goes to stdout)
    t0 = time.time()
    with ptxas_timeout(args.ptxas_timeout):
        rows = build_matrix(models, dtypes, args.arch, args.batch, args.quick, args.jobs, log)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["config"]))
    print(C.format_table(rows, COLUMNS, markdown=args.markdown))
    print()
    print(C.format_table(summarize(rows), SUMMARY_COLUMNS, markdown=args.markdown, digits=1))
    if args.out:
        C.write_rows(args.out, rows, COLUMNS + ["no_tc"])
    bad = [r for r in rows if r["status"] != "ok"]
    launched = {r["kernel"] for r in rows}
    missing = sorted(f"{k.__module__.split('.')[-2]}.{k.__name__.lstrip('_')}" for k in launched_kernels()
                     if f"{k.__module__.split('.')[-2]}.{k.__name__.lstrip('_')}" not in launched)
    no_tc = sorted({r["kernel"] for r in rows if r.get("no_tc") and r["dtype"] in ("float16", "bfloat16")})
    print(f"\n{len(rows)} specializations of {len(launched)} kernels, sm {' '.join(map(str, args.arch))}, "
          f"{len(models)} models, {' '.join(str(d).replace('torch.', '') for d in dtypes)}, "
          f"triton {triton.__version__}, {time.time() - t0:.0f} s: "
          f"{len(bad)} failing (compile / spill / shared memory / registers)")
    if missing:
        print("kernels no model launched: " + " ".join(missing))
    if no_tc:
        print("no tensor-core dot for half inputs: " + " ".join(no_tc))
    for r in bad:
        print(f"FAIL {r['kernel']} {r['arch']} {r['dtype']} [{r['config']}]: {r['status']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
