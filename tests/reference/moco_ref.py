"""Independent Python reference of one MoCo training step.

Written from the MoCo v1/v2 semantics in /work/shared/DESIGN.md; used to
cross-check the C++ trainer step for step (see crosscheck.py).

Encoders follow torchvision's ResNet structure and parameter names
(conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/1, fc), built from
torchvision's own BasicBlock / Bottleneck, with a configurable base width,
number of input channels and an optional small (CIFAR-style) stem.
"""

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(nn.Module):
    """torchvision-compatible ResNet with base width `width` (torchvision: 64)."""

    def __init__(self, block, layers, width=64, in_channels=3, small_stem=False,
                 dim=128, mlp=False):
        super().__init__()
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1,
                                   padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2,
                                   padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if small_stem
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        feat = 8 * width * block.expansion
        self.feat_dim = feat
        if mlp:
            self.fc = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(),
                                    nn.Linear(feat, dim))
        else:
            self.fc = nn.Linear(feat, dim)

        # torchvision's initialisation (zero_init_residual=False).
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out",
                                        nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.constant_(mod.weight, 1)
                nn.init.constant_(mod.bias, 0)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(out),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        for _ in range(1, blocks):
            mods.append(block(self.inplanes, planes))
        return nn.Sequential(*mods)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def build_encoder(arch="resnet18", width=64, in_channels=3, small_stem=False,
                  dim=128, mlp=False):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNetEncoder(block, layers, width=width, in_channels=in_channels,
                         small_stem=small_stem, dim=dim, mlp=mlp)


class MocoRef:
    """One-process MoCo (v1/v2) with optional split ("shuffled") BatchNorm."""

    def __init__(self, encoder_q: nn.Module, encoder_k: Optional[nn.Module] = None,
                 dim=128, K=65536, m=0.999, T=0.07, sgd_momentum=0.9,
                 weight_decay=1e-4, queue: Optional[torch.Tensor] = None,
                 queue_ptr=0, lr=0.03):
        self.encoder_q = encoder_q
        if encoder_k is None:
            encoder_k = copy.deepcopy(encoder_q)
        self.encoder_k = encoder_k
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.encoder_q.train()
        self.encoder_k.train()
        self.dim = int(dim)
        self.K = int(K)
        self.m = float(m)
        self.T = float(T)
        dtype = next(self.encoder_q.parameters()).dtype
        if queue is None:
            queue = F.normalize(torch.randn(self.dim, self.K), dim=0)
        queue = queue.detach().clone().to(dtype)
        if tuple(queue.shape) != (self.dim, self.K):
            raise ValueError(f"queue shape {tuple(queue.shape)} != ({self.dim}, {self.K})")
        self.queue = queue
        self.queue_ptr = int(queue_ptr)
        self.optimizer = torch.optim.SGD(self.encoder_q.parameters(), lr=lr,
                                         momentum=sgd_momentum,
                                         weight_decay=weight_decay)

    @torch.no_grad()
    def _momentum_update(self):
        m = self.m
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _keys(self, x_k, perm, groups):
        if perm is None:
            k = self.encoder_k(x_k)
        else:
            n = x_k.shape[0]
            groups = int(groups)
            if groups < 1 or n % groups != 0:
                raise ValueError(f"batch {n} not divisible into {groups} BN groups")
            perm = perm.long()
            x_shuf = x_k[perm]
            chunk = n // groups
            outs = [self.encoder_k(x_shuf[g * chunk:(g + 1) * chunk])
                    for g in range(groups)]
            k_shuf = torch.cat(outs, 0)
            k = k_shuf[torch.argsort(perm)]
        return F.normalize(k, dim=1)

    @torch.no_grad()
    def _enqueue(self, k):
        n = k.shape[0]
        start = max(0, n - self.K)  # earlier keys would be overwritten anyway
        idx = (self.queue_ptr + torch.arange(start, n)) % self.K
        self.queue[:, idx] = k[start:].t()
        self.queue_ptr = (self.queue_ptr + n) % self.K

    def step(self, x_q, x_k, perm=None, groups=0, lr=0.03):
        if perm is not None and perm.numel() == 0:
            perm = None
        self._momentum_update()                                   # (a)
        q = F.normalize(self.encoder_q(x_q), dim=1)               # (b)
        k = self._keys(x_k, perm, groups)                          # (c)
        l_pos = (q * k).sum(dim=1, keepdim=True)                   # (d)
        l_neg = torch.mm(q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        loss = F.cross_entropy(logits, labels)
        for g in self.optimizer.param_groups:                      # (e)
            g["lr"] = float(lr)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._enqueue(k)                                           # (f)
        return float(loss.item())
