#!/usr/bin/env python3
"""How close a MoCo training rate is to what this CPU's cores can compute.

  roofline.py --spec-json SPEC --images-per-s R --cores C [--precision fp32|bf16]

SPEC is a resolved job spec as JSON (official_job.py --print-spec writes one).
Counts the multiply-adds of the spec's encoder (tests/reference/moco_ref.py,
the same model as the worker's) on one image with forward hooks on every
convolution and linear layer, and takes a training image as four forward
passes' worth: the query encoder's forward, its backward (the gradients of
the inputs and of the weights, one forward's worth each), and the key
encoder's forward. (The stem convolution's input gradient, which no one
computes, is left in.) Then takes this core's practical peak, in float32
and in bfloat16: the best rate one thread reaches on a 2048 x 2048 matrix
product and on two large channels_last 3x3 convolutions (128 channels at
14 x 14, 64 at 7 x 7, batch 64 and 128: oneDNN's kernels at their best), and
prints the GFLOP/s per core the rate R means and its share of that peak. A
share near 1 means no implementation of the same arithmetic can be much
faster on these cores. The count is the direct sums': our worker computes
the wide 3x3 layers by Winograd's F(2x2, 3x3) (worker/winograd.h), which
takes 4/9 of their multiply-adds, so its share can pass 1.
"""

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import moco_ref  # noqa: E402


def forward_flops(spec):
    """FLOPs (2 per multiply-add) of one image through the spec's encoder."""
    m, c, d = spec["model"], spec["moco"], spec["data"]
    enc = moco_ref.build_encoder(m["arch"], m["width"], m["in_channels"], m["small_stem"],
                                 c["dim"], c["mlp"])
    total = [0]

    def conv(mod, _, out):
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        total[0] += 2 * out[0].numel() * k

    def linear(mod, _, out):
        total[0] += 2 * out[0].numel() * mod.in_features

    for mod in enc.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv)
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(linear)
    size = d["image_size"]
    with torch.no_grad():
        enc.eval()(torch.zeros(1, m["in_channels"], size, size))
    return total[0]


def rate(flops, fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flops * repeats / (time.perf_counter() - start)


def core_peak(dtype):
    """FLOP/s of one thread at its best: a large matrix product or 3x3 conv."""
    torch.set_num_threads(1)
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = rate(2 * n ** 3, lambda: a @ b)
    for batch, channels, side in ((64, 128, 14), (128, 64, 7)):
        cl = torch.channels_last
        x = torch.randn(batch, channels, side, side).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(channels, channels, 3, 3).to(dtype).contiguous(memory_format=cl)
        flops = 2 * batch * side * side * channels * channels * 9
        best = max(best, rate(flops, lambda: torch.nn.functional.conv2d(x, w, padding=1)))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec-json", required=True)
    ap.add_argument("--images-per-s", type=float, required=True)
    ap.add_argument("--cores", type=int, required=True, help="cores the rate used")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--label", default="ours")
    args = ap.parse_args(argv)
    spec = json.load(open(args.spec_json))
    per_image = 4 * forward_flops(spec)
    peak = {p: core_peak(t) for p, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    achieved = args.images_per_s * per_image / args.cores
    share = achieved / peak[args.precision]
    print(f"roofline {args.label}: {per_image / 1e6:.1f} MFLOP per training image; "
          f"{achieved / 1e9:.1f} GFLOP/s per core = {share:.0%} of one core's {args.precision} "
          f"peak ({peak[args.precision] / 1e9:.1f} GFLOP/s; bf16 "
          f"{peak['bf16'] / 1e9:.1f}, fp32 {peak['fp32'] / 1e9:.1f}); at that peak: "
          f"{peak[args.precision] * args.cores / per_image:.0f} images/s")
    print(json.dumps({"label": args.label, "mflop_per_image": per_image / 1e6,
                      "gflops_per_core": achieved / 1e9, "peak_gflops": peak[args.precision] / 1e9,
                      "share_of_peak": share, "precision": args.precision}))


if __name__ == "__main__":
    main()
