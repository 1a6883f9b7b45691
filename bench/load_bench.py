#!/usr/bin/env python3
"""Coordinator under load: 1,000 queued submissions and 200 concurrent
WatchJob streams. One 2-rank job holds both slots; 1,000 more are submitted
behind it and stay PENDING. Reports the submission rate, the coordinator's
memory (RSS) before and after, and GetJob latency (p50, p99) on a queued job
with and without the 200 watchers, side by side.

usage: bench/load_bench.py [--build build] [--jobs 1000] [--watchers 200]
Run it on an otherwise idle machine.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "server"))
from python_client_test import (generate_stubs, rss_mib, start_server,  # noqa: E402
                                start_watchers, write_fake_fashion_mnist)


def latencies(stub, pb, job_id, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        out.append(1000 * (time.perf_counter() - t))
    out.sort()
    return out[len(out) // 2], out[min(len(out) - 1, len(out) * 99 // 100)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--watchers", type=int, default=200)
    ap.add_argument("--gets", type=int, default=500)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="momentum-load-bench-")
    server = None
    try:
        generate_stubs(ROOT, os.path.join(work, "gen"))
        import grpc
        from momentum.v1 import jobs_pb2 as pb, jobs_pb2_grpc

        write_fake_fashion_mnist(os.path.join(work, "data"), 64, 30)
        server, ready = start_server(args.build, work)
        pid = ready["pid"]
        stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["grpc"]))
        spec = f"""
name: load
output_dir: out
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {work}/data, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, time_budget_s: 3600}}
logging: {{every_steps: 5}}
resources: {{threads: 1, nproc: 2}}
"""
        running = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec), timeout=10).job
        while stub.GetJob(pb.GetJobRequest(job_id=running.id), timeout=10).state != \
                pb.JOB_STATE_RUNNING:
            time.sleep(0.1)
        rss0 = rss_mib(pid)
        t = time.perf_counter()
        last = None
        for _ in range(args.jobs):
            last = stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec), timeout=30).job
        rate = args.jobs / (time.perf_counter() - t)
        queued = stub.GetJob(pb.GetJobRequest(job_id=last.id), timeout=10)
        rss1 = rss_mib(pid)
        p50a, p99a = latencies(stub, pb, last.id, args.gets)

        calls, received = start_watchers(stub, pb, running.id, args.watchers)
        time.sleep(5)
        rss2 = rss_mib(pid)
        p50b, p99b = latencies(stub, pb, last.id, args.gets)
        for c in calls:
            c.cancel()
        print(f"{args.jobs} submissions: {rate:.0f}/s; the last is PENDING at queue position "
              f"{queued.queue_position}")
        print(f"coordinator RSS: {rss0:.1f} MiB with one running job, {rss1:.1f} MiB with "
              f"{args.jobs} queued, {rss2:.1f} MiB with {args.watchers} WatchJob streams too")
        print(f"GetJob on a queued job: p50 {p50a:.2f} ms, p99 {p99a:.2f} ms; with "
              f"{args.watchers} watchers: p50 {p50b:.2f} ms, p99 {p99b:.2f} ms "
              f"(ratio p99 {p99b / p99a:.2f}); {sum(received)} events streamed")
        stub.CancelJob(pb.CancelJobRequest(job_id=running.id), timeout=10)
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
