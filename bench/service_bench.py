#!/usr/bin/env python3
"""Coordinator benchmarks, each side by side in one run:

1. Time to first step: from SubmitJob to the first metric sample of step 1
   through the service, against starting momentum-worker directly on the same
   spec (until it prints step 1). The ratio and the difference are the
   service's overhead.
2. 100 WatchJob streams: the coordinator's memory (RSS) and CPU while a job
   trains, with no watchers and then with 100 concurrent WatchJob streams
   (metrics included).

usage: bench/service_bench.py [--build build] [--watchers 100] [--seconds 20]
Run it on an otherwise idle machine; bench/metrics_bench measures /metrics.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "server"))
from python_client_test import generate_stubs, rss_mib, start_server, start_watchers  # noqa: E402

SPEC = """
name: bench
output_dir: out
model: {{width: 16, in_channels: 1, small_stem: true}}
moco: {{dim: 128, queue_size: 4096}}
data: {{path: /usr/share/datasets/fashion-mnist, loader_threads: 1}}
optim: {{batch_size: 256, lr: 0.12, {bound}}}
eval: {{every_epochs: 0, max_train: 1000, max_test: 500}}
checkpoint: {{every_epochs: 0}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: {nproc}}}
"""


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def direct_first_step(build, work, nproc):
    """Seconds from starting momentum-worker to its first step's line."""
    spec = os.path.join(work, "direct.yaml")
    open(spec, "w").write(SPEC.format(bound="steps: 3", nproc=nproc)
                          .replace("output_dir: out", f"output_dir: {work}/direct-out"))
    start = time.monotonic()
    proc = subprocess.Popen([os.path.join(build, "worker", "momentum-worker"),
                             "--config", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and re.search(r"\(1\) loss", line):
            first = time.monotonic() - start
    proc.wait()
    shutil.rmtree(f"{work}/direct-out", ignore_errors=True)
    return first


def service_first_step(stub, pb, nproc):
    start = time.monotonic()
    job = stub.SubmitJob(pb.SubmitJobRequest(
        spec_yaml=SPEC.format(bound="steps: 3", nproc=nproc)), timeout=10).job
    first = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id, metrics=True), timeout=300):
        if first is None and event.WhichOneof("event") == "metric" and event.metric.step >= 1:
            first = time.monotonic() - start
    return first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="momentum-service-bench-")
    server = None
    try:
        generate_stubs(ROOT, os.path.join(work, "gen"))
        import grpc
        from momentum.v1 import jobs_pb2 as pb, jobs_pb2_grpc

        server, ready = start_server(args.build, work)
        channel = grpc.insecure_channel(ready["grpc"])
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        # 1. Time to the first step, alternating the two ways.
        direct, service = [], []
        for _ in range(args.repeats):
            direct.append(direct_first_step(args.build, work, 2))
            service.append(service_first_step(stub, pb, 2))
        d, s = min(direct), min(service)
        print(f"time to first step (2 ranks, best of {args.repeats}): "
              f"momentum-worker directly {d:.2f} s, through the service {s:.2f} s: "
              f"ratio {s / d:.2f}, overhead {s - d:+.2f} s")

        # 2. Watchers while a job trains.
        job = stub.SubmitJob(pb.SubmitJobRequest(
            spec_yaml=SPEC.format(bound="time_budget_s: 600", nproc=2)), timeout=10).job
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id, metrics=True), timeout=120):
            if event.WhichOneof("event") == "metric":
                break
        pid = ready["pid"]

        def window():
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.seconds)
            return (cpu_seconds(pid) - c0) / (time.monotonic() - t0), rss_mib(pid)

        cpu0, rss0 = window()
        calls, received = start_watchers(stub, pb, job.id, args.watchers)
        time.sleep(2)
        cpu1, rss1 = window()
        stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
        for c in calls:
            c.cancel()
        print(f"coordinator with 0 watchers: {100 * cpu0:.2f}% of a core, RSS {rss0:.1f} MiB")
        print(f"coordinator with {args.watchers} WatchJob streams: {100 * cpu1:.2f}% of a core, "
              f"RSS {rss1:.1f} MiB ({sum(received)} events delivered, "
              f"{min(received)} to the slowest stream)")
        print(json.dumps({
            "first_step_direct_s": d, "first_step_service_s": s,
            "first_step_ratio": s / d,
            "watchers": args.watchers,
            "cpu_core_fraction_0": cpu0, "cpu_core_fraction_n": cpu1,
            "rss_mib_0": rss0, "rss_mib_n": rss1,
            "rss_ratio": rss1 / rss0}))
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
