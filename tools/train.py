#!/usr/bin/env python3
"""Classification trainer on timm's optimizers, schedulers, transforms, Mixup and EMA.

With no arguments it trains cbam_resnet18 on scikit-learn's handwritten digits
(bundled, no download) to ~99% val top-1 in about a minute on 2 CPU cores:

    python tools/train.py
    python tools/train.py --model eca_resnet18 --epochs 20 --aug albumentations --model-ema
    python tools/train.py --model cbam_resnet50 --data-dir /data/imagenette --img-size 160 --epochs 40 \\
        --aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 --amp --channels-last
    torchrun --nproc_per_node 2 tools/train.py --model test_nat     # DDP: gloo on CPU, nccl on GPU
    python tools/train.py --resume                                  # continue output/train/<model>/last.pth
    python tools/train.py --model nat_mini.in1k --pretrained --data-dir /data/flowers  # fine-tune, new head

--batch-size is per process; one optimizer step sees batch-size x processes x --grad-accum
images. Writes to --output (default output/train/<model>): checkpoint.safetensors (the last
inference weights, the EMA's with --model-ema; model/num_classes/img_size in its metadata,
which validate.py --checkpoint reads), best.safetensors (best val top-1), last.pth (the full
training state for --resume), args.json, metrics.csv, curves.png and summary.json.
"""
import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _common as C  # noqa: E402  (imports attnzoo, which registers our models)
from tools import _train_utils as T  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import AverageMeter, ModelEmaV3, random_seed  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

# args that must not change across --resume: they fix the data, the model or the schedule
RESUME_FIXED = ("model", "data_dir", "num_classes", "img_size", "epochs", "batch_size", "grad_accum", "opt",
                "lr", "sched", "warmup_epochs", "seed", "limit", "layer_decay", "model_ema", "aug", "mixup",
                "cutmix")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--model", "-m", default="cbam_resnet18", help="attnzoo or timm model name")
    p.add_argument("--data-dir", default=None,
                   help="ImageFolder root with train/ and val/ class subfolders (default: embedded digits)")
    p.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    p.add_argument("--pretrained", action="store_true",
                   help="start from the released weights of the model's tag (e.g. nat_mini.in1k; converted on "
                        "load); the classifier is new when --num-classes differs from the checkpoint's")
    p.add_argument("--img-size", type=int, default=None, help="default: 32 for digits, the model's size otherwise")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", "-b", type=int, default=64, help="per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--opt", default="adamw", help="timm optimizer (create_optimizer_v2)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd-like optimizers")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay (e.g. 0.75): groups from the model's group_matcher")
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    p.add_argument("--sched", default="cosine", help="timm scheduler (create_scheduler_v2)")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("augmentation (tools/_train_utils.py: recipe, train_transform, build_mixup)")
    g.add_argument("--aug", default="timm", choices=T.AUGS, help="library that builds the train transform")
    g.add_argument("--albumentations-config", default=None,
                   help="with --aug albumentations: a pipeline saved by albumentations.save (.json/.yaml)")
    g.add_argument("--hflip", type=float, default=None, help="default: 0 for digits (flips change digits), 0.5 else")
    g.add_argument("--color-jitter", type=float, default=None, help="default: 0 for digits, 0.4 else")
    g.add_argument("--aa", default=None, help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="timm random erasing probability")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (timm Mixup; 0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g = p.add_argument_group("speed and weights")
    g.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, --amp-dtype on GPU")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="float16 (with a GradScaler) is for GPUs")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.998)
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (GPU only)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="use a random subset of N train and N val images")
    g.add_argument("--output", default=None, help="default: output/train/<model>")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a last.pth (default: the one in --output)")
    g.add_argument("--stop-epoch", type=int, default=None,
                   help="exit after this epoch, as a time-limited job would; continue with --resume")
    g.add_argument("--workers", "-j", type=int, default=None,
                   help="loader processes (default: 0 for in-memory digits, min(4, cpus) else)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle physical cores)")
    g.add_argument("--device", default=C.default_device())
    g.add_argument("--dist-backend", default=None, help="default: nccl on GPU, gloo on CPU")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def build_data(args):
    """Datasets without transforms yet (the model, built once its class count is known, supplies them)."""
    if args.data_dir is None:
        train_ds, val_ds = C.DigitsDataset("train"), C.DigitsDataset("val")
    else:
        train_ds = C.SafeImageFolder(C.split_dir(args.data_dir, "train"))
        val_ds = C.SafeImageFolder(C.split_dir(args.data_dir, "val"), class_to_idx=train_ds.class_to_idx)
    return train_ds, val_ds


def set_transforms(args, model, train_ds, val_ds):
    """Train: the recipe of _train_utils (timm or albumentations); val: timm's eval transform, which
    validate.py rebuilds from the checkpoint metadata. Mean/std/interpolation from the model's cfg."""
    digits = args.data_dir is None
    cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    recipe = T.recipe(digits, hflip=args.hflip, color_jitter=args.color_jitter)
    train_ds.transform = T.train_transform(args.aug, cfg, recipe, auto_augment=args.aa, re_prob=args.reprob,
                                           albumentations_config=args.albumentations_config)
    cfg["crop_pct"] = 1.0 if digits else cfg["crop_pct"]
    val_ds.transform = create_transform(**cfg)
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
    if rows[0].get("ema_val_top1") is not None:
        b.plot(ep, [r["ema_val_top1"] for r in rows], label="EMA val top-1")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(model, loader, info, args, amp):
    """C.evaluate over this process's shard of val, summed over processes."""
    ev = C.evaluate(model, loader, info.device, amp=amp, channels_last=args.channels_last,
                    progress=False, desc="val")
    n = ev["images"]
    top5 = ev["top5"] if ev["top5"] is not None else 0.0
    s = T.all_reduce_sum([n, ev["top1"] * n / 100, top5 * n / 100, ev["loss"] * n, ev["skipped"], ev["seconds"]],
                         info)
    n = max(s[0], 1)
    return dict(top1=100 * s[1] / n, top5=100 * s[2] / n if ev["top5"] is not None else None, loss=s[3] / n,
                skipped=int(s[4]), seconds=s[5] / info.world)


def main(argv=None):
    args = parse_args(argv)
    C.check_model_name(args.model)
    C.check_device(args.device)  # one line, not timm's assert
    info = T.init_distributed(args.device, args.dist_backend)
    try:
        return train(args, info)
    finally:
        if info.distributed:
            torch.distributed.destroy_process_group()


def train(args, info):
    threads = C.ThreadPicker(args.threads)
    random_seed(args.seed)  # the same initial weights (and EMA copy) in every process
    digits = args.data_dir is None
    if args.workers is None:
        args.workers = 0 if digits else min(4, os.cpu_count() or 1)
    out = Path(args.output or os.path.join("output", "train", args.model))
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    log = tqdm.write if info.main else (lambda *a, **k: None)

    train_ds, val_ds = build_data(args)
    classes = train_ds.classes
    if args.num_classes is None:
        args.num_classes = len(classes)
    elif args.num_classes < len(classes):
        raise SystemExit(f"error: --num-classes {args.num_classes} < {len(classes)} classes in the data")
    if args.img_size is None:
        args.img_size = C.DIGITS_SIZE if digits else C.default_img_size(args.model)
    kw = {} if args.drop_path is None else dict(drop_path_rate=args.drop_path)
    model = C.create_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                           pretrained=args.pretrained, **kw)
    data_cfg = set_transforms(args, model, train_ds, val_ds)
    if args.limit:
        g = torch.Generator().manual_seed(args.seed)
        train_ds = Subset(train_ds, torch.randperm(len(train_ds), generator=g)[:args.limit].tolist())
        val_ds = Subset(val_ds, torch.randperm(len(val_ds), generator=g)[:args.limit].tolist())

    device_type = torch.device(info.device).type
    if args.sync_bn and info.distributed:
        if device_type != "cuda":
            raise SystemExit("error: --sync-bn needs GPUs (torch's SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if device_type == "cpu" else getattr(torch, args.amp_dtype)
    autocast = torch.autocast(device_type, dtype=amp_dtype, enabled=args.amp)
    # not timm's NativeScaler, which always scales: disabled, this one passes fp32/bf16 steps through
    scaler = torch.amp.GradScaler(device_type, enabled=args.amp and amp_dtype == torch.float16)

    global_batch = args.batch_size * info.world * args.grad_accum
    sampler = T.EpochSampler(len(train_ds), info.rank, info.world, args.seed, global_batch=global_batch)
    # own generator: a DataLoader draws its workers' base seed from the global RNG once per iterator, which
    # is per epoch without persistent workers and once with them; drop path and mixup must not see that
    loader_kw = dict(num_workers=args.workers, collate_fn=C.collate_skip, persistent_workers=args.workers > 0,
                     pin_memory=device_type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    train_loader = DataLoader(T.SeededDataset(train_ds, args.seed), args.batch_size, sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_ds, args.batch_size * 2,
                            sampler=list(range(info.rank, len(val_ds), info.world)), **loader_kw)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    mixup = T.build_mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                          args.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    if mixup and args.batch_size % 2:
        raise SystemExit("error: mixup/cutmix pair images within a batch: --batch-size must be even")

    start_epoch, updates, rows, best = 0, 0, [], None
    rng_states, train_s_before = None, 0.0
    if args.resume:
        path = out / "last.pth" if args.resume == "auto" else Path(args.resume)
        state = T.load_state(path)
        changed = {k: (state["args"].get(k), getattr(args, k)) for k in RESUME_FIXED
                   if state["args"].get(k) != getattr(args, k)}
        if changed:
            raise SystemExit(f"error: --resume {path}: these args differ from the saved run's "
                             f"(saved, now): {changed}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, updates, rows, best = state["epoch"], state["updates"], state["rows"], state["best"]
        rng_states = state["rng"]
        train_s_before = state.get("train_s", 0.0)  # the processes before this one (absent before it was kept)
        if start_epoch >= min(num_epochs, args.stop_epoch or num_epochs):
            # nothing to train: leave summary.json (and its train_s) as the last real run wrote it
            log(f"{path}: already finished at epoch {start_epoch}" if start_epoch >= num_epochs else
                f"{path}: already at epoch {start_epoch}, --stop-epoch {args.stop_epoch}: nothing to do")
            summary_file = out / "summary.json"
            return json.loads(summary_file.read_text()) if summary_file.is_file() else None
        log(f"resumed {path} at epoch {start_epoch}")
    ddp = model
    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if device_type == "cuda"
                                                  else None)

    meta = dict(vars(args), model=args.model, num_classes=args.num_classes, img_size=args.img_size,
                dataset="digits" if digits else "folder", classes=list(classes), world_size=info.world,
                mean=list(data_cfg["mean"]), std=list(data_cfg["std"]), interpolation=data_cfg["interpolation"],
                crop_pct=data_cfg["crop_pct"], weights="ema" if ema is not None else "model")
    if info.main:
        with open(out / "args.json", "w") as f:
            json.dump(meta, f, indent=2)
        print(f"{args.model}: {C.count_params(model) / 1e6:.2f}M params | {len(train_ds)} train / {len(val_ds)} "
              f"val images, {args.num_classes} classes, {args.img_size}px | {args.opt} lr {args.lr} {args.sched} "
              f"x {num_epochs} epochs, batch {global_batch} ({info.world} proc x {args.batch_size}"
              f" x {args.grad_accum} accum) | aug {args.aug} | {torch.get_num_threads()} threads on "
              f"{info.device} | -> {out}")

    if info.rank:
        random_seed(args.seed, info.rank)  # processes differ in drop-path masks; data order does not
    if rng_states is not None:  # last, so nothing above draws from the restored generators
        if len(rng_states) == info.world:
            T.set_rng_state(rng_states[info.rank])
        else:
            log(f"warning: saved with {len(rng_states)} processes, resumed with {info.world}: RNGs reseeded")
            random_seed(args.seed + 1_000_003 * start_epoch, info.rank)

    micro = len(train_loader)
    full = micro // args.grad_accum * args.grad_accum  # micro-batches in whole accumulation groups
    stop = min(num_epochs, args.stop_epoch or num_epochs)
    bar = tqdm(total=(num_epochs - start_epoch) * micro, disable=args.no_progress or not info.main,
               dynamic_ncols=True, unit="batch")
    start = time.perf_counter()
    for epoch in range(start_epoch, stop):
        sampler.set_epoch(epoch)
        model.train()
        bar.set_description(f"epoch {epoch + 1}/{num_epochs}")
        # top-1 as an integer count, not timm's accuracy (a float32 % per batch): exact, and the same
        # whether one process or several saw the batch
        t0, losses, correct, skipped = time.perf_counter(), AverageMeter(), 0, 0
        for i, (x, y, bad) in enumerate(train_loader):
            skipped += len(bad)
            bar.update()
            if x is None:  # every file of the batch unreadable
                if not info.distributed:
                    continue
                # the other processes wait for this one's gradients: contribute zeros
                x = torch.zeros(2, 3, args.img_size, args.img_size)
                y, weight = torch.zeros(2, dtype=torch.long), 0.0
            else:
                weight = 1.0
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            group = args.grad_accum if i < full else micro - full
            step_now = (i + 1) % args.grad_accum == 0 or i + 1 == micro
            sync = ddp.no_sync() if info.distributed and not step_now else contextlib.nullcontext()
            with sync:
                with autocast:
                    logits = ddp(x)
                    loss = criterion(logits, target)
                scaler.scale(loss * (weight / group)).backward()
            if step_now:
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                updates += 1
                scheduler.step_update(num_updates=updates)
                if ema is not None:
                    ema.update(model, step=updates)
            if weight:
                losses.update(loss.item(), y.numel())
                correct += logits.argmax(1).eq(y).sum().item()
            bar.set_postfix(loss=f"{losses.avg:.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.1e}")
        scheduler.step(epoch + 1)
        loss_sum, correct, seen, skipped = T.all_reduce_sum([losses.sum, correct, losses.count, skipped], info)
        train_s = time.perf_counter() - t0
        ev = evaluate(model, val_loader, info, args, args.amp)
        row = dict(epoch=epoch + 1, lr=optimizer.param_groups[-1]["lr"], train_loss=loss_sum / max(seen, 1),
                   train_top1=100.0 * correct / max(seen, 1), val_loss=ev["loss"], val_top1=ev["top1"],
                   val_top5=ev["top5"])
        if ema is not None:
            ev_ema = evaluate(ema.module, val_loader, info, args, args.amp)
            row.update(ema_val_loss=ev_ema["loss"], ema_val_top1=ev_ema["top1"])
        row.update(skipped=int(skipped) + ev["skipped"], epoch_s=train_s + ev["seconds"],
                   threads=torch.get_num_threads())
        rows.append(row)
        threads.update()  # neighbours may have come or gone during the epoch
        score = row["ema_val_top1"] if ema is not None else row["val_top1"]
        is_best = best is None or score > best
        best = score if is_best else best
        log(f"epoch {epoch + 1:3d}/{num_epochs}  train loss {row['train_loss']:.4f}  val loss {ev['loss']:.4f}  "
            f"val top-1 {ev['top1']:6.2f}" + (f"  EMA {row['ema_val_top1']:6.2f}" if ema is not None else "")
            + f"  ({row['epoch_s']:.1f}s)")
        # every epoch: a killed run leaves a resumable state, usable weights and curves
        rng = T.gather_rng_states(info)
        # the run's time so far, resumes included; up to this epoch's saving, which a resume cannot know of
        run_s = train_s_before + time.perf_counter() - start
        if info.main:
            weights = ema.module if ema is not None else model
            ck_meta = dict(meta, epoch=epoch + 1, val_top1=score)
            C.save_checkpoint(out / "checkpoint.safetensors", weights, ck_meta)
            if is_best:
                C.save_checkpoint(out / "best.safetensors", weights, ck_meta)
            T.save_state(out / "last.pth", dict(
                args=vars(args), epoch=epoch + 1, updates=updates, rows=rows, best=best, rng=rng,
                train_s=run_s,
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), ema=ema.module.state_dict() if ema is not None else None))
            C.write_rows(out / "metrics.csv", rows)
            plot_curves(rows, out / "curves.png", args.model, 0.0 if mixup else args.smoothing)
    bar.close()

    last = rows[-1]
    summary = dict(model=args.model, params_m=C.count_params(model) / 1e6, epochs=last["epoch"],
                   img_size=args.img_size, val_top1=last["val_top1"], val_top5=last["val_top5"],
                   ema_val_top1=last.get("ema_val_top1"), best_top1=best, val_loss=last["val_loss"], train_s=run_s,
                   world_size=info.world, checkpoint=str(out / "checkpoint.safetensors"))
    if info.main:
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        cols = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"]
        print()
        print(C.format_table(rows, cols + (["ema_val_top1"] if ema is not None else []) + ["epoch_s", "threads"]))
        print()
        print(C.format_table([summary], ["model", "params_m", "epochs", "img_size", "val_top1", "val_top5",
                                         "best_top1", "train_s"]))
        if last["epoch"] < num_epochs:
            print(f"\nstopped after epoch {last['epoch']}/{num_epochs}: continue with --resume {out / 'last.pth'}")
        print(f"\ncheckpoint: {summary['checkpoint']}  (python tools/validate.py --checkpoint {summary['checkpoint']})")
    return summary


if __name__ == "__main__":
    main()
