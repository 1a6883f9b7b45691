#!/usr/bin/env python3
"""Static checks of deploy/grafana: every dashboard panel has a title, a
gridPos inside the grid that overlaps no other, a unique id and queries with a
refId and an expr whose metrics docs/metrics.md documents (and broken copies
are caught); `kubectl kustomize deploy/grafana` renders the dashboards
ConfigMap with the sidecar label and the provisioning files Grafana needs.

usage: lint_test.py SOURCE_DIR
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dashboard_lint import (documented_metrics, lint, load_dashboards,  # noqa: E402
                            targets)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def check_dashboards(source_dir):
    documented = documented_metrics(source_dir)
    check(len(documented) >= 15, f"docs/metrics.md documents {len(documented)} metrics")
    dashboards = load_dashboards(source_dir)
    check(set(dashboards) == {"momentum-job.json", "momentum-cluster.json"},
          f"the dashboards are {sorted(dashboards)}")
    used = set()
    for name, d in dashboards.items():
        errors = lint(name, d, documented)
        check(not errors, f"{name} is clean" + "".join("\n  " + e for e in errors))
        n = sum(1 for _ in targets(d))
        print(f"  {name}: {len(d['panels'])} panels, {n} queries")
        for _, _, t in targets(d):
            used.update(m for m in documented if m in t["expr"])
    # Every documented series is on some dashboard.
    check(used == set(documented),
          f"the dashboards use every documented metric (unused: {sorted(set(documented) - used)})")
    job = dashboards["momentum-job.json"]
    var = {v["name"]: v for v in job["templating"]["list"]}
    check(var.get("job_id", {}).get("query") == "label_values(momentum_train_loss, job_id)",
          "the job dashboard's job_id variable lists the jobs with a loss series")
    check(all('job_id="$job_id"' in t["expr"] for _, _, t in targets(job)),
          "every query of the job dashboard selects job_id=\"$job_id\"")

    # The linter itself catches each kind of mistake, naming file and field.
    breakages = {
        "duplicate id": (lambda d: d["panels"][2].__setitem__("id", d["panels"][1]["id"]),
                         "panels[2].id"),
        "no title": (lambda d: d["panels"][1].pop("title"), "panels[1].title"),
        "no gridPos": (lambda d: d["panels"][1].pop("gridPos"), "panels[1].gridPos"),
        "overlap": (lambda d: d["panels"][2]["gridPos"].update(x=d["panels"][1]["gridPos"]["x"]),
                    "panels[2].gridPos"),
        "no refId": (lambda d: d["panels"][1]["targets"][0].pop("refId"),
                     "panels[1].targets[0].refId"),
        "no expr": (lambda d: d["panels"][1]["targets"][0].pop("expr"),
                    "panels[1].targets[0].expr"),
        "unknown metric": (lambda d: d["panels"][1]["targets"][0].update(
            expr="momentum_train_los{job_id=\"$job_id\"}"), "panels[1].targets[0].expr"),
        "unknown variable": (lambda d: d["panels"][1]["targets"][0].update(
            expr="momentum_train_loss{job_id=\"$job\"}"), "panels[1].targets[0].expr"),
    }
    for what, (mutate, field) in breakages.items():
        broken = copy.deepcopy(job)
        mutate(broken)
        errors = lint("momentum-job.json", broken, documented)
        check(any(e.startswith(f"momentum-job.json: {field}:") for e in errors),
              f"a copy with {what} is rejected at {field}: {errors[:1]}")


def check_kustomize(source_dir):
    base = os.path.join(source_dir, "deploy", "grafana")
    kubectl = shutil.which("kubectl")
    check(kubectl is not None, "kubectl is on PATH")
    out = subprocess.run([kubectl, "kustomize", base], capture_output=True, text=True)
    check(out.returncode == 0, f"kubectl kustomize deploy/grafana renders: {out.stderr.strip()}")
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.stdout)}
    check(all(d["kind"] == "ConfigMap" for d in docs.values()), "it renders ConfigMaps only")
    cm = docs.get("momentum-grafana-dashboards")
    check(cm is not None, "ConfigMap momentum-grafana-dashboards is rendered")
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1",
          "it carries the sidecar label grafana_dashboard: \"1\"")
    dash_dir = os.path.join(base, "dashboards")
    for name in sorted(os.listdir(dash_dir)):
        with open(os.path.join(dash_dir, name)) as f:
            check(json.loads(cm["data"].get(name, "null")) == json.load(f),
                  f"it holds {name} unchanged")
    check(set(cm["data"]) == set(os.listdir(dash_dir)), "and nothing else")

    provider = yaml.safe_load(
        docs["momentum-grafana-dashboard-provider"]["data"]["dashboards.yaml"])
    p = provider["providers"][0]
    check(provider["apiVersion"] == 1 and p["type"] == "file" and
          p["options"]["path"] == "/var/lib/grafana/dashboards/momentum",
          "the dashboard provider reads files from /var/lib/grafana/dashboards/momentum")
    ds = yaml.safe_load(docs["momentum-grafana-datasource"]["data"]["datasource.yaml"])
    d = ds["datasources"][0]
    check(ds["apiVersion"] == 1 and d["type"] == "prometheus" and d["url"].startswith("http")
          and d["access"] == "proxy", f"the data source is a Prometheus at {d['url']}")
    check(docs["momentum-grafana-datasource"]["metadata"]["labels"].get("grafana_datasource")
          == "1", "the data source ConfigMap carries the sidecar label grafana_datasource")


def main(source_dir):
    check_dashboards(source_dir)
    check_kustomize(source_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
