#!/usr/bin/env python3
"""Throughput of the official MoCo v2 training step, PyTorch eager, one GPU.

The baseline our C++ trainer is compared with on the same machine: MoCo v2 as
its users run it with the official code (facebookresearch/moco, builder.py and
main_moco.py), rewritten from its semantics in bench/official_moco.py:

  * MoCo module (official_moco.MoCo, = builder.MoCo): torchvision's
    resnet50(num_classes=dim) as query and key encoder, v2's MLP head
    fc = Sequential(Linear(2048, 2048), ReLU, fc); the key encoder a copy with
    requires_grad False; per step, queries first, then (no grad) the momentum
    update theta_k = m theta_k + (1 - m) theta_q, shuffled BN for the keys
    (concat_all_gather of the key batch, a permutation drawn on rank 0 and
    broadcast, this rank's slice encoded, keys gathered again and un-shuffled),
    l_pos/l_neg logits over T, labels 0, then the keys of the whole group
    enqueued (concat_all_gather, K % batch == 0, pointer in a buffer).
    K 65536, dim 128, m 0.999, T 0.2.
  * main_moco.py: the whole MoCo module wrapped in DistributedDataParallel (here
    a group of ONE process: nccl on cuda, gloo on cpu, 127.0.0.1 and a free
    port), CrossEntropyLoss, SGD(model.parameters(), lr, momentum 0.9,
    weight decay 1e-4) with torch's default (foreach) implementation,
    cudnn.benchmark on. lr is 0.03 x batch / 256 (constant: the per-epoch
    cosine schedule costs nothing per step).
  * --mode real: ImageFolder + the MoCo v2 augmentation (RandomResizedCrop
    scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale 0.2,
    PIL GaussianBlur sigma in [0.1, 2] p 0.5, horizontal flip, ToTensor,
    Normalize) applied twice per image (TwoCropsTransform), a DataLoader with a
    DistributedSampler, --workers processes, pin_memory, drop_last, persistent
    workers, batches moved with .cuda(non_blocking=True): the official input
    pipeline, PIL decoding and augmenting on the CPU.
    A folder smaller than warm-up + timed steps is listed several times over
    (--repeat-folder, on by default), so that, as with ImageNet's 5000 batches
    per epoch, no epoch restart falls in the timed window.
  * --mode synthetic: two random input batches made once on the device: the
    step alone.

Why this is the fair baseline: it is the code path MoCo users actually run,
with nothing of ours in it; the host synchronisations the official code has
are kept (builder's `int(self.queue_ptr)` once per step; DDP's per-forward
buffer broadcast, the queue included, in a group of one), and
`loss.item()` is called every --print-freq (10) steps for the progress line.
(The official train loop calls loss.item() and a top-1/5 accuracy every step
for its meters; --official-meters does that too; the default is the lighter,
more favourable loop.) The speed settings the official code does not use
(bf16 autocast, channels_last) are options, so that each of our settings can be
compared with the same setting here: --precision bf16 wraps the forward passes
and the loss in torch.autocast(bfloat16) (the loss computes in fp32 as autocast
does); fp32 turns TF32 off so that fp32 is real fp32 on Hopper.

Timing: --warmup untimed steps (cudnn autotuning, loader start), then
torch.cuda.synchronize(), --steps steps timed by the wall clock, synchronize.
images_per_s = batch x steps / seconds; step_ms = seconds / steps;
data_wait_ms = the time per step this process was blocked in the DataLoader
iterator (0 in synthetic mode). images_per_s_last_half is the rate over the
second half of the timed steps, from host timestamps (accurate to about a step:
the official builder's int(queue_ptr) makes the host wait for every step's
forward). In real mode the loader prefetches up to 2 x --workers batches, most
of them during the warm-up (cuDNN autotuning is slow); when the loader is the
bottleneck those batches come free, so time many more steps than that
(--steps >= 8 x --workers, e.g. 200 with 16 workers) or read the last-half rate.

Prints one JSON line (and writes it to --json-out FILE):
  {"impl": "official-eager", "mode": ..., "device": ..., "precision": ...,
   "arch": ..., "batch": ..., "image_size": ..., "images_per_s": ...,
   "step_ms": ..., "data_wait_ms": ..., "steps": ..., "gpu": ..., "torch": ...,
   "workers": ..., ...}
Progress lines go to stderr.

examples:
  python bench/gpu_reference_bench.py --device cuda --precision bf16 --steps 50
  python bench/make_image_folder.py /tmp/imgs --count 5120
  python bench/gpu_reference_bench.py --device cuda --mode real --data /tmp/imgs
  python bench/gpu_reference_bench.py --device cpu --arch resnet18 --image-size 64 \
      --batch 16 --queue 256 --steps 3 --warmup 1
"""

import argparse
import contextlib
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The official code itself lives in bench/official_moco.py, shared with
# bench/official_job.py; these names are this script's interface too
# (tests/reference/official_moco_check.py uses them).
from official_moco import (  # noqa: E402,F401
    IMAGENET_MEAN, IMAGENET_STD, MoCo, GaussianBlur, TwoCropsTransform, accuracy, build_model,
    concat_all_gather, free_port, init_single_process_group, make_optimizer,
    moco_v2_augmentation, wrap_ddp)
import official_moco  # noqa: E402

PREFETCH_FACTOR = 2  # DataLoader's default: batches in flight per worker


def require_torchvision():
    """Returns the torchvision module, or exits with a clear message."""
    return official_moco.require_torchvision("gpu_reference_bench")


# ---------------------------------------------------------------- data

def real_batches(args, device, state):
    """Yields (im_q, im_k) on the device from an ImageFolder, epoch after epoch.

    Adds the seconds spent blocked in the DataLoader iterator to state["wait"] and
    keeps the epoch number in state["epoch"]. Each epoch restarts the loader's
    pipeline (a stall of about one batch per worker), once per 5000 steps on
    ImageNet; so that a small folder does not put such restarts in the timed
    window, the folder is listed repeat times over (ConcatDataset) until one epoch
    holds every step (state["repeat"]): each image is still decoded and augmented
    anew every time it is drawn.
    """
    datasets = require_torchvision().datasets
    folder = datasets.ImageFolder(args.data, TwoCropsTransform(moco_v2_augmentation(args.image_size)))
    if len(folder) < args.batch:
        sys.exit(f"gpu_reference_bench: {args.data} holds {len(folder)} images, fewer than "
                 f"one batch of {args.batch} (drop_last); make more with bench/make_image_folder.py")
    needed = args.batch * (args.warmup + args.steps + 1)
    repeat = -(-needed // len(folder)) if args.repeat_folder else 1
    dataset = folder if repeat == 1 else torch.utils.data.ConcatDataset([folder] * repeat)
    state.update(images=len(folder), repeat=repeat)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=False, sampler=sampler,
        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH_FACTOR if args.workers > 0 else None)
    while True:
        sampler.set_epoch(state["epoch"])
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                images, _ = next(it)
            except StopIteration:
                state["wait"] += time.perf_counter() - t0
                break
            state["wait"] += time.perf_counter() - t0
            yield (images[0].to(device, non_blocking=True),
                   images[1].to(device, non_blocking=True))
        state["epoch"] += 1


def synthetic_batches(args, device):
    shape = (args.batch, 3, args.image_size, args.image_size)
    im_q = torch.randn(shape, device=device)
    im_k = torch.randn(shape, device=device)
    while True:
        yield im_q, im_k


# ---------------------------------------------------------------- the benchmark

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--arch", choices=["resnet50", "resnet18"], default="resnet50")
    ap.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--queue", type=int, default=65536, help="K (default 65536)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--moco-m", type=float, default=0.999)
    ap.add_argument("--moco-t", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=None, help="default 0.03 x batch / 256")
    ap.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--mode", choices=["synthetic", "real"], default="synthetic")
    ap.add_argument("--data", help="ImageFolder root (--mode real)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(),
                    help="DataLoader processes (default: all cores)")
    ap.add_argument("--repeat-folder", action=argparse.BooleanOptionalAction, default=True,
                    help="list a small --data folder several times so that one epoch holds "
                         "every step (default on)")
    ap.add_argument("--print-freq", type=int, default=10,
                    help="loss.item() and a progress line every N steps (default 10)")
    ap.add_argument("--official-meters", action="store_true",
                    help="as the official loop: loss.item() and top-1/5 accuracy every step")
    ap.add_argument("--ddp-wrap", choices=["model", "query"], default="model",
                    help="DDP around the whole MoCo module (main_moco.py) or the query encoder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="also write the JSON line to this file")
    args = ap.parse_args(argv)
    if args.mode == "real" and not args.data:
        ap.error("--mode real needs --data DIR (an ImageFolder; see bench/make_image_folder.py)")
    if args.queue % args.batch:
        ap.error(f"--queue {args.queue} must be a multiple of --batch {args.batch} (builder.py)")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.print_freq < 1:
        ap.error("--steps, --batch and --print-freq must be positive, --warmup not negative")
    if args.lr is None:
        args.lr = 0.03 * args.batch / 256
    return args


def run(args):
    require_torchvision()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_reference_bench: --device cuda but torch.cuda.is_available() is False")
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    init_single_process_group(device.type)
    model = build_model(args.arch, args.dim, args.queue, args.moco_m, args.moco_t).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_ddp(model, device, args.ddp_wrap)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = make_optimizer(model, args.lr)

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    data = {"wait": 0.0, "epoch": 0, "images": None, "repeat": None}
    source = real_batches(args, device, data) if args.mode == "real" else synthetic_batches(args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if args.mode == "real" and args.steps < 4 * PREFETCH_FACTOR * args.workers:
        print(f"warning: --steps {args.steps} is short next to the up to "
              f"{PREFETCH_FACTOR * args.workers} batches the loader may have prefetched during "
              f"the warm-up; images_per_s overstates a loader-bound rate (see "
              f"images_per_s_last_half)", file=sys.stderr)

    model.train()
    last_loss = float("nan")
    t_start = wait_start = None
    t_half = None
    total = args.warmup + args.steps
    for i in range(total):
        if i == args.warmup:
            sync()
            t_start = time.perf_counter()
            wait_start = data["wait"]
            epoch_start = data["epoch"]
        if i == args.warmup + args.steps // 2:
            t_half = time.perf_counter()
        im_q, im_k = next(source)
        if args.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        with autocast():
            output, target = model(im_q, im_k)
            loss = criterion(output, target)
        if args.official_meters:
            accuracy(output, target, topk=(1, 5))
            last_loss = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i % args.print_freq == 0 or i == total - 1:
            last_loss = loss.item()
            print(f"step {i}/{total} loss {last_loss:.4f}", file=sys.stderr, flush=True)
    sync()
    t_end = time.perf_counter()
    seconds = t_end - t_start
    data_wait = data["wait"] - wait_start
    last_half = args.steps - args.steps // 2

    result = {
        "impl": "official-eager",
        "mode": args.mode,
        "device": device.type,
        "precision": args.precision,
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "images_per_s": round(args.batch * args.steps / seconds, 2),
        "images_per_s_last_half": round(args.batch * last_half / (t_end - t_half), 2),
        "step_ms": round(1000 * seconds / args.steps, 3),
        "data_wait_ms": round(1000 * data_wait / args.steps, 3),
        "steps": args.steps,
        "warmup": args.warmup,
        "seconds": round(seconds, 4),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torchvision": require_torchvision().__version__,
        "workers": args.workers if args.mode == "real" else 0,
        "folder_images": data["images"],
        "folder_repeat": data["repeat"],
        "epoch_restarts_timed": data["epoch"] - epoch_start,
        "queue": args.queue,
        "dim": args.dim,
        "channels_last": args.channels_last,
        "cudnn_benchmark": args.cudnn_benchmark,
        "official_meters": args.official_meters,
        "ddp_wrap": args.ddp_wrap,
        "backend": dist.get_backend(),
        "lr": args.lr,
        "last_loss": round(last_loss, 5),
    }
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    dist.destroy_process_group()
    return result


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
