#!/usr/bin/env python3
"""A real Prometheus server (Debian's prometheus) scrapes the coordinator
while a 2-rank job trains; a PromQL query for every metric that
docs/metrics.md documents returns data, and `promtool check metrics` finds
nothing to complain about in /metrics.

usage: prometheus_test.py SOURCE_DIR BINARY_DIR
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_client_test import (check, free_port, generate_stubs,  # noqa: E402
                                start_server, stop_processes,
                                write_fake_fashion_mnist)


def documented_metrics(source_dir):
    """(name, type) of every metric in the tables of docs/metrics.md."""
    text = open(os.path.join(source_dir, "docs", "metrics.md")).read()
    return sorted(set(re.findall(r"^\| `(momentum_[a-z0-9_]+)` \| (\w+) \|", text, re.M)))


def query(prom, expr):
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    return body["data"]["result"] if body.get("status") == "success" else []


def main(source_dir, binary_dir):
    work = tempfile.mkdtemp(prefix="momentum-prom-")
    server = prom = None
    try:
        generate_stubs(source_dir, os.path.join(work, "gen"))
        from momentum.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402
        import grpc

        write_fake_fashion_mnist(os.path.join(work, "data"), 64, 30)
        server, ready = start_server(binary_dir, work)

        prom_addr = f"127.0.0.1:{free_port()}"
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: momentum
    static_configs:
      - targets: ["{ready['metrics']}"]
""")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/tsdb", f"--web.listen-address={prom_addr}"],
            stdout=open(os.path.join(work, "prometheus.log"), "w"), stderr=subprocess.STDOUT)

        spec = f"""
name: scraped
output_dir: out
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {work}/data, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 12}}
eval: {{every_epochs: 2, knn_k: 5}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: 2, timeout_s: 60}}
"""
        stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["grpc"]))
        job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec), timeout=10).job
        for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=600):
            pass
        final = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
        check(final.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.id} succeeded")

        # Let Prometheus scrape the final values too.
        time.sleep(3)
        text = urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=10).read()
        lint = subprocess.run(["promtool", "check", "metrics"], input=text,
                              capture_output=True)
        check(lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(),
              "promtool check metrics is clean" +
              (": " + (lint.stdout + lint.stderr).decode() if lint.returncode else ""))

        names = documented_metrics(source_dir)
        check(len(names) >= 15, f"docs/metrics.md documents {len(names)} metrics")
        missing = []
        deadline = time.time() + 30
        for name, kind in names:
            # A histogram is stored as _bucket, _sum and _count series.
            expr = name + "_count" if kind == "histogram" else name
            while True:
                result = query(prom_addr, f'{expr}')
                if result or time.time() > deadline:
                    break
                time.sleep(1)
            if not result:
                missing.append(name)
            else:
                print(f"  {name}: {len(result)} series")
        check(not missing, f"every documented metric has data in Prometheus (missing: {missing})")
        per_rank = query(prom_addr, f'momentum_train_loss{{job_id="{job.id}"}}')
        check(sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"],
              "training series come per job and rank")
        return 0
    finally:
        stop_processes([prom, server])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
