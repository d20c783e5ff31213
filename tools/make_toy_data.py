#!/usr/bin/env python
"""Write a small, deterministic detection + segmentation set of drawn shapes.

Each image is a noisy background with up to four non-overlapping shapes (rectangle, ellipse,
triangle), one per quadrant, so every pixel belongs to at most one object and the masks are exact.
The same images are written twice:

    <out>/coco/{train,val}/*.png   + coco/annotations/instances_{train,val}.json  (boxes, polygons, labels)
    <out>/ade/images/{training,validation}/*.png + ade/annotations/{training,validation}/*.png
                                   (label map: 0 background, 1 rectangle, 2 ellipse, 3 triangle)

    python tools/make_toy_data.py --out data/toy
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("rectangle", "ellipse", "triangle")
SEG_CLASSES = ("background",) + CLASSES
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 130, 200), (60, 180, 75)]


def _polygon(kind: int, x0: float, y0: float, w: float, h: float):
    if kind == 0:
        return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    if kind == 1:  # a 32-gon: the drawn ellipse and its annotation are the same polygon
        cx, cy = x0 + w / 2, y0 + h / 2
        return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
                for t in (2 * math.pi * i / 32 for i in range(32))]
    return [(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)]


def make_image(rng: np.random.Generator, size: int):
    """One image, its label map and its objects as (class id, polygon)."""
    img = (rng.integers(90, 166, 3)[None, None] + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
    image = Image.fromarray(img.astype(np.uint8))
    label = Image.new("L", (size, size), 0)
    draw, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
    half, objects = size // 2, []
    cells = [(cx, cy) for cy in (0, half) for cx in (0, half)]
    for i in rng.permutation(4)[:rng.integers(1, 5)]:
        cx, cy = cells[i]
        kind = int(rng.integers(0, len(CLASSES)))
        w, h = (float(v) for v in rng.integers(half // 3, half - 4, 2))
        x0 = cx + 2 + float(rng.integers(0, half - 4 - int(w) + 1))
        y0 = cy + 2 + float(rng.integers(0, half - 4 - int(h) + 1))
        poly = _polygon(kind, x0, y0, w, h)
        colour = tuple(int(c) for c in np.clip(np.array(PALETTE[kind + 1]) + rng.integers(-30, 31, 3), 0, 255))
        draw.polygon(poly, fill=colour)
        draw_label.polygon(poly, fill=kind + 1)
        objects.append((kind, poly))
    return image, label, objects


def _coco_annotations(objects, image_id: int, first_id: int):
    anns = []
    for j, (kind, poly) in enumerate(objects):
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))  # shoelace
        anns.append(dict(id=first_id + j, image_id=image_id, category_id=kind + 1, iscrowd=0, area=round(area, 2),
                         bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                         segmentation=[[round(c, 2) for p in poly for c in p]]))
    return anns


def write_split(out: Path, split: str, ade_split: str, count: int, size: int, rng: np.random.Generator,
                first_image_id: int) -> None:
    coco_dir, ade_img, ade_ann = out / "coco" / split, out / "ade/images" / ade_split, out / "ade/annotations" / ade_split
    for d in (coco_dir, ade_img, ade_ann, out / "coco/annotations"):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, label, objects = make_image(rng, size)
        name, image_id = f"{split}_{i:05d}", first_image_id + i
        image.save(coco_dir / f"{name}.png")
        image.save(ade_img / f"{name}.png")
        label.save(ade_ann / f"{name}.png")
        images.append(dict(id=image_id, file_name=f"{name}.png", width=size, height=size))
        annotations += _coco_annotations(objects, image_id, len(annotations) + 1)
    categories = [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(CLASSES)]
    with open(out / f"coco/annotations/instances_{split}.json", "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy", help="output folder")
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error("--size must be at least 32")
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    write_split(out, "train", "training", args.num_train, args.size, rng, first_image_id=1)
    write_split(out, "val", "validation", args.num_val, args.size, rng, first_image_id=args.num_train + 1)
    print(f"wrote {args.num_train} train / {args.num_val} val images of {args.size}px to {out}")
    return out


if __name__ == "__main__":
    main()
