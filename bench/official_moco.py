"""The official MoCo v2 code (facebookresearch/moco), rewritten from its semantics.

Shared by the baselines our C++ trainer is compared with:
bench/gpu_reference_bench.py (the step on one GPU) and bench/official_job.py
(the whole training job on the CPU, N Gloo processes). Checked against the
independent reference tests/reference/moco_ref.py by
tests/reference/official_moco_check.py and official_job_check.py.

  * class MoCo = moco/builder.py MoCo: base_encoder(num_classes=dim) as query
    and key encoder (torchvision's resnet50 in the official code; any builder
    with that signature and an `fc` Linear), v2's MLP head
    fc = Sequential(Linear(feat, feat), ReLU, fc); the key encoder a copy with
    requires_grad False; per forward: queries first, then (no grad) the
    momentum update theta_k = m theta_k + (1 - m) theta_q, shuffled BN for the
    keys (concat_all_gather of the key batch, a permutation drawn on rank 0 and
    broadcast, this rank's slice encoded, keys gathered again and un-shuffled),
    l_pos/l_neg logits over T, labels 0, then the keys of the whole group
    enqueued (concat_all_gather, K % global batch == 0, pointer in a buffer).
  * main_moco.py: the whole MoCo module in DistributedDataParallel (wrap_ddp),
    SGD(model.parameters(), lr, momentum 0.9, weight decay) with torch's
    default implementation (make_optimizer), CrossEntropyLoss;
    moco/loader.py: TwoCropsTransform and the PIL GaussianBlur;
    the v2 augmentation (moco_v2_augmentation), whose knobs default to the
    official values.

The one addition is a clock, COMM_CLOCK, that adds up the seconds spent in the
module's collectives (the two key gathers, the permutation's broadcast and the
enqueue's gather; synchronous on Gloo), so that a benchmark can report them
apart from the forward computation; it changes nothing else.
"""

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


def require_torchvision(who="official_moco"):
    """Returns the torchvision module, or exits with a clear message."""
    try:
        import torchvision
    except ImportError as e:
        sys.exit(f"{who}: torchvision is required (the official MoCo code uses its "
                 f"models and transforms) but cannot be imported: {e}. Install the "
                 f"torchvision that matches torch {torch.__version__}.")
    return torchvision


class CommClock:
    """Seconds spent in the MoCo module's collectives since the last reset."""

    def __init__(self):
        self.seconds = 0.0


COMM_CLOCK = CommClock()


# ---------------------------------------------------------------- the MoCo module

@torch.no_grad()
def concat_all_gather(tensor):
    """all_gather of `tensor` from every rank, concatenated along dim 0 (no gradient)."""
    start = time.perf_counter()
    gathered = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor, async_op=False)
    out = torch.cat(gathered, dim=0)
    COMM_CLOCK.seconds += time.perf_counter() - start
    return out


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
        start = time.perf_counter()
        dist.broadcast(idx_shuffle, src=0)
        COMM_CLOCK.seconds += time.perf_counter() - start
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
    """MoCo over torchvision's models.<arch> (resnet50 in the official code)."""
    models = require_torchvision().models
    return MoCo(getattr(models, arch), dim=dim, K=K, m=m, T=T, mlp=mlp)


def make_optimizer(model, lr, momentum=0.9, weight_decay=1e-4):
    """main_moco.py's optimizer: torch's SGD (default implementation) over every
    parameter of the module (the key encoder's have no gradient and are skipped)."""
    return torch.optim.SGD(model.parameters(), lr, momentum=momentum,
                           weight_decay=weight_decay)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (main_moco.py's train-loop meter)."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.shape[0])
                for k in topk]


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


def moco_v2_augmentation(image_size, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                         jitter_prob=0.8, grayscale_prob=0.2, blur=True, blur_prob=0.5,
                         blur_sigma=(0.1, 2.0), hflip_prob=0.5, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD):
    """main_moco.py's --aug-plus transform on PIL images; the defaults are the
    official values (a job spec's data.augment.* may change them)."""
    T = require_torchvision().transforms
    steps = [
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale)),
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_prob),
        T.RandomGrayscale(p=grayscale_prob),
    ]
    if blur:
        steps.append(T.RandomApply([GaussianBlur(list(blur_sigma))], p=blur_prob))
    steps += [
        T.RandomHorizontalFlip(p=hflip_prob),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ]
    return T.Compose(steps)
