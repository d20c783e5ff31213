#!/usr/bin/env python3
"""Compact classification trainer on timm's optimizers, schedulers and transforms.

With no arguments it trains cbam_resnet18 on scikit-learn's handwritten digits
(bundled, no download) to ~99% val top-1 in about a minute on 2 CPU cores:

    python tools/train.py
    python tools/train.py --model eca_resnet18 --epochs 20
    python tools/train.py --model cbam_resnet50 --data-dir /data/imagenette --img-size 160 --epochs 40

Writes to --output (default output/train/<model>): checkpoint.safetensors (state_dict,
with model/num_classes/img_size in its metadata, which validate.py --checkpoint reads),
args.json, metrics.csv, curves.png and summary.json.
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported by path (tests)
import _common as C  # noqa: E402  (also puts a source checkout's attnzoo on the path)
import attnzoo  # noqa: E402,F401  (registers our models with timm)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "-m", default="cbam_resnet18", help="attnzoo or timm model name")
    p.add_argument("--data-dir", default=None,
                   help="ImageFolder root with train/ and val/ class subfolders (default: embedded digits)")
    p.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    p.add_argument("--img-size", type=int, default=None, help="default: 32 for digits, the model's size otherwise")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--opt", default="adamw", help="timm optimizer (create_optimizer_v2)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd-like optimizers")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--sched", default="cosine", help="timm scheduler (create_scheduler_v2)")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--hflip", type=float, default=None, help="default: 0 for digits (flips change digits), 0.5 else")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use a random subset of N train and N val images")
    p.add_argument("--output", default=None, help="default: output/train/<model>")
    p.add_argument("--workers", "-j", type=int, default=None,
                   help="loader processes (default: 0 for in-memory digits, min(4, cpus) else)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle physical cores)")
    p.add_argument("--device", default=C.default_device())
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(args):
    """Datasets without transforms yet (the model, built once its class count is known, supplies them)."""
    if args.data_dir is None:
        train_ds, val_ds = C.DigitsDataset("train"), C.DigitsDataset("val")
    else:
        train_ds = C.SafeImageFolder(C.split_dir(args.data_dir, "train"))
        val_ds = C.SafeImageFolder(C.split_dir(args.data_dir, "val"), class_to_idx=train_ds.class_to_idx)
    return train_ds, val_ds


def set_transforms(args, model, train_ds, val_ds):
    """timm transforms resolved from the model's pretrained_cfg (mean/std/interpolation) at --img-size."""
    digits = args.data_dir is None
    cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    hflip = args.hflip if args.hflip is not None else (0.0 if digits else 0.5)
    # digits: mild crops (the digit fills the frame), no colour jitter; folders: timm's ImageNet recipe
    train_ds.transform = create_transform(
        cfg["input_size"], is_training=True, hflip=hflip, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"],
        **(dict(scale=(0.7, 1.0), ratio=(0.9, 1.1), color_jitter=None) if digits else {}))
    cfg["crop_pct"] = 1.0 if digits else cfg["crop_pct"]
    val_ds.transform = create_transform(
        cfg["input_size"], is_training=False, interpolation=cfg["interpolation"], mean=cfg["mean"],
        std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"))
    return cfg


def plot_curves(rows, path, title, smoothing=0.0):
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    # label smoothing puts a floor under the train loss; val loss is plain cross-entropy
    a.plot(ep, [r["train_loss"] for r in rows], label=f"train (smoothing {smoothing})" if smoothing else "train")
    a.plot(ep, [r["val_loss"] for r in rows], label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_top1"] for r in rows], label="train top-1")
    b.plot(ep, [r["val_top1"] for r in rows], label="val top-1")
    if rows[0].get("val_top5") is not None:
        b.plot(ep, [r["val_top5"] for r in rows], label="val top-5")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    C.check_model_name(args.model)
    threads = C.ThreadPicker(args.threads)
    seed_everything(args.seed)
    digits = args.data_dir is None
    if args.workers is None:
        args.workers = 0 if digits else min(4, os.cpu_count() or 1)
    out = Path(args.output or os.path.join("output", "train", args.model))
    out.mkdir(parents=True, exist_ok=True)

    train_ds, val_ds = build_data(args)
    classes = train_ds.classes
    if args.num_classes is None:
        args.num_classes = len(classes)
    elif args.num_classes < len(classes):
        raise SystemExit(f"error: --num-classes {args.num_classes} < {len(classes)} classes in the data")
    if args.img_size is None:
        args.img_size = C.DIGITS_SIZE if digits else C.default_img_size(args.model)
    model = C.create_model(args.model, img_size=args.img_size, num_classes=args.num_classes).to(args.device)
    data_cfg = set_transforms(args, model, train_ds, val_ds)
    if args.limit:
        g = torch.Generator().manual_seed(args.seed)
        train_ds = Subset(train_ds, torch.randperm(len(train_ds), generator=g)[:args.limit].tolist())
        val_ds = Subset(val_ds, torch.randperm(len(val_ds), generator=g)[:args.limit].tolist())

    g = torch.Generator().manual_seed(args.seed)
    loader_kw = dict(num_workers=args.workers, collate_fn=C.collate_skip, persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=True, drop_last=len(train_ds) > args.batch_size,
                              generator=g, **loader_kw)  # drop_last: no 1-image BatchNorm batches
    val_loader = DataLoader(val_ds, args.batch_size * 2, shuffle=False, **loader_kw)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    meta = dict(vars(args), model=args.model, num_classes=args.num_classes, img_size=args.img_size,
                dataset="digits" if digits else "folder", classes=list(classes),
                mean=list(data_cfg["mean"]), std=list(data_cfg["std"]), interpolation=data_cfg["interpolation"],
                crop_pct=data_cfg["crop_pct"])
    with open(out / "args.json", "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{args.model}: {C.count_params(model) / 1e6:.2f}M params | {len(train_ds)} train / {len(val_ds)} val "
          f"images, {args.num_classes} classes, {args.img_size}px | {args.opt} lr {args.lr} {args.sched} "
          f"x {num_epochs} epochs | {torch.get_num_threads()} threads on {args.device} | -> {out}")

    rows, start, updates = [], time.perf_counter(), 0
    for epoch in range(num_epochs):
        model.train()
        t0, loss_sum, correct, seen, skipped = time.perf_counter(), 0.0, 0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False,
                   disable=args.no_progress, dynamic_ncols=True)
        for x, y, bad in bar:
            skipped += len(bad)
            if x is None:
                continue
            x, y = x.to(args.device), y.to(args.device)
            logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            loss_sum += loss.item() * y.numel()
            correct += logits.argmax(1).eq(y).sum().item()
            seen += y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        scheduler.step(epoch + 1)
        train_s = time.perf_counter() - t0
        ev = C.evaluate(model, val_loader, args.device, progress=not args.no_progress, desc="val")
        rows.append(dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=loss_sum / max(seen, 1),
                         train_top1=100.0 * correct / max(seen, 1), val_loss=ev["loss"], val_top1=ev["top1"],
                         val_top5=ev["top5"], skipped=skipped + ev["skipped"], epoch_s=train_s + ev["seconds"],
                         threads=torch.get_num_threads()))
        threads.update()  # neighbours may have come or gone during the epoch
        tqdm.write(f"epoch {epoch + 1:3d}/{num_epochs}  train loss {rows[-1]['train_loss']:.4f}  "
                   f"val loss {ev['loss']:.4f}  val top-1 {ev['top1']:6.2f}  ({rows[-1]['epoch_s']:.1f}s)")
        # every epoch: an interrupted run still leaves a usable checkpoint and curves
        C.save_checkpoint(out / "checkpoint.safetensors", model, dict(meta, epoch=epoch + 1, val_top1=ev["top1"]))
        C.write_rows(out / "metrics.csv", rows)
        plot_curves(rows, out / "curves.png", args.model, args.smoothing)

    wall = time.perf_counter() - start
    last = rows[-1]
    summary = dict(model=args.model, params_m=C.count_params(model) / 1e6, epochs=num_epochs,
                   img_size=args.img_size, val_top1=last["val_top1"], val_top5=last["val_top5"],
                   best_top1=max(r["val_top1"] for r in rows), val_loss=last["val_loss"], train_s=wall,
                   checkpoint=str(out / "checkpoint.safetensors"))
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(C.format_table(rows, ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                                "epoch_s", "threads"]))
    print()
    print(C.format_table([summary], ["model", "params_m", "epochs", "img_size", "val_top1", "val_top5",
                                     "best_top1", "train_s"]))
    print(f"\ncheckpoint: {summary['checkpoint']}  (python tools/validate.py --checkpoint {summary['checkpoint']})")
    return summary


if __name__ == "__main__":
    main()
