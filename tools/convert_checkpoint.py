#!/usr/bin/env python
"""Convert an official checkpoint to an attnzoo .safetensors file.

    python tools/convert_checkpoint.py --model cbam_resnet50 --input RESNET50_CBAM_new_name_wrap.pth \
        --output cbam_resnet50.safetensors

The family's converter renames keys by name; a checkpoint that does not match
the model fails with the missing and unexpected keys listed. Load the result with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
or ``tools/validate.py --checkpoint``. ``--local-dir DIR`` writes a timm model folder
(``config.json`` with the tag's pretrained cfg + ``model.safetensors``) instead or as well:

    python tools/convert_checkpoint.py --model agent_swin_small.in1k_288 --input agent_swin_s_288.pth \
        --local-dir agent_swin_small.in1k_288
    timm.create_model("local-dir:agent_swin_small.in1k_288", pretrained=True)
"""
import argparse
import json
import os
import sys

import timm

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

import attnzoo  # noqa: E402,F401  (registers models)
from attnzoo.convert import convert_checkpoint, family_of, save_local_dir, write_safetensors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="attnzoo model name, e.g. cbam_resnet50")
    p.add_argument("--input", required=True, help="official checkpoint (.pth/.pth.tar/.safetensors)")
    p.add_argument("--output", default=None, help="output .safetensors path")
    p.add_argument("--local-dir", default=None, help="output timm model folder (config.json + model.safetensors)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint's classifier")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON dict of extra model args')
    args = p.parse_args(argv)
    if not (args.output or args.local_dir):
        p.error("give --output, --local-dir or both")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        family = family_of(args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if not os.path.isfile(args.input):
        origin = timm.models.get_pretrained_cfg(args.model).origin_url
        raise SystemExit(f"error: --input not found: {args.input}; download the official {args.model} checkpoint"
                         + (f" (from {origin})" if origin else "") + " and pass its path")
    try:
        model, sd = convert_checkpoint(args.input, args.model, args.num_classes, **args.model_kwargs)
    except ValueError as e:  # CheckpointError (corrupt, pickled code) or keys that don't fit: one line
        raise SystemExit(f"error: {e}") from e
    sd = {k: v.contiguous() for k, v in sd.items()}
    meta = {"model": args.model, "family": family, "num_classes": str(model.num_classes),
            "source": str(args.input)}
    if args.output:
        write_safetensors(args.output, sd, metadata=meta)
    if args.local_dir:
        save_local_dir(model, sd, args.local_dir, source=os.path.basename(args.input))
    n = sum(p.numel() for p in model.parameters())
    out = " and ".join(x for x in (args.output, args.local_dir and f"local-dir:{args.local_dir}") if x)
    print(f"{args.model} ({family}): {len(sd)} tensors, {n:,} parameters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
