#!/usr/bin/env python3
"""Check that an exported backbone loads into torchvision's ResNet.

usage: export_check.py FILE ARCH [--width 64] [--in-channels 3] [--small-stem]

FILE is a dict {name: tensor} with torchvision names, written by the C++ side
with PickleForTorchLoad (or by Python with torch.save). ARCH is resnet18 or
resnet50. With the defaults the model is torchvision.models.<ARCH>() itself;
--width other than 64, --in-channels or --small-stem build the same torchvision
structure through moco_ref.build_encoder (names unchanged, fc 1000 classes).

Checks: load_state_dict(strict=False) gives no unexpected keys, the only
missing keys are fc.weight / fc.bias, every loaded tensor equals the file's;
then runs a forward pass on a random [2, C, 64, 64] input. Exit 0 on success,
1 with a message naming what is wrong.
"""

import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moco_ref  # noqa: E402

ALLOWED_MISSING = {"fc.weight", "fc.bias"}


def fail(msg):
    print(f"export_check: FAIL: {msg}")
    return 1


def load_dict(path):
    obj = torch.load(path, map_location="cpu")
    if isinstance(obj, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in obj):
        obj = dict(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict of tensors, got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        sd[str(k)] = v
    return sd


def check(path, arch, width=64, in_channels=3, small_stem=False):
    """Returns (ok, message)."""
    try:
        sd = load_dict(path)
    except Exception as e:  # noqa: BLE001
        return False, f"cannot read {path}: {e}"
    if arch not in ("resnet18", "resnet50"):
        return False, f"unknown arch {arch!r} (resnet18 or resnet50)"
    if width == 64 and in_channels == 3 and not small_stem:
        model = getattr(torchvision.models, arch)()
        built = f"torchvision.models.{arch}()"
    else:
        model = moco_ref.build_encoder(arch, width, in_channels, small_stem, 1000, False)
        built = f"torchvision-structured {arch} width {width}, {in_channels} channel(s), " \
                f"{'small' if small_stem else 'standard'} stem"
    want = model.state_dict()
    shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
             for k in sd if k in want and tuple(sd[k].shape) != tuple(want[k].shape)]
    if shape:
        return False, f"shape mismatch against {built}: " + "; ".join(shape[:10]) + \
            (f" (+{len(shape) - 10} more)" if len(shape) > 10 else "")
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        return False, f"load_state_dict into {built} failed: {e}"
    if res.unexpected_keys:
        return False, f"unexpected keys (not in {built}): " + ", ".join(res.unexpected_keys)
    bad_missing = [k for k in res.missing_keys if k not in ALLOWED_MISSING]
    if bad_missing:
        return False, "missing keys other than fc.weight/fc.bias: " + ", ".join(bad_missing)
    loaded = model.state_dict()
    for k, v in sd.items():
        mine = loaded[k]
        if v.dtype != mine.dtype:
            return False, f"{k}: dtype {v.dtype} in file, {mine.dtype} in the model"
        if not torch.equal(mine, v.to(mine.dtype)):
            return False, f"{k}: loaded tensor differs from the file's"
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 64, 64))
    if tuple(out.shape) != (2, 1000) or not torch.isfinite(out).all():
        return False, f"forward pass gave shape {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}"
    return True, (f"OK: {len(sd)} tensors from {path} load into {built}; missing only "
                  f"{sorted(res.missing_keys) or 'nothing'}; forward [2,{in_channels},64,64] -> "
                  f"{tuple(out.shape)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("file")
    ap.add_argument("arch", choices=["resnet18", "resnet50"])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--small-stem", action="store_true")
    args = ap.parse_args(argv)
    ok, msg = check(args.file, args.arch, args.width, args.in_channels, args.small_stem)
    if not ok:
        return fail(msg)
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
