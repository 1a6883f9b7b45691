#!/usr/bin/env python3
"""Writes a synthetic ImageFolder of JPEG files, deterministic by seed.

For machines without network or datasets (the GPU machine): it gives real JPEG
input, laid out as torchvision's ImageFolder expects, to both the C++ trainer's
loader and bench/gpu_reference_bench.py --mode real.

  DIR/class_00/img_0000000.JPEG, DIR/class_01/img_0000001.JPEG, ...

Image i goes to class i % --classes. Each image is "natural-ish" so that JPEG
decoding and the augmentations cost what they cost on photographs: a smooth
random colour field (a few random low-resolution colours upsampled bicubically),
a handful of filled ellipses, rectangles and polygons, a light blur, then
per-pixel Gaussian noise, saved at --quality (default 90) with 4:2:0 chroma
subsampling, as most ImageNet JPEGs are. The default size, 500x375, is
ImageNet's most common one. Every image depends only on (--seed, its index), so
reruns and different --workers counts write identical files.

example: .venv/bin/python bench/make_image_folder.py /tmp/imgs --count 2560 --size 500x375
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

EXT = ".JPEG"


def image_path(root, index, classes):
    cls = index % classes
    return os.path.join(root, f"class_{cls:02d}", f"img_{index:07d}{EXT}")


def make_image(index, seed, width, height):
    """One RGB PIL image; depends only on (seed, index, width, height)."""
    rng = np.random.default_rng([int(seed), int(index)])
    # Smooth colour field: a coarse grid of random colours, upsampled bicubically.
    gw, gh = int(rng.integers(2, 7)), int(rng.integers(2, 6))
    base = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, size=2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, size=2).tolist())
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], fill=color)
        else:
            n = int(rng.integers(3, 7))
            pts = list(zip(rng.integers(0, width, size=n).tolist(),
                           rng.integers(0, height, size=n).tolist()))
            draw.polygon(pts, fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, float(rng.uniform(4.0, 14.0)), size=arr.shape)
    arr = np.clip(arr + noise.astype(np.int16), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _write_range(job):
    root, start, stop, seed, width, height, classes, quality = job
    for i in range(start, stop):
        path = image_path(root, i, classes)
        tmp = path + ".tmp"
        make_image(i, seed, width, height).save(tmp, "JPEG", quality=quality,
                                                subsampling="4:2:0")
        os.replace(tmp, path)
    return stop - start


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 500x375")
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"--size {text!r}: each side must be at least 8")
    return w, h


def make_image_folder(root, count, size=(500, 375), classes=10, seed=0, quality=90,
                      workers=None):
    """Writes `count` JPEGs under `root`; returns the number of seconds it took."""
    width, height = size
    workers = max(1, min(workers or os.cpu_count() or 1, count))
    for c in range(min(classes, count)):
        os.makedirs(os.path.join(root, f"class_{c:02d}"), exist_ok=True)
    t0 = time.perf_counter()
    chunk = max(1, min(64, -(-count // (workers * 4))))
    jobs = [(root, s, min(s + chunk, count), seed, width, height, classes, quality)
            for s in range(0, count, chunk)]
    if workers == 1:
        for job in jobs:
            _write_range(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_range, jobs):
                pass
    seconds = time.perf_counter() - t0
    with open(os.path.join(root, "make_image_folder.json"), "w") as f:
        json.dump({"count": count, "width": width, "height": height, "classes": classes,
                   "seed": seed, "quality": quality}, f)
        f.write("\n")
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="output folder (created; existing files are overwritten)")
    ap.add_argument("--count", type=int, default=2560, help="number of images (default 2560)")
    ap.add_argument("--size", type=parse_size, default=(500, 375), help="WxH (default 500x375)")
    ap.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = ap.parse_args(argv)
    if args.count < 1 or args.classes < 1:
        ap.error("--count and --classes must be at least 1")
    seconds = make_image_folder(args.dir, args.count, args.size, args.classes, args.seed,
                                args.quality, args.workers)
    print(json.dumps({"dir": args.dir, "count": args.count,
                      "size": f"{args.size[0]}x{args.size[1]}", "classes": args.classes,
                      "seed": args.seed, "quality": args.quality,
                      "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
