#!/usr/bin/env python3
"""The whole official MoCo v2 training job on the CPU, as its users run it.

The baseline momentum-worker is compared with in bench/job_bench.sh: the
official code (facebookresearch/moco main_moco.py + builder.py, here
bench/official_moco.py) run on N CPU processes, doing the work of one of OUR
job specs (YAML, --config/--set as momentum-worker reads them), so that both
sides train the same model on the same data with the same hyperparameters:

  * N processes (torch.multiprocessing.spawn), a Gloo group on 127.0.0.1 and a
    free port; each process torch.set_num_threads(--threads).
  * MODEL: official_moco.MoCo over OUR encoder, tests/reference/moco_ref.py
    build_encoder(model.arch, model.width, model.in_channels, model.small_stem,
    num_classes=moco.dim) (torchvision's ResNet structure and init), v2's MLP
    head added by MoCo as builder.py does (moco.mlp); K moco.queue_size, m
    moco.momentum, T moco.temperature. The whole module in
    DistributedDataParallel; shuffled BN across the ranks (with one rank the
    shuffle is of one group: builder.py has no split BN); the keys of the whole
    group enqueued. builder.py asserts K % global batch == 0.
  * DATA (--mode real): Fashion-MNIST's IDX .gz files (data.path, first
    data.limit images), PIL images, TwoCropsTransform of torchvision's
    RandomResizedCrop(image_size, scale=(crop_min_scale, crop_max_scale)),
    RandomApply(ColorJitter(brightness, contrast, saturation, hue),
    jitter_prob), RandomGrayscale(grayscale_prob), RandomApply(PIL GaussianBlur
    sigma in [blur_sigma_min, blur_sigma_max], blur_prob) when data.augment.blur,
    RandomHorizontalFlip(hflip_prob), ToTensor, Normalize(mean, std) (Fashion-
    MNIST's 0.2860 / 0.3530 unless data.augment.mean/std say otherwise). On a
    1-channel image torchvision's saturation and hue and the grayscale are
    no-ops (as worker/augment.cc skips them). A DataLoader per rank with a
    DistributedSampler (shuffle, seed), batch optim.batch_size / N, --workers
    loader processes (default 1), drop_last, persistent workers.
    --mode synthetic: two random input batches made once per rank: the step alone.
  * OPTIMISATION: CrossEntropyLoss; torch's SGD (default implementation) over
    model.parameters(), momentum optim.momentum, weight decay
    optim.weight_decay; the learning rate of every step as momentum-worker's
    (worker/optim.cc LearningRate): optim.lr x optim.batch_size / 256 times the
    cosine (or step, or constant) factor of the run's progress, times the
    linear warm-up over the first optim.warmup of the run; the progress is the
    largest of step / steps, step / (epochs x steps per epoch) and
    train_seconds / time_budget_s over the bounds set.
    The official train loop's meters (loss.item() and top-1/5 of the logits
    every step) are kept (--no-official-meters drops them).
  * BOUNDS: --steps N (N timed steps after --warmup untimed ones: the run's
    optim.steps is warmup + N, no time or epoch bound), --time-budget S (S
    seconds of training time, evaluation not counted, as optim.time_budget_s),
    or, with neither, the spec's optim.epochs / steps / time_budget_s. With a
    time bound or --eval-every-s, rank 0's training clock is broadcast every
    step so that all ranks decide (and schedule) alike.
  * kNN MONITOR (momentum-worker's protocol, worker/knn.cc): rank 0's BN
    buffers broadcast, the query encoder's backbone features (before the
    head) in eval mode of the un-augmented train set (first eval.max_train) as
    the bank and of the test set (first eval.max_test), L2-normalised, each
    rank a contiguous shard; cosine similarity, k eval.knn_k (200), weights
    exp(sim / eval.knn_temperature), top-1. The training clock is paused.
    Cadence: --eval-every-s S of training time, or --eval-every-epochs E, or
    (with neither, and no --steps) the spec's eval.every_epochs; and once at
    the end when any evaluation is on. --target T reports the first training
    time at which top-1 >= T (seconds_to_target).

Timing, per step, on every rank (rank 0's are printed): data (blocked in the
DataLoader iterator), forward (the MoCo module's forward and the loss,
including the momentum update and the key encoder, less the module's
collectives), communication (the module's collectives: the key batch's
gather, the permutation's broadcast, the keys' gather and the enqueue's
gather), backward (loss.backward(), including DDP's gradient all-reduce, which
overlaps it), optimizer (zero_grad and step), other (the meters, the learning
rate, the clock broadcast). momentum-worker's metrics.jsonl has data,
forward, backward, communication (its gradient averaging is there, not in
backward) and optimizer (its momentum update is there, not in forward).

Prints JSON lines on stdout (rank 0; also to --json-out FILE):
  {"event": "window", "step", "epoch", "loss", "lr", "images_per_s", "step_ms",
   "train_seconds"}                          every logging.every_steps steps
  {"event": "knn", "step", "epochs", "train_seconds", "knn_top1"}
  {"event": "summary", "impl": "official-job", "images_per_s" (global, timed
   steps), "step_ms" {data, forward, backward, communication, optimizer,
   other, total}, "knn": [...], "seconds_to_target", "torch", "threads",
   "ranks", "workers", ...}
Progress lines go to stderr.

examples:
  .venv/bin/python bench/official_job.py --nproc 2 --threads 1 --steps 40 --warmup 10
  .venv/bin/python bench/official_job.py --nproc 2 --threads 1 --mode synthetic --steps 20
  .venv/bin/python bench/official_job.py --nproc 2 --threads 1 --time-budget 600 \\
      --eval-every-epochs 1 --target 0.78
"""

import argparse
import datetime
import gzip
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import moco_ref  # noqa: E402
import official_moco  # noqa: E402
from official_moco import COMM_CLOCK  # noqa: E402

PHASES = ("data", "forward", "backward", "communication", "optimizer", "other")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
LUMA = (0.299, 0.587, 0.114)

# ---------------------------------------------------------------- the job spec

# The defaults of docs/job-spec.md for the fields this job reads; "(v)" fields
# (temperature, mlp, blur, schedule) depend on moco.version and are resolved
# after reading.
SPEC_DEFAULTS = {
    "name": "momentum-job",
    "seed": 0,
    "model": {"arch": "resnet18", "width": 64, "in_channels": 3, "small_stem": False},
    "moco": {"version": "v2", "dim": 128, "queue_size": 65536, "momentum": 0.999,
             "temperature": None, "mlp": None, "bn": "auto", "bn_groups": 2},
    "data": {"format": "fashion-mnist", "path": "/usr/share/datasets/fashion-mnist",
             "image_size": 0, "loader_threads": 1, "limit": 0,
             "augment": {"crop_min_scale": 0.2, "crop_max_scale": 1.0,
                         "jitter_brightness": 0.4, "jitter_contrast": 0.4,
                         "jitter_saturation": 0.4, "jitter_hue": 0.1, "jitter_prob": 0.8,
                         "grayscale_prob": 0.2, "blur": None, "blur_prob": 0.5,
                         "blur_sigma_min": 0.1, "blur_sigma_max": 2.0, "hflip_prob": 0.5,
                         "mean": [], "std": []}},
    "optim": {"batch_size": 256, "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4,
              "schedule": None, "warmup": 0.0, "milestones": [0.6, 0.8], "gamma": 0.1,
              "epochs": 200, "steps": 0, "time_budget_s": 0.0},
    "eval": {"every_epochs": 1, "knn_k": 200, "knn_temperature": 0.1, "batch_size": 512,
             "max_train": 0, "max_test": 0},
    "logging": {"every_steps": 20},
    "resources": {"nproc": 1, "threads": 0, "timeout_s": 300.0},
}
VERSION_DEFAULTS = {
    "v1": {"temperature": 0.07, "mlp": False, "blur": False, "schedule": "step"},
    "v2": {"temperature": 0.2, "mlp": True, "blur": True, "schedule": "cosine"},
}


def _merge(base, over, where=""):
    """base updated recursively with over (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def load_spec(config, overrides=()):
    """The spec of `config` (YAML) with `overrides` ("dotted.path=value", the value
    YAML, as momentum-worker's --set) applied, every default filled in."""
    import yaml
    tree = {}
    if config:
        with open(config) as f:
            tree = yaml.safe_load(f) or {}
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ValueError(f'override "{item}": expected dotted.path=value')
        node = tree
        keys = path.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = yaml.safe_load(text)
    spec = _merge(SPEC_DEFAULTS, tree)
    version = spec["moco"]["version"]
    if version not in VERSION_DEFAULTS:
        raise ValueError(f"moco.version must be v1 or v2, got {version!r}")
    vd = VERSION_DEFAULTS[version]
    for section, key in (("moco", "temperature"), ("moco", "mlp"), ("optim", "schedule")):
        if spec[section][key] is None:
            spec[section][key] = vd[key]
    if spec["data"]["augment"]["blur"] is None:
        spec["data"]["augment"]["blur"] = vd["blur"]
    if spec["data"]["format"] != "fashion-mnist":
        raise ValueError("official_job.py reads data.format fashion-mnist only, got "
                         f"{spec['data']['format']!r}")
    if spec["data"]["image_size"] == 0:
        spec["data"]["image_size"] = 28
    return spec


def fold_statistics(values, default, channels):
    """A spec's mean or std for `channels` channels, as worker/augment.cc folds them."""
    values = list(values) or [default]
    if len(values) == channels:
        return [float(v) for v in values]
    if len(values) == 1:
        return [float(values[0])] * channels
    if len(values) == 3 and channels == 1:
        return [sum(w * v for w, v in zip(LUMA, values))]
    raise ValueError(f"normalisation needs 1 or {channels} values, got {values}")


# ---------------------------------------------------------------- the schedule

def run_fraction(optim, step, steps_per_epoch, train_seconds, step_seconds, end):
    """worker/optim.cc RunFraction: the largest progress over the bounds set."""
    steps_done = step + (1 if end else 0)
    fraction = 0.0
    if optim["steps"] > 0:
        fraction = max(fraction, steps_done / optim["steps"])
    if optim["epochs"] > 0:
        fraction = max(fraction, steps_done / (optim["epochs"] * steps_per_epoch))
    if optim["time_budget_s"] > 0:
        t = train_seconds + (step_seconds if end else 0.0)
        fraction = max(fraction, t / optim["time_budget_s"])
    return min(fraction, 1.0)


def learning_rate(optim, step, steps_per_epoch, train_seconds, step_seconds):
    """worker/optim.cc LearningRate: lr per 256 images, schedule, linear warm-up."""
    base = optim["lr"] * optim["batch_size"] / 256.0
    p = run_fraction(optim, step, steps_per_epoch, train_seconds, step_seconds, False)
    factor = 1.0
    if optim["schedule"] == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * p))
    elif optim["schedule"] == "step":
        for milestone in optim["milestones"]:
            if p >= milestone:
                factor *= optim["gamma"]
    if optim["warmup"] > 0:
        p_end = run_fraction(optim, step, steps_per_epoch, train_seconds, step_seconds, True)
        factor *= min(1.0, p_end / optim["warmup"])
    return base * factor


# ---------------------------------------------------------------- model and step

def encoder_builder(model_spec):
    """base_encoder(num_classes) for official_moco.MoCo: our encoder (moco_ref)."""
    def base_encoder(num_classes):
        return moco_ref.build_encoder(model_spec["arch"], model_spec["width"],
                                      model_spec["in_channels"], model_spec["small_stem"],
                                      dim=num_classes, mlp=False)
    return base_encoder


def build_moco(spec):
    moco = spec["moco"]
    return official_moco.MoCo(encoder_builder(spec["model"]), dim=moco["dim"],
                              K=moco["queue_size"], m=moco["momentum"],
                              T=moco["temperature"], mlp=moco["mlp"])


def train_step(model, criterion, optimizer, im_q, im_k, lr, meters=True):
    """One iteration of main_moco.py's train loop, at learning rate `lr`.

    Returns (loss, seconds per phase): forward, communication, backward,
    optimizer, other (see the module docstring)."""
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
    comm0 = COMM_CLOCK.seconds
    t1 = time.perf_counter()
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    t2 = time.perf_counter()
    comm = COMM_CLOCK.seconds - comm0
    if meters:  # main_moco.py: acc1, acc5 = accuracy(...); losses.update(loss.item())
        official_moco.accuracy(output, target, topk=(1, 5))
        loss.item()
    t3 = time.perf_counter()
    optimizer.zero_grad()
    t4 = time.perf_counter()
    loss.backward()
    t5 = time.perf_counter()
    optimizer.step()
    t6 = time.perf_counter()
    phases = {"forward": t2 - t1 - comm, "communication": comm, "backward": t5 - t4,
              "optimizer": (t4 - t3) + (t6 - t5), "other": (t1 - t0) + (t3 - t2)}
    return loss.detach(), phases


# ---------------------------------------------------------------- data

def read_idx(path):
    """An IDX file (optionally .gz): uint8 images [N, H, W] or labels [N]."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 0x803:
        n, h, w = (int(v) for v in np.frombuffer(data[4:16], dtype=">u4"))
        shape, offset = (n, h, w), 16
    elif magic == 0x801:
        shape, offset = (int(np.frombuffer(data[4:8], dtype=">u4")[0]),), 8
    else:
        raise ValueError(f"{path}: bad IDX magic {magic:#x}")
    values = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({values.size} of {int(np.prod(shape))} values)")
    return values.reshape(shape)


def load_fashion_mnist(path, split):
    """(images [N, 28, 28] uint8, labels [N]) of split "train" or "t10k"."""
    def find(name):
        for candidate in (os.path.join(path, name + ".gz"), os.path.join(path, name)):
            if os.path.exists(candidate):
                return candidate
        raise FileNotFoundError(f"{path}: no {name}(.gz)")
    return (read_idx(find(f"{split}-images-idx3-ubyte")),
            read_idx(find(f"{split}-labels-idx1-ubyte")).astype(np.int64))


class FashionMnistTwoViews(torch.utils.data.Dataset):
    """(TwoCropsTransform views [q, k], label) of PIL images, as ImageFolder yields."""

    def __init__(self, images, labels, transform, rgb):
        self.images, self.labels, self.transform, self.rgb = images, labels, transform, rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i])  # mode L
        if self.rgb:
            img = img.convert("RGB")
        return self.transform(img), int(self.labels[i])


def augmentation(spec):
    a = spec["data"]["augment"]
    channels = spec["model"]["in_channels"]
    return official_moco.moco_v2_augmentation(
        spec["data"]["image_size"],
        crop_scale=(a["crop_min_scale"], a["crop_max_scale"]),
        jitter=(a["jitter_brightness"], a["jitter_contrast"], a["jitter_saturation"],
                a["jitter_hue"]),
        jitter_prob=a["jitter_prob"], grayscale_prob=a["grayscale_prob"], blur=a["blur"],
        blur_prob=a["blur_prob"], blur_sigma=(a["blur_sigma_min"], a["blur_sigma_max"]),
        hflip_prob=a["hflip_prob"],
        mean=fold_statistics(a["mean"], FMNIST_MEAN, channels),
        std=fold_statistics(a["std"], FMNIST_STD, channels))


# ---------------------------------------------------------------- kNN monitor

def _shard(n, rank, world):
    per = (n + world - 1) // world
    return min(n, rank * per), min(n, (rank + 1) * per), per


@torch.no_grad()
def _features(encoder, images, spec, batch_size):
    """Normalised backbone features of un-augmented uint8 images (eval mode)."""
    size = spec["data"]["image_size"]
    channels = spec["model"]["in_channels"]
    a = spec["data"]["augment"]
    dtype = next(encoder.parameters()).dtype
    mean = torch.tensor(fold_statistics(a["mean"], FMNIST_MEAN, channels),
                        dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(fold_statistics(a["std"], FMNIST_STD, channels),
                       dtype=dtype).view(1, -1, 1, 1)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size]))  # a writable copy
        x = x.unsqueeze(1).to(dtype) / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:  # Resize(size) + CenterCrop(size)
            T = official_moco.require_torchvision("official_job").transforms
            x = T.CenterCrop(size)(T.Resize(size, antialias=True)(x))
        x = (x.expand(-1, channels, -1, -1) - mean) / std
        out.append(F.normalize(encoder.features(x), dim=1))
    if not out:
        return torch.empty(0, encoder.feat_dim, dtype=dtype)
    return torch.cat(out)


def _gather_rows(local, n, per):
    padded = torch.zeros((per,) + tuple(local.shape[1:]), dtype=local.dtype)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


@torch.no_grad()
def knn_top1(moco, train, test, spec):
    """worker/knn.cc KnnTop1 on the official module: collective; every rank
    returns the same top-1 in [0, 1]."""
    ev = spec["eval"]
    for module in (moco.encoder_q, moco.encoder_k):  # rank 0's BN statistics
        for buf in module.buffers():
            dist.broadcast(buf, 0)
    encoder = moco.encoder_q
    was_training = encoder.training
    encoder.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    n_train = min(ev["max_train"], len(train[0])) if ev["max_train"] > 0 else len(train[0])
    n_test = min(ev["max_test"], len(test[0])) if ev["max_test"] > 0 else len(test[0])
    b0, b1, bper = _shard(n_train, rank, world)
    q0, q1, _ = _shard(n_test, rank, world)
    bank = _gather_rows(_features(encoder, train[0][b0:b1], spec, ev["batch_size"]),
                        n_train, bper)
    bank_labels = _gather_rows(torch.from_numpy(train[1][b0:b1]), n_train, bper)
    queries = _features(encoder, test[0][q0:q1], spec, ev["batch_size"])
    query_labels = torch.from_numpy(test[1][q0:q1])
    encoder.train(was_training)
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    k = min(ev["knn_k"], n_train)
    correct = 0.0
    bank_t = bank.t().contiguous()
    for start in range(0, queries.shape[0], 256):
        q = queries[start:start + 256]
        top_sim, top_idx = (q @ bank_t).topk(k, dim=1)
        weights = (top_sim / ev["knn_temperature"]).exp()
        scores = torch.zeros(q.shape[0], num_classes, dtype=q.dtype)
        scores.scatter_add_(1, bank_labels[top_idx], weights)
        correct += (scores.argmax(1) == query_labels[start:start + 256]).sum().item()
    total = torch.tensor([correct], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / n_test


# ---------------------------------------------------------------- one rank

def run_rank(rank, args, spec, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    timeout = datetime.timedelta(seconds=spec["resources"]["timeout_s"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=args.nproc,
                            timeout=timeout)
    try:
        return _train(rank, args, spec)
    finally:
        dist.destroy_process_group()


def _emit(args, record):
    line = json.dumps(record)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")


def _train(rank, args, spec):
    lead = rank == 0
    world = args.nproc
    optim = spec["optim"]
    seed = spec["seed"]
    global_batch = optim["batch_size"]
    batch = global_batch // world
    size = spec["data"]["image_size"]
    channels = spec["model"]["in_channels"]
    random.seed(seed)
    torch.manual_seed(seed)  # main_moco.py with --seed; DDP broadcasts rank 0's model

    model = nn.parallel.DistributedDataParallel(build_moco(spec))
    moco = model.module
    criterion = nn.CrossEntropyLoss()
    optimizer = official_moco.make_optimizer(model, optim["lr"], optim["momentum"],
                                             optim["weight_decay"])

    need_train = args.mode == "real" or args.evaluating
    train_set = test_set = None
    if need_train:
        train_set = load_fashion_mnist(spec["data"]["path"], "train")
        if spec["data"]["limit"] > 0:
            train_set = tuple(v[:spec["data"]["limit"]] for v in train_set)
    if args.evaluating:
        test_set = load_fashion_mnist(spec["data"]["path"], "t10k")
    n_train = len(train_set[0]) if train_set else (spec["data"]["limit"] or 60000)
    # DistributedSampler gives every rank ceil(n / world) indices; drop_last.
    steps_per_epoch = math.ceil(n_train / world) // batch
    if steps_per_epoch == 0:
        raise SystemExit(f"official_job: optim.batch_size {global_batch} is larger than "
                         f"the train set ({n_train})")

    loader = sampler = None
    if args.mode == "real":
        dataset = FashionMnistTwoViews(*train_set, official_moco.TwoCropsTransform(
            augmentation(spec)), rgb=channels == 3)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=False, sampler=sampler,
            num_workers=args.workers, pin_memory=False, drop_last=True,
            persistent_workers=args.workers > 0)
    else:
        gen = torch.Generator().manual_seed(seed + 1 + rank)
        synthetic = (torch.randn(batch, channels, size, size, generator=gen),
                     torch.randn(batch, channels, size, size, generator=gen))

    shared_clock = optim["time_budget_s"] > 0 or args.eval_every_s
    every = spec["logging"]["every_steps"]
    step = epoch = 0
    train_seconds = last_step_seconds = 0.0
    timed = {p: 0.0 for p in PHASES}
    timed_seconds, timed_steps = 0.0, 0
    window = {p: 0.0 for p in PHASES}
    window_seconds, window_steps = 0.0, 0
    knn_points = []
    next_eval_s = args.eval_every_s or 0.0
    last_eval_step = -1
    stop_reason = None
    wall_start = time.perf_counter()
    eval_seconds = 0.0
    loss = torch.tensor(float("nan"))

    def evaluate():
        nonlocal last_eval_step, eval_seconds
        start = time.perf_counter()
        top1 = knn_top1(moco, train_set, test_set, spec)
        eval_seconds += time.perf_counter() - start
        last_eval_step = step
        point = {"step": step, "epochs": step / steps_per_epoch,
                 "train_seconds": train_seconds, "knn_top1": top1}
        knn_points.append(point)
        if lead:
            _emit(args, dict(event="knn", **point, eval_seconds=time.perf_counter() - start))
            print(f"kNN top-1 {100 * top1:.2f}% after {point['epochs']:.2f} epochs, "
                  f"{train_seconds:.1f} s of training", file=sys.stderr, flush=True)

    model.train()
    while stop_reason is None:
        if optim["epochs"] > 0 and epoch >= optim["epochs"]:
            stop_reason = "epochs"
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = iter(loader) if loader is not None else None
        for _ in range(steps_per_epoch):
            step_start = time.perf_counter()
            if shared_clock:  # every rank decides and schedules on rank 0's clock
                clock = torch.tensor([train_seconds], dtype=torch.float64)
                dist.broadcast(clock, 0)
                train_seconds = clock.item()
            if optim["steps"] > 0 and step >= optim["steps"]:
                stop_reason = "steps"
            elif optim["time_budget_s"] > 0 and train_seconds >= optim["time_budget_s"]:
                stop_reason = "time_budget"
            if stop_reason is None and args.eval_every_s and train_seconds >= next_eval_s:
                evaluate()
                while next_eval_s <= train_seconds:
                    next_eval_s += args.eval_every_s
                step_start = time.perf_counter()
            if stop_reason is not None:
                break
            clock_seconds = time.perf_counter() - step_start
            if batches is not None:
                (im_q, im_k), _ = next(batches)
            else:
                im_q, im_k = synthetic
            data_seconds = time.perf_counter() - step_start - clock_seconds
            lr = learning_rate(optim, step, steps_per_epoch, train_seconds, last_step_seconds)
            loss, phases = train_step(model, criterion, optimizer, im_q, im_k, lr,
                                      meters=args.official_meters)
            seconds = time.perf_counter() - step_start
            phases["data"] = data_seconds
            phases["other"] += seconds - sum(phases.values())  # the clock, the loop
            last_step_seconds = seconds
            train_seconds += seconds
            step += 1
            if step > args.warmup:
                for p in PHASES:
                    timed[p] += phases[p]
                timed_seconds += seconds
                timed_steps += 1
            for p in PHASES:
                window[p] += phases[p]
            window_seconds += seconds
            window_steps += 1
            if step % every == 0:
                if lead:
                    _emit(args, {
                        "event": "window", "step": step, "epoch": epoch,
                        "loss": round(loss.item(), 5), "lr": lr,
                        "images_per_s": round(global_batch * window_steps / window_seconds, 2),
                        "step_ms": {p: round(1000 * window[p] / window_steps, 3)
                                    for p in PHASES},
                        "train_seconds": round(train_seconds, 4)})
                    print(f"epoch {epoch + 1} step {step} loss {loss.item():.4f} lr {lr:.4g} "
                          f"{global_batch * window_steps / window_seconds:.0f} img/s",
                          file=sys.stderr, flush=True)
                window = {p: 0.0 for p in PHASES}
                window_seconds, window_steps = 0.0, 0
        else:
            epoch += 1
            if (not args.eval_every_s and args.eval_every_epochs > 0
                    and epoch % args.eval_every_epochs == 0
                    and not (optim["epochs"] > 0 and epoch >= optim["epochs"])):
                evaluate()
        del batches
    if args.evaluating and last_eval_step != step:
        evaluate()

    if not lead:
        return None
    target = args.target
    reached = [p["train_seconds"] for p in knn_points
               if target is not None and p["knn_top1"] >= target]
    torchvision = official_moco.require_torchvision("official_job")
    summary = {
        "event": "summary",
        "impl": "official-job",
        "mode": args.mode,
        "ranks": world,
        "threads": args.threads,
        "workers": args.workers if args.mode == "real" else 0,
        "global_batch": global_batch,
        "per_rank_batch": batch,
        "steps": timed_steps,
        "warmup": min(args.warmup, step),
        "total_steps": step,
        "epochs": step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "images_per_s": (round(global_batch * timed_steps / timed_seconds, 2)
                         if timed_steps else None),
        "step_ms": ({**{p: round(1000 * timed[p] / timed_steps, 3) for p in PHASES},
                     "total": round(1000 * timed_seconds / timed_steps, 3)}
                    if timed_steps else None),
        "train_seconds": round(train_seconds, 4),
        "eval_seconds": round(eval_seconds, 4),
        "wall_seconds": round(time.perf_counter() - wall_start, 4),
        "stop_reason": stop_reason,
        "last_loss": round(loss.item(), 5),
        "knn": knn_points,
        "knn_top1": knn_points[-1]["knn_top1"] if knn_points else None,
        "target": target,
        "seconds_to_target": reached[0] if reached else None,
        "arch": spec["model"]["arch"], "width": spec["model"]["width"],
        "in_channels": channels, "small_stem": spec["model"]["small_stem"],
        "image_size": size, "dim": spec["moco"]["dim"], "queue": spec["moco"]["queue_size"],
        "mlp": spec["moco"]["mlp"], "temperature": spec["moco"]["temperature"],
        "key_momentum": spec["moco"]["momentum"],
        "lr_per_256": optim["lr"], "schedule": optim["schedule"],
        "official_meters": args.official_meters,
        "backend": "gloo",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
    }
    _emit(args, summary)
    return summary


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "fashion-mnist.yaml"),
                    help="job spec (YAML; default examples/fashion-mnist.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a spec field, as momentum-worker --set (repeatable)")
    ap.add_argument("--mode", choices=["real", "synthetic"], default="real")
    ap.add_argument("--nproc", type=int, help="ranks (default resources.nproc)")
    ap.add_argument("--threads", type=int,
                    help="torch threads per rank (default resources.threads; 0: the cores "
                         "shared among the ranks, as momentum-worker)")
    ap.add_argument("--workers", type=int, default=1,
                    help="DataLoader processes per rank (default 1, as the default "
                         "data.loader_threads)")
    bound = ap.add_mutually_exclusive_group()
    bound.add_argument("--steps", type=int, help="timed steps after --warmup (a step bound)")
    bound.add_argument("--time-budget", type=float, metavar="S",
                       help="seconds of training time (optim.time_budget_s)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 5 with --steps, else 0)")
    ev = ap.add_mutually_exclusive_group()
    ev.add_argument("--eval-every-s", type=float, metavar="S",
                    help="kNN every S seconds of training time")
    ev.add_argument("--eval-every-epochs", type=int, metavar="E",
                    help="kNN every E epochs (default eval.every_epochs, none with --steps)")
    ap.add_argument("--target", type=float, help="kNN top-1 whose first training time "
                    "is reported as seconds_to_target (e.g. 0.78)")
    ap.add_argument("--official-meters", action=argparse.BooleanOptionalAction, default=True,
                    help="the official loop's loss.item() and top-1/5 every step (default on)")
    ap.add_argument("--json-out", help="also append the JSON lines to this file")
    ap.add_argument("--print-spec", action="store_true",
                    help="print the resolved spec (JSON, bounds as the run uses them) and exit")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.config, args.set)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    optim = spec["optim"]
    args.nproc = args.nproc or spec["resources"]["nproc"]
    if args.threads is None:
        args.threads = spec["resources"]["threads"]
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.nproc)
    if args.warmup is None:
        args.warmup = 5 if args.steps is not None else 0
    if args.steps is not None:
        optim.update(steps=args.warmup + args.steps, epochs=0, time_budget_s=0.0)
    elif args.time_budget is not None:
        optim.update(steps=0, epochs=0, time_budget_s=args.time_budget)
    if args.eval_every_epochs is None:
        args.eval_every_epochs = 0 if args.steps is not None else spec["eval"]["every_epochs"]
    args.evaluating = bool(args.eval_every_s or args.eval_every_epochs
                           or args.target is not None)
    if optim["batch_size"] % args.nproc:
        ap.error(f"optim.batch_size {optim['batch_size']} must be divisible by "
                 f"--nproc {args.nproc}")
    if spec["moco"]["queue_size"] % optim["batch_size"]:
        ap.error(f"moco.queue_size {spec['moco']['queue_size']} must be a multiple of "
                 f"optim.batch_size {optim['batch_size']} (builder.py asserts it)")
    if not (optim["steps"] or optim["epochs"] or optim["time_budget_s"]):
        ap.error("no training bound: give --steps or --time-budget, or set one in the spec")
    if spec["moco"]["bn"] in ("none", "split"):
        print(f"official_job: moco.bn {spec['moco']['bn']} has no official equivalent; "
              f"builder.py always shuffles BN across the ranks", file=sys.stderr)
    return args, spec


def main(argv=None):
    args, spec = parse_args(argv)
    if args.print_spec:
        print(json.dumps(spec, indent=2))
        return 0
    official_moco.require_torchvision("official_job")
    if args.json_out and os.path.exists(args.json_out):
        os.remove(args.json_out)
    port = official_moco.free_port()
    mp.spawn(run_rank, args=(args, spec, port), nprocs=args.nproc, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
