"""Structural checks of the Grafana dashboards in deploy/grafana/dashboards,
shared by lint_test.py and live_test.py.

Every error names the file and the JSON path of the field at fault.
"""

import json
import os
import re

GRID_COLUMNS = 24
# Grafana's built-in variables, substituted by Grafana itself.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms",
                     "__range_s", "__range_ms"}


def dashboard_dir(source_dir):
    return os.path.join(source_dir, "deploy", "grafana", "dashboards")


def load_dashboards(source_dir):
    """{file name: dashboard} for every *.json in deploy/grafana/dashboards."""
    d = dashboard_dir(source_dir)
    out = {}
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                out[name] = json.load(f)
        except json.JSONDecodeError as e:
            raise AssertionError(f"{path}: not JSON: {e}") from e
    if not out:
        raise AssertionError(f"{d}: no dashboards (*.json)")
    return out


def documented_metrics(source_dir):
    """{name: type} of every metric in the tables of docs/metrics.md."""
    with open(os.path.join(source_dir, "docs", "metrics.md")) as f:
        text = f.read()
    return dict(re.findall(r"^\| `(momentum_[a-z0-9_]+)` \| (\w+) \|", text, re.M))


def all_panels(dashboard):
    """(JSON path, panel) of every panel, rows' nested panels included."""
    for i, p in enumerate(dashboard.get("panels", [])):
        yield f"panels[{i}]", p
        for j, q in enumerate(p.get("panels", []) if p.get("type") == "row" else []):
            yield f"panels[{i}].panels[{j}]", q


def targets(dashboard):
    """(JSON path, panel, target) of every query of every panel."""
    for where, p in all_panels(dashboard):
        for k, t in enumerate(p.get("targets", [])):
            yield f"{where}.targets[{k}]", p, t


def metric_names(expr):
    """Metric names in a PromQL expression: momentum_* identifiers."""
    return set(re.findall(r"\bmomentum_[a-z0-9_]+\b", expr))


def lint(name, dashboard, documented):
    """Errors ("FILE: PATH: what") of one dashboard; empty when clean."""
    errors = []

    def err(where, what):
        errors.append(f"{name}: {where}: {what}")

    for field in ("uid", "title", "schemaVersion"):
        if not dashboard.get(field):
            err(field, "missing")
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        err("templating.list", "no datasource variable")
    seen_ids = {}
    boxes = []
    for where, p in all_panels(dashboard):
        if not isinstance(p.get("title"), str) or not p["title"].strip():
            err(f"{where}.title", "missing or empty")
        pid = p.get("id")
        if not isinstance(pid, int):
            err(f"{where}.id", f"not an integer: {pid!r}")
        elif pid in seen_ids:
            err(f"{where}.id", f"{pid} also used by {seen_ids[pid]}")
        else:
            seen_ids[pid] = where
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in "hwxy"):
            err(f"{where}.gridPos", f"needs integer h, w, x, y: {g!r}")
        else:
            if g["x"] < 0 or g["y"] < 0 or g["w"] < 1 or g["h"] < 1 or \
                    g["x"] + g["w"] > GRID_COLUMNS:
                err(f"{where}.gridPos", f"outside the {GRID_COLUMNS}-column grid: {g}")
            for other, og in boxes:
                if g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] and \
                        g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]:
                    err(f"{where}.gridPos", f"overlaps {other}")
            boxes.append((where, g))
        if p.get("type") == "row":
            continue
        ds = p.get("datasource", {})
        if ds.get("uid") != "${datasource}":
            err(f"{where}.datasource.uid", f"{ds.get('uid')!r}, not ${{datasource}}")
        if not p.get("targets"):
            err(f"{where}.targets", "no queries")
        refs = set()
        for k, t in enumerate(p.get("targets", [])):
            tw = f"{where}.targets[{k}]"
            if not t.get("refId"):
                err(f"{tw}.refId", "missing")
            elif t["refId"] in refs:
                err(f"{tw}.refId", f"{t['refId']} used twice in the panel")
            refs.add(t.get("refId"))
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                err(f"{tw}.expr", "missing or empty")
                continue
            for var in re.findall(r"\$\{?(\w+)", expr):
                if var not in variables and var not in BUILTIN_VARIABLES:
                    err(f"{tw}.expr", f"uses ${var}, which is no variable of the dashboard")
            for m in sorted(metric_names(expr)):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if m not in documented and documented.get(base) != "histogram":
                    err(f"{tw}.expr", f"metric {m} is not in docs/metrics.md")
    return errors


def substitute(expr, values):
    """expr with $var / ${var} replaced from values (longest names first)."""
    for var in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + var + "}", values[var]).replace("$" + var, values[var])
    if "$" in expr:
        raise AssertionError(f"unsubstituted variable left in {expr!r}")
    return expr
