#!/usr/bin/env python3
"""Throughput of the Python reference MoCo training step (images per second).

Baseline for the C++ trainer's bench: same model (tests/reference/moco_ref.py),
same step (momentum update, queries, keys with optional split BN, InfoNCE, SGD,
enqueue), on one process.

  --mode synthetic   random input tensors made once; measures the step alone.
  --mode augment     a torch DataLoader over Fashion-MNIST (IDX .gz read directly)
                     producing two views per image with the MoCo v2 augmentation
                     (torchvision transforms), --workers loader processes;
                     measures step + waiting for data.

Prints one JSON line, e.g.
  {"impl": "python-reference", "mode": "synthetic", "images_per_s": ..., ...}

example: .venv/bin/python bench/reference_bench.py --steps 20 --mode augment --workers 2
"""

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import moco_ref  # noqa: E402

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def read_idx_images(path):
    """Reads an IDX3 ubyte file (optionally .gz) into a uint8 array [N, H, W]."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], dtype=">u4")
    if magic != 0x00000803:
        raise ValueError(f"{path}: bad IDX3 magic {magic:#x}")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16)
    if pixels.size != n * h * w:
        raise ValueError(f"{path}: truncated ({pixels.size} of {n * h * w} pixels)")
    return pixels.reshape(int(n), int(h), int(w))


def moco_v2_transform(size, in_channels):
    import torchvision.transforms as T
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10% of the image side
    mean = [FMNIST_MEAN] * in_channels
    std = [FMNIST_STD] * in_channels
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, size, in_channels):
        self.images = images
        self.mode = "L" if in_channels == 1 else "RGB"
        self.transform = moco_v2_transform(size, in_channels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i], mode="L")
        if self.mode != "L":
            img = img.convert(self.mode)
        return self.transform(img), self.transform(img)


def _worker_init(_):
    torch.set_num_threads(1)


def batches_augment(args):
    path = os.path.join(args.data, "train-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        path = os.path.join(args.data, "train-images-idx3-ubyte")
    images = read_idx_images(path)
    ds = TwoViews(images, args.image_size, args.in_channels)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, worker_init_fn=_worker_init, generator=gen,
        pin_memory=False)
    while True:
        for xq, xk in loader:
            yield xq, xk


def batches_synthetic(args):
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.in_channels, args.image_size, args.image_size)
    xq, xk = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    while True:
        yield xq, xk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--arch", default="resnet18", choices=sorted(moco_ref.ARCHS))
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--temperature", type=float, default=None, help="default 0.2 with mlp, else 0.07")
    ap.add_argument("--momentum", type=float, default=0.999)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--bn-groups", type=int, default=0, help="split-BN groups for the keys; 0 = none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--mode", choices=["synthetic", "augment"], default="synthetic")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (augment mode)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.temperature is None:
        args.temperature = 0.2 if args.mlp else 0.07
    if args.bn_groups and args.batch % args.bn_groups:
        ap.error(f"--batch {args.batch} is not divisible by --bn-groups {args.bn_groups}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    enc = moco_ref.build_encoder(args.arch, args.width, args.in_channels, args.small_stem,
                                 args.dim, args.mlp)
    moco = moco_ref.MocoRef(enc, dim=args.dim, K=args.queue, m=args.momentum,
                            T=args.temperature, lr=args.lr)
    source = batches_augment(args) if args.mode == "augment" else batches_synthetic(args)

    wait = compute = 0.0
    t_start = None
    loss = float("nan")
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            wait = compute = 0.0
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        xq, xk = next(source)
        t1 = time.perf_counter()
        perm = torch.randperm(args.batch) if args.bn_groups else None
        loss = moco.step(xq, xk, perm, args.bn_groups, args.lr)
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
    elapsed = time.perf_counter() - t_start if args.steps > 0 else float("nan")
    images = args.batch * args.steps
    print(json.dumps({
        "impl": "python-reference",
        "mode": args.mode,
        "images_per_s": round(images / elapsed, 2) if args.steps > 0 else None,
        "threads": args.threads,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "arch": args.arch,
        "width": args.width,
        "in_channels": args.in_channels,
        "small_stem": args.small_stem,
        "image_size": args.image_size,
        "queue": args.queue,
        "dim": args.dim,
        "mlp": args.mlp,
        "temperature": args.temperature,
        "bn_groups": args.bn_groups,
        "workers": args.workers if args.mode == "augment" else 0,
        "seconds": round(elapsed, 4),
        "step_ms": round(1000 * compute / max(args.steps, 1), 2),
        "data_wait_ms": round(1000 * wait / max(args.steps, 1), 2),
        "last_loss": round(loss, 5),
        "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
