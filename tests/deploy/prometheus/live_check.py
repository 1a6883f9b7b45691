#!/usr/bin/env python3
"""deploy/prometheus/rules/*.yml loaded into a real Prometheus
that scrapes a real coordinator while a 2-rank job trains and a job with
corrupt data is restarted until it fails. Reports each rule's health, the series each
recording rule produces (and its value against the same aggregate computed
from the raw series), and the alerts that fire.

usage: live_check.py SOURCE_DIR BINARY_DIR
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SOURCE_DIR, BINARY_DIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "server"))
from python_client_test import (check, free_port, generate_stubs,  # noqa: E402
                                start_server, stop_processes,
                                write_fake_fashion_mnist)


def api(prom, path, **params):
    url = f"http://{prom}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


# Each recording rule and the same aggregate written out, evaluated at the
# same instant, so the recorded value can be compared.
CROSS = {
    "job_id:momentum_train_images_per_second:avg":
        "(sum without (rank) (momentum_train_images_per_second)) / (count without (rank) (momentum_train_images_per_second))",
    "job_id:momentum_train_loss:avg":
        "(sum without (rank) (momentum_train_loss)) / (count without (rank) (momentum_train_loss))",
    "job_id:momentum_train_global_step:max": "max without (rank) (momentum_train_global_step)",
    "job_id:momentum_train_progress_ratio:max": "max without (rank) (momentum_train_progress_ratio)",
    "job_id:momentum_train_feature_std_mean:max": "max without (rank) (momentum_train_feature_std_mean)",
    "job_id:momentum_train_straggler:sum": "sum without (rank) (momentum_train_straggler)",
    "job_id_rank:momentum_train_step_seconds:sum": "sum without (phase) (momentum_train_step_phase_seconds)",
    "instance:momentum_worker_slots_used:ratio":
        'sum without (state) (momentum_worker_slots{state="used"}) / sum without (state) (momentum_worker_slots)',
    "method:momentum_rpc_requests:rate5m": "sum without (code) (rate(momentum_rpc_requests_total[5m]))",
}


def main():
    work = tempfile.mkdtemp(prefix="momentum-prom-rules-")
    server = prom = None
    try:
        generate_stubs(SOURCE_DIR, os.path.join(work, "gen"))
        from momentum.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402
        import grpc

        write_fake_fashion_mnist(os.path.join(work, "data"), 64, 30)
        server, ready = start_server(BINARY_DIR, work)
        rules = sorted(os.path.join(SOURCE_DIR, "deploy", "prometheus", "rules", f)
                       for f in os.listdir(os.path.join(SOURCE_DIR, "deploy", "prometheus", "rules")))
        prom_addr = f"127.0.0.1:{free_port()}"
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "rule_files:\n" + "".join(f"  - {r}\n" for r in rules) +
                    "scrape_configs:\n  - job_name: momentum\n    static_configs:\n"
                    f"      - targets: [\"{ready['metrics']}\"]\n")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/tsdb", f"--web.listen-address={prom_addr}"],
            stdout=open(os.path.join(work, "prometheus.log"), "w"), stderr=subprocess.STDOUT)

        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{prom_addr}/-/ready", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or prom.poll() is not None:
                    raise RuntimeError("prometheus did not start: " +
                                       open(os.path.join(work, "prometheus.log")).read())
                time.sleep(0.2)

        stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["grpc"]))
        good = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=f"""
name: scraped
output_dir: out
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {work}/data, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 1000, time_budget_s: 20}}
eval: {{every_epochs: 100, knn_k: 5}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: 2, timeout_s: 60}}
# Random pixels: the features do collapse; keep the ranks from rolling back.
faults: {{collapse_std_ratio: 0}}
"""), timeout=10).job
        # Corrupt data (not IDX): each launch fails in a way another attempt
        # might not (a missing path would fail at once, not retried), so 3
        # quick restarts, then FAILED.
        corrupt = os.path.join(work, "corrupt-data")
        os.makedirs(corrupt, exist_ok=True)
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            with open(os.path.join(corrupt, name), "wb") as f:
                f.write(b"this is not an IDX file\n" * 8)
        bad = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=f"""
name: broken
output_dir: out-broken
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {corrupt}, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 1}}
resources: {{threads: 1, nproc: 1, timeout_s: 60}}
scheduling: {{max_restarts: 3, restart_backoff_s: 0}}
"""), timeout=10).job
        print(f"submitted {good.id} (2 ranks) and {bad.id} (corrupt data)")

        # While the good job trains: rule health and recorded series.
        deadline = time.time() + 300
        while time.time() < deadline:
            r = api(prom_addr, "query", query=f'count(momentum_train_loss{{job_id="{good.id}"}})')
            if r["result"] and float(r["result"][0]["value"][1]) == 2:
                break
            time.sleep(1)
        # RPC traffic with failures: the NOT_FOUND series must exist in one
        # scrape before it grows, for rate() to see the growth.
        def get(job_id):
            try:
                stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        get("job-404")
        time.sleep(2)
        for _ in range(3):
            get("job-404")
            get(good.id)
        time.sleep(5)  # a few scrapes and evaluations with data
        groups = api(prom_addr, "rules")["groups"]
        n_rules = 0
        for g in groups:
            for rule in g["rules"]:
                n_rules += 1
                name = rule.get("name")
                check(rule["health"] == "ok" and not rule.get("lastError"),
                      f"{g['file']}: {name} health {rule['health']} {rule.get('lastError', '')}")
        check(n_rules == 18, f"Prometheus loaded {n_rules} rules")
        at = time.time()
        for g in groups:
            for rule in g["rules"]:
                if rule["type"] != "recording":
                    continue
                name = rule["name"]
                got = api(prom_addr, "query", query=name, time=at)["result"]
                line = f"{name}: {len(got)} series"
                if name in CROSS:
                    want = {json.dumps({k: v for k, v in s["metric"].items() if k != "__name__"},
                                       sort_keys=True): float(s["value"][1])
                            for s in api(prom_addr, "query", query=CROSS[name], time=at)["result"]}
                    have = {json.dumps({k: v for k, v in s["metric"].items() if k != "__name__"},
                                       sort_keys=True): float(s["value"][1]) for s in got}
                    # Recorded at the last evaluation (<= 1 s before `at`):
                    # series sets must match; values may be one sample apart.
                    check(set(want) == set(have), f"{name}: same series as the raw aggregate")
                    line += " " + ", ".join(f"{have[k]:.6g} (raw {want[k]:.6g})" for k in sorted(have))
                else:
                    line += " " + ", ".join(
                        f"{float(s['value'][1]):.6g} ({s['metric'].get('method') or s['metric'].get('phase')})"
                        for s in got)
                check(got, line)

        def wait_final(job_id, seconds):
            final_states = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED,
                            jobs_pb2.JOB_STATE_CANCELLED)
            deadline = time.time() + seconds
            while True:
                j = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)
                if j.state in final_states or time.time() > deadline:
                    return j
                time.sleep(1)

        final = wait_final(good.id, 300)
        if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            os.system(f"grep -ciE 'rollback' {work}/state/jobs/{good.id}/logs/rank-0.log; "
                      f"tail -4 {work}/state/jobs/{good.id}/logs/rank-0.log")
        check(final.state == jobs_pb2.JOB_STATE_SUCCEEDED,
              f"{good.id} succeeded (state {final.state}: {final.state_reason[:120]})")
        broken = wait_final(bad.id, 300)
        check(broken.state == jobs_pb2.JOB_STATE_FAILED,
              f"{bad.id} failed after its restarts: {broken.state_reason[:160]}")

        # MomentumJobFailed has `for: 1m`; the restart alert none.
        want = {"MomentumJobFailed", "MomentumJobRestartsRepeated"}
        deadline = time.time() + 120
        firing = set()
        while time.time() < deadline:
            alerts = api(prom_addr, "alerts")["alerts"]
            firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
            if want <= firing:
                break
            time.sleep(2)
        for a in api(prom_addr, "alerts")["alerts"]:
            print(f"  alert {a['labels']['alertname']} {a['state']} value {a['value']}: "
                  f"{a['annotations']['summary']}")
        check(firing == want, f"firing: {sorted(firing)}, expected {sorted(want)}")
        return 0
    finally:
        stop_processes([prom, server])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
