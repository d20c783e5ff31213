#!/usr/bin/env python3
"""One table across the families at the ~4.5 GMAC tier, with timm's Swin-T and ConvNeXt-T as peers.

    python tools/compare.py                                   # CPU (GPU when present), 224 and 512 px
    python tools/compare.py --device cuda --batch-size 64 --steps 20
    python tools/compare.py --sizes 224 320 384 512 --models dinat_tiny convnext_tiny
    python tools/compare.py --quick --models test_nat test_cbam_resnet --sizes 64 96   # smoke test

Columns: params, GMACs at each size (FlopCounterMode FLOPs / 2 on the reference backend, the
unit papers call "FLOPs"), inference and training images/s at each size, the peak memory of
one training step at each size (``tools/benchmark.py``'s measurement), and the paper's
ImageNet-1k top-1. Timing and memory reuse ``tools/benchmark.py`` (``Bench``, ``gmacs``,
``interleaved``). A model that is not registered (a family not merged yet) is listed as
missing; one that fails is listed with its error; neither stops the run.

Writes ``<out-dir>/compare.csv``, ``compare.md`` (the table, device and command) and
``compare.png`` (images/s against resolution, one line per family, inference and training).
"""
import argparse
import datetime
import math
import platform
import re
import sys
import time
import types
from pathlib import Path

import timm
import torch

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _common as C  # noqa: E402
from tools import benchmark as B  # noqa: E402  (Bench, gmacs, interleaved: one timing method for every tool)

ROOT = Path(__file__).resolve().parent.parent

# the ~4.5 GMAC tier: (model, family label); order = table order
TIER = [
    ("dinat_tiny", "DiNAT"),
    ("biformer_small", "BiFormer"),
    ("agent_swin_tiny", "Agent-Swin"),
    ("mala_small", "MALA"),
    ("attn_halonet50ts", "HaloNet"),
    ("cbam_resnet50", "CBAM-ResNet"),
    ("eca_resnet50", "ECA-ResNet"),
    ("swin_tiny_patch4_window7_224", "Swin (timm)"),
    ("convnext_tiny", "ConvNeXt (timm)"),
]

# Paper ImageNet-1k top-1 for models whose family docs (docs/MODELS.md, read first) do not list it:
# the timm peers, and families still being merged.
PAPER_TOP1 = {
    "swin_tiny_patch4_window7_224": 81.2,  # Liu et al. 2021, Table 1(a)
    "convnext_tiny": 82.1,  # Liu et al. 2022, Table 1
    "biformer_small": 83.8,  # Zhu et al. 2023, Table 1
    "agent_swin_tiny": 82.6,  # Han et al. 2024, Table 1
}



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--models", nargs="+", default=[m for m, _ in TIER])
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    p.add_argument("--batch-size", "-b", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model, size and mode (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=C.default_device(), choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--no-timing", action="store_true", help="params, GMACs and paper top-1 only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 1, 1 step, no warmup")
    p.add_argument("--out-dir", default=str(Path("output") / "compare"))
    return p.parse_args(argv)


def paper_top1(name):
    """The "paper top-1" column of the model's row in docs/MODELS.md, else ``PAPER_TOP1``."""
    docs = ROOT / "docs" / "MODELS.md"
    if docs.is_file():
        header = None
        for line in docs.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
            if not cells:
                header = None
                continue
            if cells[0] == "model":
                header = cells
            elif header and cells[0] == name:
                col = next((i for i, h in enumerate(header) if "top-1" in h), None)
                m = re.match(r"\s*(\d+(?:\.\d+)?)", cells[col]) if col is not None and col < len(cells) else None
                if m:
                    return float(m.group(1))
    return PAPER_TOP1.get(name)


def _bench_args(args, size):
    return types.SimpleNamespace(img_size=size, num_classes=None, batch_size=args.batch_size, device=args.device,
                                 channels_last=args.channels_last, amp=args.amp, warmup=args.warmup,
                                 steps=args.steps)


def measure(name, family, args):
    """One row: params, GMACs and, per size, images/s and training peak memory."""
    row = dict(model=name, family=family, top1_paper=paper_top1(name), status="ok")
    if not timm.is_model(name):
        row["status"] = "missing (not registered yet)"
        return row
    try:
        for size in args.sizes:
            bench = B.Bench(name, _bench_args(args, size))
            if "params_m" not in row:
                row["params_m"] = bench.params / 1e6
            row[f"gmacs_{size}"] = bench.gmacs
            if args.no_timing:
                continue
            ba = _bench_args(args, size)
            row[f"infer_{size}"] = args.batch_size / B.interleaved([bench], "infer", ba)[0]
            if not args.no_train:
                row[f"train_{size}"] = args.batch_size / B.interleaved([bench], "train", ba)[0]
                if not args.no_memory:
                    row[f"mem_{size}_mb"] = bench.train_peak_mb()
            del bench
    except Exception as e:  # one broken model must not cost the others' numbers
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def columns_for(args, rows):
    cols = ["model", "family", "params_m"] + [f"gmacs_{s}" for s in args.sizes]
    if args.no_timing:
        return cols + ["top1_paper", "status"]
    for s in args.sizes:
        cols.append(f"infer_{s}")
        if not args.no_train:
            cols.append(f"train_{s}")
    if not (args.no_train or args.no_memory):
        cols += [f"mem_{s}_mb" for s in args.sizes]
    return cols + ["top1_paper", "status"]


def plot(rows, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = ["infer"] + ([] if args.no_train else ["train"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for r in rows:
            pts = [(s, r.get(f"{mode}_{s}")) for s in args.sizes]
            pts = [(s, v) for s, v in pts if v is not None and not math.isnan(v)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=r["family"])
        ax.set_xlabel("input resolution (px)")
        ax.set_ylabel("images / s")
        ax.set_yscale("log")
        # plain numbers on the log axis ("3", not "3x10^0")
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xticks(args.sizes)
        ax.set_title(f"{'inference' if mode == 'infer' else 'training'}: batch {args.batch_size}, "
                     f"{args.device}, {args.warmup} warmup + {args.steps} timed step{'s' * (args.steps != 1)} "
                     f"(median)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def device_name(args):
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup = 1, 1, 0
    if args.batch_size is None:
        args.batch_size = 32 if args.device == "cuda" else 8
    C.check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = dict(TIER)
    device = device_name(args)
    print(f"{device}, batch {args.batch_size}, sizes {args.sizes}, {args.warmup} warmup + {args.steps} timed steps",
          flush=True)
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        print(f"  {name} ...", flush=True)
        rows.append(measure(name, families.get(name, name), args))
        if rows[-1]["status"] != "ok":
            print(f"    {rows[-1]['status']}", flush=True)
    cols = columns_for(args, rows)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    C.write_rows(out / "compare.csv", rows, cols)
    table = C.format_table(rows, cols, markdown=True)
    cmd = "python tools/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(out / "compare.md", "w") as f:
        f.write(f"Device: {device}; torch {torch.__version__}, timm {timm.__version__}; "
                f"{datetime.date.today()}; batch {args.batch_size}, {args.warmup} warmup + {args.steps} timed "
                f"steps (median).\n\nCommand: `{cmd.strip()}`\n\n"
                "GMACs = FlopCounterMode FLOPs / 2 (multiply-accumulates, the papers' \"FLOPs\"); "
                "infer / train = images/s at that input size; mem = peak MB of one training step.\n\n")
        f.write(table + "\n")
    if not args.no_timing:
        plot(rows, args, out / "compare.png")
    print()
    print(table)
    print(f"\n{time.perf_counter() - t0:.0f} s; results in {out}: compare.csv, compare.md"
          + ("" if args.no_timing else ", compare.png"))
    return rows


if __name__ == "__main__":
    main()
