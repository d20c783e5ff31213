#!/usr/bin/env python3
"""Export a model to ONNX and check onnxruntime's output against torch's.

    python tools/export_onnx.py --model dinat_tiny                     # output/onnx/dinat_tiny.onnx
    python tools/export_onnx.py --model test_nat --img-size 64 --out /tmp/nat.onnx
    python tools/export_onnx.py --model cbam_resnet50 --opset 18 --dynamo

The batch axis is always dynamic. Height and width are exported dynamic too, then
checked at other sizes (larger, odd, and smaller where >= 64 px): a model whose graph
bakes the input size in (the neighborhood reference's index tables are computed in
Python from the map size, and layers pad small maps in Python) fails that check and is
re-exported with a fixed size.
The ops' fast backends (custom autograd Functions, Triton) cannot be traced; while an
export runs, ``attnzoo.ops._dispatch`` routes every op to its plain-torch reference.

Exporter: the TorchScript tracer (fast). If its graph cannot be exported or fails a check
even with a fixed size (traced ``-(-H // n)`` becomes ONNX's truncating Div; adaptive
pooling of a map whose batch is dynamic), the model is exported again with the
torch.export-based exporter (opset >= 18), which keeps Python's shape semantics, with H
and W fixed (``--dynamo`` tries them dynamic).

Parity: ``max |ort - torch| / max |torch|`` over the logits of each checked input,
which must be <= ``--tol`` (1e-4). Without ``--checkpoint`` the random init is perturbed
first (``perturb``): zero-initialised residual gammas, layer scales of 1e-5 and zero
biases would otherwise switch whole branches off and let a broken export pass.
"""
import argparse
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _common as C  # noqa: E402

COLUMNS = ["check", "input", "max_abs_err", "max_rel_err", "ok"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, default=None, help="default: the model's pretrained_cfg input size")
    p.add_argument("--batch-size", "-b", type=int, default=2, help="batch of the example input")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="weights to export (safetensors / .pth, read safely)")
    p.add_argument("--no-perturb", action="store_true", help="export the random init as it is")
    p.add_argument("--opset", type=int, default=17, help="at least 18 with the dynamo exporter")
    p.add_argument("--out", default=None, help="default: output/onnx/<model>.onnx")
    p.add_argument("--static-size", action="store_true", help="fix H and W (the batch stays dynamic)")
    p.add_argument("--dynamo", action="store_true",
                   help="torch.export-based exporter (slower; default: the TorchScript tracer, then this "
                        "exporter if the tracer's graph fails)")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def perturb(model, seed=0, scale=0.1):
    """Give every constant-initialised tensor (zero gammas, unit gammas, 1e-5 layer scales,
    zero biases, BN running statistics) random values, so no branch is switched off."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.numel() == 0 or (t.numel() > 1 and t.min() != t.max()):
            continue
        noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
        if name.endswith("running_var"):
            t.mul_(1 + scale * noise.abs())
        else:
            t.add_(scale * noise)
    return model


def export(model, x, path, opset=17, dynamic_hw=True, dynamo=False):
    """Export ``model`` on example ``x`` with a dynamic batch (and H, W when ``dynamic_hw``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the tracer warns at every Python-side shape check; the numeric checks below are what count
        warnings.simplefilter("ignore")
        if dynamo:
            from torch.export import Dim
            # its translations start at opset 18; converting down fails (Pad has no adapter to 17)
            opset = max(opset, 18)
            axes = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC} if dynamic_hw else {0: Dim.DYNAMIC}
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                     output_names=["output"], dynamic_shapes=(axes,))
            prog.save(str(path))
        else:
            axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": axes, "output": {0: "batch"}})
    import onnx
    onnx.checker.check_model(str(path))
    return path


def compare(model, session, x):
    """(max abs error, max relative error) of onnxruntime against torch on ``x``."""
    with torch.no_grad():
        ref = model(x).numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if out.shape != ref.shape:
        raise RuntimeError(f"onnxruntime output shape {out.shape} != torch's {ref.shape}")
    err = float(np.abs(out - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-12)


def _first_line(e: Exception) -> str:
    line = (str(e).splitlines() or [""])[0]
    status = line.partition("Status Message: ")[2]  # onnxruntime's own reason, without its preamble
    return f"onnxruntime: {status[:160]}" if status else f"{type(e).__name__}: {line[:200]}"


def _session(path):
    import onnxruntime as ort
    # A probe at a size the graph baked in fails by design and is reported in the table; ORT
    # would also print it as a red error line (severity 3), which reads like a failed export.
    ort.set_default_logger_severity(4)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    threads = torch.get_num_threads()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check(model, session, name, shape, tol):
    x = torch.randn(*shape)
    row = dict(check=name, input="x".join(map(str, shape)))
    try:
        abs_err, rel_err = compare(model, session, x)
    except Exception as e:  # onnxruntime rejects a baked-in size with an index / reshape error
        return dict(row, max_abs_err=float("nan"), max_rel_err=float("nan"), ok=False, error=_first_line(e))
    return dict(row, max_abs_err=abs_err, max_rel_err=rel_err, ok=rel_err <= tol)


def run(args):
    """Export and check; returns a summary dict (``ok``: every check passed)."""
    torch.manual_seed(args.seed)
    size = args.img_size or C.default_img_size(args.model)
    kw = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model = C.create_model(args.model, img_size=size, **kw).eval()
    if args.checkpoint:
        C.load_weights(model, C.load_state_dict_file(args.checkpoint), args.model)
    elif not args.no_perturb:
        perturb(model, args.seed)
    out = Path(args.out or os.path.join("output", "onnx", f"{args.model}.onnx"))
    B = args.batch_size
    x = torch.randn(B, 3, size, size)
    # other sizes with H != W, one of them odd (padding paths), to catch a graph that baked the size in
    others = [(size + 32, size + 16), (size + 13, size + 7)]
    if size - 31 >= 64:  # and a smaller one: Python-side padding of small maps is baked in too
        others.append((size - 31, size - 17))

    def attempt(dynamic_hw, dynamo):
        """Export, then check: (export seconds, rows); an exporter error raises."""
        t0 = time.perf_counter()
        export(model, x, out, args.opset, dynamic_hw, dynamo)
        seconds = time.perf_counter() - t0
        session = _session(out)
        shapes = [("export input", (B, 3, size, size)), ("dynamic batch", (B + 1, 3, size, size))]
        shapes += [("dynamic H/W", (1, 3) + o) for o in others] if dynamic_hw else []
        return seconds, [_check(model, session, name, shape, args.tol) for name, shape in shapes]

    def first_problem(rows):
        bad = next((r for r in rows if not r["ok"]), None)
        if bad is None:
            return None
        where = "×".join(bad["input"].split("x")[2:]) if bad["check"] == "dynamic H/W" else bad["input"]
        return f"at {where}: " + bad.get("error", f"max rel err {bad['max_rel_err']:.2e}")

    def export_and_check(dynamo, static_size=args.static_size):
        """Dynamic H/W if that exports and passes every check, else fixed: (dynamic_hw, seconds, rows, notes)."""
        notes = []
        if not static_size:
            try:
                seconds, rows = attempt(True, dynamo)
                problem = first_problem(rows)
                if problem is None:
                    return True, seconds, rows, notes
                # the graph holds the export size somewhere, or traced shape arithmetic differs
                # from Python's (ONNX integer Div truncates where Python's // floors)
                notes.append(f"dynamic H/W graph failed {problem}; re-exported with fixed H/W {size}×{size}")
            except Exception as e:  # e.g. the TorchScript exporter cannot size adaptive pooling of a dynamic map
                notes.append(f"dynamic H/W export failed ({_first_line(e)}); re-exported with fixed H/W {size}×{size}")
        seconds, rows = attempt(False, dynamo)
        return False, seconds, rows, notes

    dynamo = args.dynamo
    try:
        dynamic_hw, export_s, rows, notes = export_and_check(dynamo)
        problem = first_problem(rows)
    except Exception as e:
        if dynamo:
            raise
        problem = f"export failed: {_first_line(e)}"
    if problem is not None and not dynamo:
        # what the tracer cannot express (shape arithmetic, adaptive pooling of a map of unknown
        # size), torch.export's symbolic shapes usually can: slower, but it exports
        dynamo = True
        tracer_problem = f"TorchScript exporter: {problem}; re-exported with the dynamo exporter, fixed H/W {size}×{size}"
        # fixed H/W straight away: each dynamo export costs minutes on CPU (--dynamo tries dynamic)
        dynamic_hw, export_s, rows, notes = export_and_check(True, static_size=True)
        notes.insert(0, tracer_problem)
    note = "\n  ".join(notes)
    import onnx
    opset = min(o.version for o in onnx.load(str(out), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx"))
    return dict(model=args.model, path=str(out), opset=opset, exporter="dynamo" if dynamo else "torchscript",
                img_size=size, dynamic_batch=True, dynamic_hw=dynamic_hw, note=note, export_s=export_s,
                max_rel_err=max(r["max_rel_err"] for r in rows), ok=all(r["ok"] for r in rows), checks=rows)


def main(argv=None):
    args = parse_args(argv)
    C.check_model_name(args.model)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    s = run(args)
    print(f"{s['model']}: {s['path']} (opset {s['opset']}, {s['exporter']} exporter, {s['export_s']:.1f} s), "
          f"dynamic batch: yes, dynamic H/W: {'yes' if s['dynamic_hw'] else 'no'}")
    if s["note"]:
        print(f"  {s['note']}")
    print(C.format_table(s["checks"], COLUMNS))
    print(f"{'PASS' if s['ok'] else 'FAIL'}: max relative error {s['max_rel_err']:.2e} (tolerance {args.tol:g})")
    if not s["ok"]:
        raise SystemExit(1)
    return s


if __name__ == "__main__":
    main()
