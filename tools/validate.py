#!/usr/bin/env python3
"""ImageNet-style evaluation: top-1/top-5 and throughput of a model on an ImageFolder.

    python tools/validate.py --checkpoint output/train/cbam_resnet18/checkpoint.safetensors
    python tools/validate.py --model cbam_resnet50 --checkpoint cbam50.pth --data-dir /data/imagenet/val
    python tools/validate.py --model nat_mini.in1k --pretrained --data-dir /data/imagenet/val

--data-dir is an ImageFolder (``<class>/<image>``; the ImageNet val layout with synset
folders); a root holding train/ and val/ is evaluated on val/. Without it, the embedded
digits val split (the one train.py holds out) is used. Corrupt, truncated or non-image
files are skipped and counted, never fatal. With a train.py checkpoint, model,
num_classes, img_size and class order come from its metadata unless given.
"""
import argparse
import os

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

from tools import _common as C  # noqa: E402
import attnzoo  # noqa: E402,F401  (registers our models with timm)

import torch  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--model", "-m", default=None, help="default: from the checkpoint's metadata")
    p.add_argument("--data-dir", default=None, help="ImageFolder (default: embedded digits val split)")
    p.add_argument("--checkpoint", default=None, help="local .safetensors / .pth / .pt (weights only)")
    p.add_argument("--pretrained", action="store_true",
                   help="the released weights of the model's tag (e.g. nat_mini.in1k), downloaded into timm's "
                        "cache and converted on load; with its preprocessing and class count")
    p.add_argument("--num-classes", type=int, default=None, help="default: checkpoint metadata, else the model's")
    p.add_argument("--img-size", type=int, default=None, help="default: checkpoint metadata, else the model's")
    p.add_argument("--crop-pct", type=float, default=None, help="default: checkpoint metadata, else the model's")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per batch")
    p.add_argument("--workers", "-j", type=int, default=None, help="default: 0 for digits, min(4, cpus) else")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--device", default=C.default_device(), help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle physical cores)")
    p.add_argument("--results-file", default=None, help=".csv or .json (default: output/validate/<model>.csv)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    C.ThreadPicker(args.threads)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: {C.missing_checkpoint_hint(args.checkpoint, args.model)}")
    try:
        meta = C.read_checkpoint_meta(args.checkpoint) if args.checkpoint else {}
    except ValueError as e:  # CheckpointError: a damaged header, named
        raise SystemExit(f"error: {e}") from e
    args.model = args.model or meta.get("model") or "cbam_resnet18"
    C.check_model_name(args.model)
    digits = args.data_dir is None
    if meta.get("model") not in (None, args.model):
        print(f"warning: checkpoint metadata says model {meta['model']!r}, evaluating as {args.model!r}")
        meta = {}  # its sizes and classes describe another model
    if args.num_classes is None:
        args.num_classes = meta.get("num_classes") or (
            10 if digits and not args.pretrained else C.model_default_classes(args.model))
    if args.workers is None:
        args.workers = 0 if digits else min(4, os.cpu_count() or 1)

    # train.py's preprocessing wins over the model's ImageNet defaults; explicit flags win over both
    img_size = args.img_size or meta.get("img_size") or (C.DIGITS_SIZE if digits else None)
    model = C.create_model(args.model, img_size=img_size, num_classes=args.num_classes, pretrained=args.pretrained)
    if args.checkpoint:
        C.load_weights(model, C.load_state_dict_file(args.checkpoint, args.model), args.model)
    elif not args.pretrained:
        print(f"warning: no --checkpoint: evaluating randomly initialised {args.model}")
    crop_pct = args.crop_pct or meta.get("crop_pct") or (1.0 if digits else None)
    over = {k: v for k, v in dict(input_size=img_size and (3, img_size, img_size), crop_pct=crop_pct,
                                  mean=meta.get("mean"), std=meta.get("std"),
                                  interpolation=meta.get("interpolation")).items() if v}
    cfg = resolve_data_config(over, model=model)
    transform = create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                                 mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                 crop_mode=cfg.get("crop_mode"))
    if digits:
        dataset = C.DigitsDataset("val", transform)
    else:
        classes = meta.get("classes")
        dataset = C.SafeImageFolder(C.split_dir(args.data_dir, "val"), transform,
                                    class_to_idx={c: i for i, c in enumerate(classes)} if classes else None)
        if len(dataset.class_to_idx) > args.num_classes:
            raise SystemExit(f"error: {len(dataset.class_to_idx)} classes in {args.data_dir} "
                             f"but the model predicts {args.num_classes}")
    if not len(dataset):
        raise SystemExit(f"error: nothing to score: no files under the class folders of {dataset.root}")
    loader = DataLoader(dataset, args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=C.collate_skip)

    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    res = C.evaluate(model, loader, args.device, amp=args.amp, channels_last=args.channels_last,
                     progress=not args.no_progress, desc=f"eval {args.model}")
    for path in res.pop("skipped_files")[:10]:
        print(f"skipped unreadable file: {path}")
    if not res["images"]:  # a top-1 of 0.000 would read as a score
        raise SystemExit(f"error: nothing to score: none of the {res['skipped']} files in "
                         f"{getattr(dataset, 'root', 'the data')} is a readable image")

    row = dict(model=args.model, top1=res["top1"], top5=res["top5"], loss=res["loss"], images=res["images"],
               skipped=res["skipped"], img_per_s=res["img_per_s"], img_size=cfg["input_size"][-1],
               crop_pct=cfg["crop_pct"], num_classes=args.num_classes, params_m=C.count_params(model) / 1e6,
               amp=args.amp, channels_last=args.channels_last, device=args.device,
               data=args.data_dir or "digits-val", checkpoint=args.checkpoint or "")
    print(C.format_table([row], ["model", "top1", "top5", "loss", "images", "skipped", "img_per_s", "img_size",
                                 "crop_pct", "params_m"], digits=3))
    results_file = args.results_file or os.path.join("output", "validate", f"{args.model}.csv")
    C.write_rows(results_file, [row])
    print(f"results: {results_file}")
    return row


if __name__ == "__main__":
    main()
