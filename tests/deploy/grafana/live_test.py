#!/usr/bin/env python3
"""Every query of the Grafana dashboards returns data from a real Prometheus.

A real Prometheus (Debian's prometheus) scrapes the coordinator while a 2-rank
job trains, with the alerting/recording rules of deploy/prometheus/rules
loaded. Then each target expr of deploy/grafana/dashboards/*.json, with the
dashboard variables substituted as Grafana would ($job_id: the job, the
$__rate_interval/$__interval/$__range built-ins: durations), is run the way
Grafana runs it (query_range for range targets, query for instant ones) and
must succeed with at least one finite value: a panel that shows "No data" on
a healthy cluster is a bug. It is checked twice: while the job trains, before
any RPC has failed (so the error panels must fall back to a 0 series), and
after the job succeeded and an RPC failed. The "Job state" panel must say
RUNNING, then SUCCEEDED; every rule must report health "ok".

usage: live_test.py SOURCE_DIR BINARY_DIR
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import yaml

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "..", "server"))
from dashboard_lint import (documented_metrics, lint, load_dashboards,  # noqa: E402
                            substitute, targets)
from python_client_test import (check, free_port, generate_stubs,  # noqa: E402
                                start_server, stop_processes,
                                write_fake_fashion_mnist)

RATE_INTERVAL = "30s"  # what Grafana makes of $__rate_interval at a 1 s scrape and a short range
INTERVAL = "2s"
STEP = 2  # seconds between points of query_range


def api(prom, path, params):
    url = f"http://{prom}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
        return json.load(e)


def wait_ready(proc, addr, log):
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{addr}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            with open(log) as f:
                raise AssertionError("prometheus did not start:\n" + f.read()[-3000:])
        time.sleep(0.2)


def finite_values(result):
    """The finite sample values of a vector or matrix result."""
    out = []
    for series in result:
        points = series.get("values") or [series["value"]]
        out += [float(v) for _, v in points if math.isfinite(float(v))]
    return out


def run_panels(prom, dashboards, values, since):
    """{(file, path): (panel title, expr, result or error)} for every target."""
    out = {}
    now = time.time()
    for name, d in dashboards.items():
        for where, panel, t in targets(d):
            expr = substitute(t["expr"], values)
            if t.get("instant"):
                body = api(prom, "query", {"query": expr, "time": now})
            else:
                body = api(prom, "query_range", {"query": expr, "start": since, "end": now,
                                                 "step": STEP})
            result = body["data"]["result"] if body.get("status") == "success" else \
                f"{body.get('errorType')}: {body.get('error')}"
            out[(name, where)] = (panel["title"], expr, result)
    return out


def check_all_have_data(runs, when):
    bad = []
    for (name, where), (title, expr, result) in runs.items():
        if isinstance(result, str):
            bad.append(f"{name} {where} ({title}): query error {result}: {expr}")
        elif not finite_values(result):
            bad.append(f"{name} {where} ({title}): no data: {expr}")
        else:
            print(f"  {name} {where} {title}: {len(result)} series")
    check(not bad, f"{when}: all {len(runs)} dashboard queries return data" +
          "".join("\n  " + b for b in bad))


def result_of(runs, title, ref="A"):
    """The result of the target refId `ref` of the panel titled `title`."""
    for (name, where), (t, expr, result) in runs.items():
        if t == title and where.endswith(f"targets[{ord(ref) - ord('A')}]"):
            return result
    raise AssertionError(f"no panel {title!r}")


def last_value(result):
    return float(result[0]["values"][-1][1])


def job_states(result):
    """The states an instant query of momentum_job_state shows at 1."""
    return sorted(r["metric"]["state"] for r in result if float(r["value"][1]) == 1)


def load_rules(source_dir, work):
    """Copies of deploy/prometheus/rules/*.yml without group intervals, so that
    every rule is evaluated at the 1 s global interval within the test."""
    files = sorted(glob.glob(os.path.join(source_dir, "deploy", "prometheus", "rules", "*.yml")) +
                   glob.glob(os.path.join(source_dir, "deploy", "prometheus", "rules", "*.yaml")))
    copies = []
    for i, path in enumerate(files):
        lint = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
        check(lint.returncode == 0, f"promtool check rules {path}: {lint.stdout.strip()} "
              f"{lint.stderr.strip()}")
        with open(path) as f:
            doc = yaml.safe_load(f)
        for group in doc.get("groups", []):
            group.pop("interval", None)
        copy = os.path.join(work, f"rules-{i}.yml")
        with open(copy, "w") as f:
            yaml.safe_dump(doc, f)
        copies.append(copy)
    return files, copies


def check_rules(prom, files):
    if not files:
        print("note: deploy/prometheus/rules has no rule files; nothing to load")
        return
    deadline = time.time() + 30
    while True:
        groups = api(prom, "rules", {})["data"]["groups"]
        rules = [(g["name"], r["name"], r["health"], r.get("lastError", ""))
                 for g in groups for r in g["rules"]]
        if all(h == "ok" for _, _, h, _ in rules) or time.time() > deadline:
            break
        time.sleep(1)
    check(rules, f"Prometheus loaded {len(rules)} rules in {len(groups)} groups "
          f"from {len(files)} files")
    bad = [r for r in rules if r[2] != "ok"]
    check(not bad, "every rule reports health ok" + "".join(f"\n  {r}" for r in bad))


def main(source_dir, binary_dir):
    documented = documented_metrics(source_dir)
    dashboards = load_dashboards(source_dir)
    for name, d in dashboards.items():
        errors = lint(name, d, documented)
        check(not errors, f"{name} is clean" + "".join("\n  " + e for e in errors))

    work = tempfile.mkdtemp(prefix="momentum-grafana-")
    server = prom = None
    stop_polling = threading.Event()
    try:
        generate_stubs(source_dir, os.path.join(work, "gen"))
        from momentum.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402
        import grpc

        write_fake_fashion_mnist(os.path.join(work, "data"), 64, 30)
        server, ready = start_server(binary_dir, work)
        rule_sources, rule_files = load_rules(source_dir, work)

        prom_addr = f"127.0.0.1:{free_port()}"
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": rule_files,
                "scrape_configs": [{"job_name": "momentum",
                                    "static_configs": [{"targets": [ready["metrics"]]}]}],
            }, f)
        started = time.time()
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/tsdb", f"--web.listen-address={prom_addr}"],
            stdout=open(os.path.join(work, "prometheus.log"), "w"), stderr=subprocess.STDOUT)
        wait_ready(prom, prom_addr, os.path.join(work, "prometheus.log"))

        # Long enough to query mid-run: 40 s of training (4 steps an epoch).
        spec = f"""
name: dashboards
output_dir: out
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {work}/data, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 0, time_budget_s: 40}}
eval: {{every_epochs: 10, knn_k: 5}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: 2, timeout_s: 60}}
# Random pixels carry nothing to learn: over a long run the features do
# collapse, and the ranks would roll back; this test is about the panels.
faults: {{collapse_std_ratio: 0}}
"""
        stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["grpc"]))
        job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec), timeout=10).job
        values = {"job_id": job.id, "datasource": "unused", "__rate_interval": RATE_INTERVAL,
                  "__interval": INTERVAL}

        # A client polling the job, as `momentum status -w` does: unary RPC traffic
        # for the RPC rate and latency panels.
        def poll():
            while not stop_polling.wait(0.5):
                try:
                    stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
                except grpc.RpcError:
                    pass  # the server is stopping; the checks say what went wrong
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        # The job dashboard's variable query, as Grafana runs label_values().
        deadline = time.time() + 120
        while time.time() < deadline:
            ids = api(prom_addr, "label/job_id/values", {"match[]": "momentum_train_loss"})
            if job.id in ids.get("data", []):
                break
            time.sleep(1)
        check(job.id in ids.get("data", []),
              f"label_values(momentum_train_loss, job_id) lists {job.id}: {ids.get('data')}")

        # Mid-run: wait until the job has evaluated once, its ETA is known and the
        # queue has wrapped, so that every panel has had something to show.
        def ready_mid_run():
            r = api(prom_addr, "query", {"query": (
                f'momentum_train_knn_top1_ratio{{job_id="{job.id}"}} and on(job_id) '
                f'momentum_train_eta_seconds{{job_id="{job.id}"}} and on(job_id) '
                f'momentum_train_global_step{{job_id="{job.id}"}} > 12')})
            return r.get("data", {}).get("result")
        deadline = time.time() + 180
        while not ready_mid_run():
            state = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10).state
            check(time.time() < deadline and state in (jobs_pb2.JOB_STATE_PENDING,
                                                       jobs_pb2.JOB_STATE_RUNNING),
                  "the job trains past its first evaluation "
                  f"(state {jobs_pb2.JobState.Name(state)})")
            time.sleep(1)
        time.sleep(3)  # a few scrapes of the step and the RPC counters
        values["__range"] = f"{int(time.time() - started) + 1}s"
        state = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10).state
        check(state == jobs_pb2.JOB_STATE_RUNNING, "the job is still running mid-run")
        runs = run_panels(prom_addr, dashboards, values, started)
        check_all_have_data(runs, "mid-run")
        # The same check fails a panel whose query is empty or broken.
        for expr in ('momentum_train_loss{job_id="no-such-job"}', "sum(momentum_train_loss"):
            broken = {"panels": [{"title": "broken", "targets": [{"refId": "A", "expr": expr}]}]}
            try:
                check_all_have_data(run_panels(prom_addr, {"broken.json": broken}, values,
                                               started), "broken")
            except AssertionError as e:
                check("broken.json panels[0].targets[0]" in str(e),
                      f"a panel querying {expr} fails the check: {str(e).splitlines()[1]}")
            else:
                raise AssertionError(f"a panel querying {expr} passed the check")
        check(job_states(result_of(runs, "Job state")) == ["RUNNING"],
              "the Job state panel says RUNNING while the job runs")
        # The Ranks table merges its instant queries on their labels: each must
        # give one row per rank labelled by rank alone.
        rank_rows = [sorted(tuple(sorted(s["metric"].items()))
                            for s in runs[("momentum-job.json", where)][2])
                     for where, panel, t in targets(dashboards["momentum-job.json"])
                     if t.get("instant") and panel["title"] == "Ranks"]
        check(rank_rows and all(r == [(("rank", "0"),), (("rank", "1"),)] for r in rank_rows),
              f"each of the {len(rank_rows)} Ranks table queries gives rows rank 0 and 1 only")
        errors = result_of(runs, "RPC errors by method and code")
        check([s["metric"] for s in errors] == [{"code": "none"}] and
              max(finite_values(errors)) == 0,
              f"with no failed RPC the errors panel shows one 0 series: {errors}")
        check(max(finite_values(result_of(runs, "RPC server error ratio"))) == 0,
              "and the server error ratio is 0")
        check_rules(prom_addr, rule_sources)

        for _ in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=600):
            pass
        final = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
        check(final.state == jobs_pb2.JOB_STATE_SUCCEEDED, f"{job.id} succeeded")
        # A client mistake: the errors panel must show it by method and code.
        try:
            stub.GetJob(jobs_pb2.GetJobRequest(job_id="job-999999"), timeout=10)
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, "GetJob of an unknown job: NOT_FOUND")
        time.sleep(4)  # scrapes of the final samples and of the failed RPC

        # After the end: the training series stay for --metrics-retention-seconds.
        values["__range"] = f"{int(time.time() - started) + 1}s"
        runs = run_panels(prom_addr, dashboards, values, started)
        check_all_have_data(runs, "after the job")
        check(job_states(result_of(runs, "Job state")) == ["SUCCEEDED"],
              "the Job state panel says SUCCEEDED once the job succeeded")
        errors = result_of(runs, "RPC errors by method and code")
        check({"method": "GetJob", "code": "NOT_FOUND"} in [s["metric"] for s in errors],
              f"the errors panel shows GetJob NOT_FOUND: {[s['metric'] for s in errors]}")
        check_rules(prom_addr, rule_sources)
        print(f"took {time.time() - started:.0f} s")
        return 0
    finally:
        stop_polling.set()
        stop_processes([prom, server])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
