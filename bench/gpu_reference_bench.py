#!/usr/bin/env python3
"""Throughput of the official MoCo v2 training step, PyTorch eager, one GPU.

The baseline our C++ trainer is compared with on the same machine: MoCo v2 as
its users run it with the official code (facebookresearch/moco, builder.py and
main_moco.py), rewritten here from its semantics:

  * MoCo module (class MoCo below, = builder.MoCo): torchvision's
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
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PREFETCH_FACTOR = 2  # DataLoader's default: batches in flight per worker


def require_torchvision():
    """Returns the torchvision module, or exits with a clear message."""
    try:
        import torchvision
    except ImportError as e:
        sys.exit(f"gpu_reference_bench: torchvision is required (the official MoCo code "
                 f"uses its resnet50, transforms and ImageFolder) but cannot be imported: "
                 f"{e}. Install the torchvision that matches torch {torch.__version__}.")
    return torchvision


# ---------------------------------------------------------------- the MoCo module

@torch.no_grad()
def concat_all_gather(tensor):
    """all_gather of `tensor` from every rank, concatenated along dim 0 (no gradient)."""
    gathered = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor, async_op=False)
    return torch.cat(gathered, dim=0)


class MoCo(nn.Module):
    """MoCo with a query encoder, a momentum key encoder and a queue (builder.py).

    base_encoder(num_classes=dim) makes one encoder (torchvision's resnet50 for
    the official code); mlp=True replaces its fc by the v2 projection head.
    Needs an initialised torch.distributed group (any size).
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.2, mlp=True):
        super().__init__()
        self.K = K
        self.m = m
        self.T = T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            feat = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(),
                                              self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(),
                                              self.encoder_k.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(),
                                    self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(),
                                    self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # a host synchronisation, as in the official code
        assert self.K % batch_size == 0, "K must be a multiple of the global batch"
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """Gathers the key batch, shuffles it with rank 0's permutation, returns this
        rank's slice and the index that undoes the shuffle."""
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]
        num_ranks = batch_size_all // batch_size_this
        idx_shuffle = torch.randperm(batch_size_all).to(x.device)
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_ranks, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_ranks = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_ranks, -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q, im_k):
        """Returns (logits [N, 1+K], labels [N] of zeros); enqueues this step's keys."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


# ---------------------------------------------------------------- process group

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(device_type):
    """A torch.distributed group of one process (nccl on cuda, gloo on cpu)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=0, world_size=1)
    return backend


def wrap_ddp(model, device, what="model"):
    """DistributedDataParallel as main_moco.py does it: around the whole MoCo module
    (what="model"), or around the query encoder alone (what="query")."""
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    if what == "query":
        model.encoder_q = nn.parallel.DistributedDataParallel(model.encoder_q, device_ids=ids)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def build_model(arch, dim, K, m, T, mlp=True):
    models = require_torchvision().models
    return MoCo(getattr(models, arch), dim=dim, K=K, m=m, T=T, mlp=mlp)


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)


# ---------------------------------------------------------------- data

class GaussianBlur:
    """PIL Gaussian blur with sigma drawn from [sigma_min, sigma_max] (the official
    moco.loader.GaussianBlur)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    """Two independent augmentations of one image: [query view, key view]."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]


def moco_v2_augmentation(image_size):
    T = require_torchvision().transforms
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


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

def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (the official train loop's meter)."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.shape[0])
                for k in topk]


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
