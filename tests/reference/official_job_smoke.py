#!/usr/bin/env python3
"""Smoke test of bench/official_job.py: the whole job runs and reports.

Runs `official_job.py --mode real --steps 2` on 2 ranks of one thread with one
DataLoader process each, on the first 256 Fashion-MNIST images with a tiny
batch and queue, and a kNN at the end (--target 0, small bank and test set),
then checks that rank 0 printed window and kNN lines and a summary with the
fields bench/job_bench.sh reads. Skips (exit 0, "SKIP") when the data set
(Debian's dataset-fashion-mnist) is not installed. About 15-25 s.

usage: .venv/bin/python tests/reference/official_job_smoke.py
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = "/usr/share/datasets/fashion-mnist"


def main():
    if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
        print(f"SKIP: {DATA} not installed")
        return 0
    cmd = [sys.executable, os.path.join(ROOT, "bench", "official_job.py"),
           "--config", os.path.join(ROOT, "examples", "fashion-mnist.yaml"),
           "--mode", "real", "--nproc", "2", "--threads", "1", "--workers", "1",
           "--steps", "2", "--warmup", "1", "--target", "0",
           "--set", "optim.batch_size=32", "--set", "moco.queue_size=64",
           "--set", "model.width=4", "--set", "data.limit=256",
           "--set", "logging.every_steps=1",
           "--set", "eval.max_train=200", "--set", "eval.max_test=50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    failures = []
    if proc.returncode != 0:
        failures.append(f"exit status {proc.returncode}; stderr:\n{proc.stderr[-3000:]}")
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            failures.append(f"not JSON on stdout: {line[:200]!r}")
    events = [r.get("event") for r in records]
    if events.count("window") != 3:
        failures.append(f"expected 3 window lines (every step), got events {events}")
    if events.count("knn") != 1:
        failures.append(f"expected 1 knn line, got events {events}")
    summary = records[-1] if records and events[-1] == "summary" else None
    if summary is None:
        failures.append(f"the last line is not the summary; events {events}")
    else:
        want = {"impl": "official-job", "mode": "real", "ranks": 2, "threads": 1, "workers": 1,
                "global_batch": 32, "per_rank_batch": 16, "steps": 2, "warmup": 1,
                "total_steps": 3, "stop_reason": "steps", "target": 0.0, "width": 4}
        for key, value in want.items():
            if summary.get(key) != value:
                failures.append(f"summary {key} = {summary.get(key)!r}, expected {value!r}")
        if not (isinstance(summary.get("images_per_s"), float) and summary["images_per_s"] > 0):
            failures.append(f"summary images_per_s = {summary.get('images_per_s')!r}")
        phases = summary.get("step_ms") or {}
        for p in ("data", "forward", "backward", "communication", "optimizer", "other", "total"):
            if not (isinstance(phases.get(p), (int, float)) and phases[p] >= 0):
                failures.append(f"summary step_ms.{p} = {phases.get(p)!r}")
        if phases and abs(sum(phases[p] for p in phases if p != "total") - phases["total"]) > 0.05:
            failures.append(f"summary phases do not add up to the total: {phases}")
        knn = summary.get("knn") or [{}]
        if not 0 <= knn[-1].get("knn_top1", -1) <= 1:
            failures.append(f"summary knn = {summary.get('knn')!r}")
        if summary.get("seconds_to_target") != knn[-1].get("train_seconds"):
            failures.append(f"seconds_to_target {summary.get('seconds_to_target')!r} is not the "
                            f"first kNN point's training time with target 0")
        for key in ("torch", "torchvision", "train_seconds", "cpu"):
            if key not in summary:
                failures.append(f"summary has no {key}")
    for f in failures:
        print("  " + f)
    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
