#!/usr/bin/env python3
"""Load a momentum-worker checkpoint the way a user would, with Python's
plain torch.load (weights_only=True, the default since torch 2.6), and print
what it holds as one JSON line, for tests/worker/export_test.cc to compare
with the model that wrote it.

usage: checkpoint_check.py FILE

Prints {"format", "global_step", "queue_ptr", "queue_shape", "queue_sum",
"encoder_q" (sum of every tensor, by name), "sgd_momentum" (count),
"knn_history" (list of rows), "spec"}. Exit 1 with a message when the file
does not load or lacks a field.
"""

import json
import sys

import torch


def main():
    path = sys.argv[1]
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        print(f"checkpoint_check: FAIL: torch.load({path!r}) refused it: {e}")
        return 1
    try:
        out = {
            "format": ckpt["format"],
            "global_step": int(ckpt["global_step"]),
            "queue_ptr": int(ckpt["queue_ptr"]),
            "queue_shape": list(ckpt["queue"].shape),
            "queue_sum": float(ckpt["queue"].double().sum()),
            "encoder_q": {k: float(v.double().sum()) for k, v in ckpt["encoder_q"].items()},
            "sgd_momentum": len(ckpt["sgd_momentum"]),
            "knn_history": ckpt["knn_history"].tolist(),
            "spec": ckpt["spec"],
        }
    except (KeyError, TypeError, AttributeError) as e:
        print(f"checkpoint_check: FAIL: {path}: {e!r}")
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
