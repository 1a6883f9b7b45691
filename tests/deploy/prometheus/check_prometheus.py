#!/usr/bin/env python3
"""Checks of deploy/prometheus/ (the scrape config, the rules and their
promtool unit tests) against promtool and docs/metrics.md.

usage: check_prometheus.py SOURCE_DIR COMMAND
  config     promtool check config prometheus.yml (see check_config)
  rules      promtool check rules rules/*.yml
  unit       promtool test rules tests/*.test.yml
  metrics    every metric a rule reads, and every label it matches on, is
             documented in docs/metrics.md (or recorded by the rules)
  coverage   every alert has a test where it fires and one where it stays
             quiet, each alert kind of the issue fires in some test, and
             every recording rule's value is tested
  runbooks   every runbook_url names a heading that exists in the docs
  kustomize  kubectl kustomize deploy/prometheus renders ConfigMaps holding
             exactly the files (exit 77, skipped, without kubectl)
  relabel    a real Prometheus applies the Kubernetes job's relabelling to
             the targets pod discovery would give, and scrapes the kept one

Exits 0 when the check passes, 1 with a message naming file and field when
it does not.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

# Each alert kind asked for in issue 6, and the alerts that cover it.
ALERT_KINDS = {
    "failed": ["MomentumJobFailed"],
    "restarts": ["MomentumJobRestartsRepeated"],
    "stalled": ["MomentumJobStalled"],
    "collapse": ["MomentumFeatureCollapse", "MomentumFeatureDimensionCollapse"],
    "straggler": ["MomentumRankStraggler"],
}

# Series Prometheus makes itself, which rules and tests may use too.
PROMETHEUS_SERIES = {"up"}

PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "inf", "nan", "start", "end",
}

# Fields of a kubernetes_sd_configs entry (Prometheus 2.x configuration
# reference); only checked where promtool cannot (see check_config).
K8S_SD_FIELDS = {
    "api_server", "role", "kubeconfig_file", "namespaces", "selectors",
    "attach_metadata", "basic_auth", "authorization", "oauth2",
    "follow_redirects", "enable_http2", "tls_config", "proxy_url",
    "no_proxy", "proxy_from_environment", "proxy_connect_header",
}
K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


class CheckError(Exception):
    pass


def fail(msg):
    raise CheckError(msg)


def load_yaml(path):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: cannot read YAML: {e}")


def promtool(*args):
    if shutil.which("promtool") is None:
        fail("promtool not found (Debian: apt-get install prometheus)")
    r = subprocess.run(["promtool", *args], capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r


class Paths:
    def __init__(self, source_dir):
        self.source = source_dir
        self.deploy = os.path.join(source_dir, "deploy", "prometheus")
        self.config = os.path.join(self.deploy, "prometheus.yml")
        self.rules = sorted(glob.glob(os.path.join(self.deploy, "rules", "*.yml")))
        self.tests = sorted(glob.glob(os.path.join(self.deploy, "tests", "*.test.yml")))
        self.metrics_doc = os.path.join(source_dir, "docs", "metrics.md")
        if not self.rules:
            fail(f"{self.deploy}/rules: no rule files")
        if not self.tests:
            fail(f"{self.deploy}/tests: no *.test.yml files")


def rules_of(paths):
    """(file, group, rule) for every rule of every rule file."""
    out = []
    for path in paths.rules:
        doc = load_yaml(path) or {}
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                out.append((path, group.get("name"), rule))
    return out


# ------------------------------------------------------------------ config

def promtool_has_kubernetes_sd():
    """Debian's prometheus is built without Kubernetes discovery (see its
    NEWS.Debian); upstream's has it. A one-job probe tells which this is."""
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe.yml")
        with open(probe, "w") as f:
            f.write("scrape_configs:\n  - job_name: probe\n"
                    "    kubernetes_sd_configs:\n      - role: pod\n")
        r = subprocess.run(["promtool", "check", "config", probe],
                           capture_output=True, text=True)
        return r.returncode == 0


def check_k8s_sd_fields(path, job, sd_list):
    for i, sd in enumerate(sd_list):
        where = f"{path}: scrape_configs[{job}].kubernetes_sd_configs[{i}]"
        if not isinstance(sd, dict):
            fail(f"{where}: not a mapping")
        unknown = set(sd) - K8S_SD_FIELDS
        if unknown:
            fail(f"{where}: unknown field(s) {sorted(unknown)}")
        if sd.get("role") not in K8S_SD_ROLES:
            fail(f"{where}.role: {sd.get('role')!r} is not one of {sorted(K8S_SD_ROLES)}")
        ns = sd.get("namespaces")
        if ns is not None:
            if not isinstance(ns, dict) or set(ns) - {"names", "own_namespace"}:
                fail(f"{where}.namespaces: only names and own_namespace are allowed")
            names = ns.get("names", [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                fail(f"{where}.namespaces.names: must be a list of strings")


def without_kubernetes_sd(paths, workdir):
    """The config with each kubernetes_sd_configs swapped for a
    file_sd_configs of no targets, and rule_files made absolute: everything
    else (relabelling, rule files) is then checked by this promtool."""
    cfg = load_yaml(paths.config)
    for sc in cfg.get("scrape_configs") or []:
        sd = sc.pop("kubernetes_sd_configs", None)
        if sd is None:
            continue
        check_k8s_sd_fields(paths.config, sc.get("job_name"), sd)
        targets = os.path.join(workdir, f"{sc['job_name']}-targets.json")
        with open(targets, "w") as f:
            json.dump([], f)
        sc.setdefault("file_sd_configs", []).append({"files": [targets]})
    cfg["rule_files"] = [os.path.join(paths.deploy, p) for p in cfg.get("rule_files") or []]
    out = os.path.join(workdir, "prometheus.yml")
    with open(out, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return out


def check_config(paths):
    cfg = load_yaml(paths.config)
    if not any("kubernetes_sd_configs" in sc for sc in cfg.get("scrape_configs") or []):
        fail(f"{paths.config}: scrape_configs: no job uses kubernetes_sd_configs")
    for sc in cfg.get("scrape_configs") or []:
        for rc in sc.get("relabel_configs") or []:
            if rc.get("target_label") in ("job_id", "rank"):
                fail(f"{paths.config}: scrape_configs[{sc.get('job_name')}]: "
                     f"target_label {rc['target_label']} would hide the exported label")
            if rc.get("action") == "labelmap":
                fail(f"{paths.config}: scrape_configs[{sc.get('job_name')}]: a labelmap "
                     "may create job_id or rank target labels; map labels one by one")
    if promtool_has_kubernetes_sd():
        if promtool("check", "config", paths.config).returncode != 0:
            fail(f"{paths.config}: promtool check config failed")
        return
    print("this promtool has no Kubernetes service discovery (Debian's build); "
          "checking the config with kubernetes_sd_configs replaced by file_sd_configs")
    with tempfile.TemporaryDirectory() as d:
        derived = without_kubernetes_sd(paths, d)
        if promtool("check", "config", derived).returncode != 0:
            fail(f"{paths.config}: promtool check config failed (on {derived})")


# ------------------------------------------------------------------ relabel

def fake_pod(name, ip, phase, annotations, ports, node="node-a", component=None):
    """The target group Kubernetes pod discovery makes of a pod: one target
    per container port, with the pod's meta labels."""
    meta = {
        "__meta_kubernetes_namespace": "momentum",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "momentum",
        "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name": "true",
    }
    if component:
        meta["__meta_kubernetes_pod_label_app_kubernetes_io_component"] = component
    for key, value in annotations.items():
        sane = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        meta[f"__meta_kubernetes_pod_annotation_{sane}"] = value
        meta[f"__meta_kubernetes_pod_annotationpresent_{sane}"] = "true"
    host = f"[{ip}]" if ":" in ip else ip
    groups = []
    for port_name, port in ports:
        labels = dict(meta)
        labels.update({
            "__meta_kubernetes_pod_container_name": name.split("-")[1],
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_container_port_number": str(port),
            "__meta_kubernetes_pod_container_port_protocol": "TCP",
        })
        groups.append({"targets": [f"{host}:{port}"], "labels": labels})
    return groups


def check_relabel(paths):
    """A real Prometheus runs the scrape job's relabelling on the targets
    Kubernetes pod discovery would give for deploy/k8s's pods (fed through
    file_sd, which passes __meta_* labels on unchanged) and scrapes the
    coordinator's stand-in: which pods are kept, their address, path and
    labels, and that the coordinator's job_id label arrives as it is."""
    import http.server
    import socket
    import threading
    import urllib.request

    body = (b'# TYPE momentum_jobs gauge\nmomentum_jobs{state="RUNNING"} 1\n'
            b'# TYPE momentum_train_loss gauge\n'
            b'momentum_train_loss{job_id="job-7",rank="1"} 4.5\n')
    seen_paths = []

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen_paths.append(self.path)
            ok = self.path == "/custom/metrics"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    prom_addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
              "prometheus.io/path": "/custom/metrics"}
    pods = (
        fake_pod("momentum-coordinator-7d9f", "127.0.0.1", "Running", scrape,
                 [("grpc", 50051), ("metrics", port), ("health", 8081)],
                 component="coordinator")
        + fake_pod("momentum-agent-0", "127.0.0.2", "Running", {}, [("agent", 50052)],
                   component="agent")
        + fake_pod("momentum-coordinator-old", "127.0.0.3", "Succeeded", scrape,
                   [("metrics", port)], component="coordinator")
        + fake_pod("momentum-coordinator-v6", "fd00::5", "Running",
                   {"prometheus.io/scrape": "true", "prometheus.io/port": "9464"},
                   [("metrics", 9464)], component="coordinator"))
    prom = None
    with tempfile.TemporaryDirectory() as d:
        try:
            derived = without_kubernetes_sd(paths, d)
            cfg = load_yaml(derived)
            cfg.setdefault("global", {})["scrape_interval"] = "1s"
            cfg["global"]["scrape_timeout"] = "1s"
            for sc in cfg["scrape_configs"]:
                for sd in sc.get("file_sd_configs") or []:
                    for f in sd["files"]:
                        with open(f, "w") as out:
                            json.dump(pods, out)
            with open(derived, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            log = open(os.path.join(d, "prometheus.log"), "w")
            prom = subprocess.Popen(
                ["prometheus", f"--config.file={derived}",
                 f"--storage.tsdb.path={d}/tsdb", f"--web.listen-address={prom_addr}"],
                stdout=log, stderr=subprocess.STDOUT)

            def api(path):
                with urllib.request.urlopen(f"http://{prom_addr}/api/v1/{path}", timeout=5) as r:
                    return json.load(r)["data"]

            deadline = time.time() + 30
            result = []
            while time.time() < deadline:
                try:
                    result = api("query?query=momentum_train_loss")["result"]
                except OSError:
                    result = []
                if result:
                    break
                if prom.poll() is not None:
                    fail("prometheus exited: " + open(log.name).read())
                time.sleep(0.5)
            if not result:
                fail(f"{paths.config}: scrape_configs[momentum]: the annotated pod was never "
                     f"scraped at /custom/metrics (requests seen: {seen_paths}); "
                     "Prometheus log: " + open(log.name).read()[-1500:])
            targets = api("targets")
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
            httpd.shutdown()

    where = f"{paths.config}: scrape_configs[momentum].relabel_configs"
    active = sorted(targets["activeTargets"], key=lambda t: t["labels"]["instance"])
    got = [t["labels"] for t in active]
    want = [
        {"component": "coordinator", "instance": f"127.0.0.1:{port}", "job": "momentum",
         "namespace": "momentum", "node": "node-a", "pod": "momentum-coordinator-7d9f"},
        {"component": "coordinator", "instance": "[fd00::5]:9464", "job": "momentum",
         "namespace": "momentum", "node": "node-a", "pod": "momentum-coordinator-v6"},
    ]
    if got != want:
        fail(f"{where}: active targets {got}, expected {want}")
    if active[0]["scrapeUrl"] != f"http://127.0.0.1:{port}/custom/metrics":
        fail(f"{where}: scrape URL {active[0]['scrapeUrl']}, expected the annotated port and path")
    dropped = sorted(t["discoveredLabels"]["__meta_kubernetes_pod_name"]
                     for t in targets["droppedTargets"])
    if dropped != ["momentum-agent-0", "momentum-coordinator-old"]:
        fail(f"{where}: dropped {dropped}, expected the unannotated agent and the Succeeded pod")
    series = result[0]["metric"]
    if series.get("job_id") != "job-7" or series.get("rank") != "1" or "exported_job_id" in series:
        fail(f"{where}: scraped series {series}: job_id/rank did not arrive unchanged")
    print(f"kept {len(active)} targets {[t['instance'] for t in want]}, dropped {dropped}; "
          f"scraped {active[0]['scrapeUrl']} ({len(seen_paths)} requests); series {series}")


# ------------------------------------------------------------------ rules

def check_rules(paths):
    if promtool("check", "rules", *paths.rules).returncode != 0:
        fail("promtool check rules failed: " + " ".join(paths.rules))


def check_unit(paths):
    if promtool("test", "rules", *paths.tests).returncode != 0:
        fail("promtool test rules failed: " + " ".join(paths.tests))


# ------------------------------------------------------------------ metrics

def documented_metrics(paths):
    """{name: (type, {labels})} from the tables of docs/metrics.md."""
    text = open(paths.metrics_doc).read()
    found = {}
    for m in re.finditer(r"^\| `(momentum_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", text, re.M):
        labels = {l.strip() for l in m.group(3).split(",") if l.strip()}
        found[m.group(1)] = (m.group(2), labels)
    if len(found) < 10:
        fail(f"{paths.metrics_doc}: found only {len(found)} metrics in its tables")
    return found


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_TOKEN = re.compile(r"\d[\w.]*|[A-Za-z_:][\w:]*")


def promql_references(expr):
    """(metric names, [(metric, label)] of matchers, grouping labels) that a
    PromQL expression uses. A small lexer: strings, label lists of
    by/without/on/ignoring/group_*, function calls and keywords are not
    metric names."""
    matchers = []
    grouping = set()
    no_strings = _STRING.sub('""', expr)
    for m in _GROUPING.finditer(no_strings):
        grouping |= {l.strip() for l in m.group(2).split(",") if l.strip()}
    for m in _SELECTOR.finditer(no_strings):
        for part in m.group(2).split(","):
            label = re.match(r"\s*([A-Za-z_]\w*)", part)
            if label:
                matchers.append((m.group(1), label.group(1)))
    rest = _GROUPING.sub(" ", no_strings)
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    names = set()
    for m in _TOKEN.finditer(rest):
        tok = m.group(0)
        if tok[0].isdigit() or tok.lower() in PROMQL_WORDS:
            continue
        if re.match(r"\s*\(", rest[m.end():]):
            continue  # a function or an aggregation
        names.add(tok)
    return names, matchers, grouping


def check_metrics(paths):
    docs = documented_metrics(paths)
    rules = rules_of(paths)
    recorded = {r["record"] for _, _, r in rules if "record" in r}
    known_labels = set().union(*(labels for _, labels in docs.values()))

    def series_ok(name):
        if name in docs or name in recorded or name in PROMETHEUS_SERIES:
            return True
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and docs.get(base, ("",))[0] == "histogram":
                return True
        return False

    problems = []
    n_refs = 0
    for path, group, rule in rules:
        what = f"{path}: group {group}, {'record ' + rule['record'] if 'record' in rule else 'alert ' + rule.get('alert', '?')}, expr"
        names, matchers, grouping = promql_references(str(rule.get("expr", "")))
        n_refs += len(names)
        if not names:
            problems.append(f"{what}: reads no series")
        for name in sorted(names):
            if not series_ok(name):
                problems.append(f"{what}: {name} is not in {paths.metrics_doc}")
        for metric, label in matchers:
            if metric in docs:
                allowed = docs[metric][1]
            elif metric and metric.endswith("_bucket") and metric[:-7] in docs:
                allowed = docs[metric[:-7]][1] | {"le"}
            else:
                continue
            if label != "__name__" and label not in allowed:
                problems.append(f"{what}: {metric} has no label {label} "
                                f"(docs/metrics.md: {sorted(allowed)})")
        for label in grouping - known_labels - {"le", "instance", "job"}:
            problems.append(f"{what}: label {label} is on no documented series")
    for path in paths.tests:
        for i, test in enumerate(load_yaml(path).get("tests") or []):
            for s in test.get("input_series") or []:
                name = re.match(r"\s*([A-Za-z_:][\w:]*)", s["series"]).group(1)
                if not series_ok(name):
                    problems.append(f"{path}: tests[{i}] ({test.get('name')}).input_series: "
                                    f"{name} is not in {paths.metrics_doc}")
    if problems:
        fail("\n".join(problems))
    print(f"{len(rules)} rules read {n_refs} series references, all documented "
          f"({len(docs)} metrics in docs/metrics.md)")


# ------------------------------------------------------------------ coverage

def check_coverage(paths):
    rules = rules_of(paths)
    alerts = {r["alert"] for _, _, r in rules if "alert" in r}
    records = {r["record"] for _, _, r in rules if "record" in r}
    fires, quiet, tested_records = {}, {}, set()
    for path in paths.tests:
        for test in load_yaml(path).get("tests") or []:
            for a in test.get("alert_rule_test") or []:
                name = a.get("alertname")
                bucket = fires if a.get("exp_alerts") else quiet
                bucket.setdefault(name, []).append(f"{os.path.basename(path)}: {test.get('name')} @{a.get('eval_time')}")
            for e in test.get("promql_expr_test") or []:
                names, _, _ = promql_references(str(e.get("expr", "")))
                if e.get("exp_samples"):
                    tested_records |= names & records
    problems = []
    for kind, names in ALERT_KINDS.items():
        missing = [n for n in names if n not in alerts]
        if missing:
            problems.append(f"alert kind {kind}: {missing} not in the rule files")
        if not any(n in fires for n in names):
            problems.append(f"alert kind {kind}: no test where {' or '.join(names)} fires")
    for name in sorted(alerts):
        if name not in fires:
            problems.append(f"alert {name}: no test case where it fires")
        if name not in quiet:
            problems.append(f"alert {name}: no test case where it must not fire")
    for name in sorted(records - tested_records):
        problems.append(f"recording rule {name}: no promql_expr_test checks its value")
    for name in sorted((set(fires) | set(quiet)) - alerts):
        problems.append(f"tests name alert {name}, which no rule file defines")
    if problems:
        fail("\n".join(problems))
    for kind, names in ALERT_KINDS.items():
        n = sum(len(fires.get(x, [])) for x in names)
        print(f"{kind}: fires in {n} test case(s) ({', '.join(names)})")
    print(f"{len(alerts)} alerts each fire and stay quiet in tests; "
          f"{len(records)} recording rules have their values tested")


# ------------------------------------------------------------------ runbooks

def github_anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def check_runbooks(paths):
    problems = []
    for path, group, rule in rules_of(paths):
        if "alert" not in rule:
            continue
        url = (rule.get("annotations") or {}).get("runbook_url")
        where = f"{path}: alert {rule['alert']}, annotations.runbook_url"
        if not url:
            problems.append(f"{where}: missing")
            continue
        doc, _, anchor = url.partition("#")
        doc_path = os.path.join(paths.source, doc)
        if not os.path.isfile(doc_path):
            problems.append(f"{where}: {doc} does not exist")
            continue
        headings = [github_anchor(h) for h in
                    re.findall(r"^#+\s+(.*)$", open(doc_path).read(), re.M)]
        if anchor and anchor not in headings:
            problems.append(f"{where}: {doc} has no heading with anchor #{anchor}")
    if problems:
        fail("\n".join(problems))
    print("every runbook_url names an existing heading")


# ------------------------------------------------------------------ kustomize

def check_kustomize(paths):
    if shutil.which("kubectl") is None:
        print("kubectl not found: skipped")
        sys.exit(77)
    r = subprocess.run(["kubectl", "kustomize", paths.deploy], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"kubectl kustomize {paths.deploy} failed: {r.stderr}")
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    want = {
        "momentum-prometheus-config": [paths.config],
        "momentum-prometheus-rules": paths.rules,
    }
    problems = []
    for name, files in want.items():
        if name not in maps:
            problems.append(f"{paths.deploy}/kustomization.yaml: no ConfigMap {name} "
                            f"(rendered: {sorted(maps)})")
            continue
        data = maps[name].get("data") or {}
        expected = {os.path.basename(f): open(f).read() for f in files}
        if set(data) != set(expected):
            problems.append(f"ConfigMap {name}: keys {sorted(data)}, expected {sorted(expected)}")
        for key, text in expected.items():
            if key in data and data[key] != text:
                problems.append(f"ConfigMap {name}: {key} differs from the file")
    if problems:
        fail("\n".join(problems))
    print(f"rendered {len(docs)} objects; ConfigMaps {sorted(want)} hold the files as they are")


COMMANDS = {
    "config": check_config,
    "rules": check_rules,
    "unit": check_unit,
    "metrics": check_metrics,
    "coverage": check_coverage,
    "runbooks": check_runbooks,
    "kustomize": check_kustomize,
    "relabel": check_relabel,
}


def main(argv):
    if len(argv) != 3 or argv[2] not in COMMANDS:
        sys.stderr.write(__doc__)
        return 2
    try:
        COMMANDS[argv[2]](Paths(argv[1]))
    except CheckError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
