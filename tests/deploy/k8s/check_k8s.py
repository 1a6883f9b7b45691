#!/usr/bin/env python3
"""Checks deploy/k8s (tests/deploy/k8s.cmake runs it from CTest):

 1. `kubectl kustomize` renders the base, overlays/cpu, overlays/gpu, the
    optional ServiceMonitor component on an overlay, and the kustomization
    that deploy/k8s/make-secrets.sh writes;
 2. every rendered object is valid for each Kubernetes version in
    K8S_VERSIONS: kubernetes-validate's strict JSON schemas of that version
    (unknown fields, wrong types, missing required fields, enums), with the
    value formats the API server enforces (quantities, int32/int64, base64
    bytes, date-times); the ServiceMonitor, a CRD kubernetes-validate does not
    know, against servicemonitor.schema.json (a subset of prometheus-operator's
    v1 ServiceMonitor CRD, unknown fields rejected);
 3. Momentum's own policies on every render (probes, resources, pinned
    images, non-root, GPU, rendezvous Service, NetworkPolicies, labels, ...),
    including that every flag given to momentum-server / momentum-agent is
    one the built binaries accept (their --help);
 4. the Secrets make-secrets.sh makes work: the real momentum-server starts
    with the coordinator's rendered arguments and them, a user lists jobs,
    and the real momentum-agent, with its rendered arguments, registers.

Each check is also run on deliberately broken copies, which must be rejected
(at the expected field, with the expected kind of error); fields that newer
Kubernetes versions added must be rejected by the older ones and accepted by
the newer. With --python (a Python with grpcio), the live check also asks both
health ports what the kubelet's grpc probes would.

usage: check_k8s.py --source-dir DIR --binary-dir DIR [--python PYTHON]
Prints `ok   ...` / `FAIL ...` per check and `N passed, M failed`; exits 1 on
any failure, 2 on bad usage.
"""

import argparse
import base64
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

HERE = os.path.dirname(os.path.abspath(__file__))

# The Kubernetes versions every render must be valid for: 1.27, the oldest
# docs/deploy.md supports (grpc probes are GA since 1.27); 1.30, the
# version of the namespace's pod-security enforce-version; 1.33; and 1.37,
# the newest kubernetes-validate carries.
K8S_VERSIONS = ("1.27", "1.30", "1.33", "1.37")


def _vt(version):
    return tuple(int(x) for x in version.split("."))


def older_than(version):
    """The versions of K8S_VERSIONS before `version` (a field added in it is
    unknown to them)."""
    return tuple(v for v in K8S_VERSIONS if _vt(v) < _vt(version))

SERVICEMONITOR_SCHEMA = os.path.join(HERE, "servicemonitor.schema.json")
SERVICEMONITOR_ORIGIN = "prometheus-operator v0.84.1 CRD subset"

# ---------------------------------------------------------------- results
passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}", flush=True)
    else:
        failed += 1
        text = f"FAIL {name}"
        if detail:
            text += "".join(f"\n     {line}" for line in str(detail).splitlines())
        print(text, flush=True)


def js_str(v):
    """A scalar as JavaScript's String() (and Kubernetes' YAML) writes it."""
    if v is None:
        return "undefined"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# ---------------------------------------------------------------- rendering
class _Loader(yaml.SafeLoader):
    """YAML as the API server reads it: no timestamps (strings stay strings),
    and a key given twice is an error."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# A plain `=` is YAML 1.1's "value" tag; Kubernetes reads it as the string.
_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_scalar)


def kustomize(directory):
    """(objects, None) or (None, error)."""
    try:
        r = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"kubectl: {e}"
    if r.returncode != 0:
        return None, r.stderr.strip()
    try:
        return [o for o in yaml.load_all(r.stdout, Loader=_Loader) if o], None
    except yaml.YAMLError as e:
        return None, str(e)


def id_of(o):
    return f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"


# ---------------------------------------------------------------- schemas
UNKNOWN = "unknown field"
MISSING = "missing required field"
TYPE = "wrong type or value"
FORMAT = "bad format"

# Kubernetes' resource.Quantity grammar (apimachinery's quantity.go).
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


def _format_checker():
    fc = jsonschema.FormatChecker(formats=())

    def int_range(bits):
        def ok(v):
            if not isinstance(v, int) or isinstance(v, bool):
                return True  # the type keyword reports non-integers
            return -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)
        return ok

    fc.checks("int32")(int_range(32))
    fc.checks("int64")(int_range(64))

    @fc.checks("byte")
    def _byte(v):
        if not isinstance(v, str):
            return True
        # kustomize folds long values over lines; the API server's base64
        # decoder skips the newlines.
        s = re.sub(r"\s+", "", v)
        if len(s) % 4:
            return False
        try:
            base64.b64decode(s, validate=True)
            return True
        except ValueError:
            return False

    @fc.checks("date-time")
    def _date_time(v):
        return not isinstance(v, str) or bool(RFC3339.match(v))

    return fc


def field_path(parts):
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENT.match(p):
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out


class SchemaSet:
    """kubernetes-validate's strict schemas of one Kubernetes version, loaded
    once, with Quantity's grammar added and a format checker."""

    def __init__(self, version):
        self.version = version
        full = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == version]
        if not full:
            raise SystemExit(f"check_k8s.py: kubernetes-validate {kubernetes_validate.__version__} "
                             f"has no schemas for Kubernetes {version}")
        self.dir = f"kubernetes-json-schema/v{full[-1]}-local-strict"
        defs = kv_utils.schema_contents(f"{self.dir}/_definitions.json", version)
        q = defs["$defs"]["io.k8s.apimachinery.pkg.api.resource.Quantity"]
        for alt in q["oneOf"]:
            if "string" in alt["type"]:
                alt["pattern"] = QUANTITY
        self.registry = Resource.from_contents(defs) @ Registry()
        with open(SERVICEMONITOR_SCHEMA, encoding="utf-8") as f:
            sm = json.load(f)
        self.registry = Resource.from_contents(sm) @ self.registry
        self.validators = {("monitoring.coreos.com/v1", "ServiceMonitor"): self._validator(sm)}

    def _validator(self, schema):
        return jsonschema.Draft202012Validator(schema, registry=self.registry,
                                               format_checker=_format_checker())

    def validator(self, api_version, kind):
        key = (api_version, kind)
        if key not in self.validators:
            api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            try:
                schema = kv_utils.schema_contents(f"{self.dir}/{kind.lower()}-{api}.json", self.version)
            except FileNotFoundError:
                schema = None
            self.validators[key] = self._validator(schema) if schema else None
        return self.validators[key]

    def errors(self, obj):
        """[(path, kind, message)] of one object."""
        api, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api, str) or not isinstance(kind, str):
            return [("", MISSING, "apiVersion and kind are required")]
        v = self.validator(api, kind)
        if v is None:
            return [("", TYPE, f"no Kubernetes {self.version} schema for {api} {kind}")]
        out = []
        for e in v.iter_errors(obj):
            out.extend(_explain(e))
        return sorted(set(out))


def _explain(e):
    """A jsonschema error as (field path, kind, message) entries."""
    path = list(e.absolute_path)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        known = set((e.schema or {}).get("properties", {}))
        extra = [k for k in e.instance if k not in known]
        return [(field_path(path + [k]), UNKNOWN, f"{json.dumps(k)} is not a field of this object")
                for k in extra]
    if e.validator == "required" and isinstance(e.instance, dict):
        return [(field_path(path + [k]), MISSING, f"{json.dumps(k)} is required")
                for k in e.validator_value if k not in e.instance]
    if e.validator in ("format", "pattern"):
        return [(field_path(path), FORMAT, e.message)]
    if e.validator in ("oneOf", "anyOf") and e.context:
        # Quantity / IntOrString: report what the string branch said, if it
        # was a string (a bad quantity), else the type mismatch.
        fmt = [c for c in e.context if c.validator in ("format", "pattern")]
        if fmt:
            return [(field_path(path), FORMAT, fmt[0].message)]
    return [(field_path(path), TYPE, e.message)]


# ---------------------------------------------------------------- policies
def pod_template(o):
    kind = o.get("kind")
    spec = o.get("spec") or {}
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return spec.get("template")
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]
    if kind == "Pod":
        return o
    return None


def selects(selector, labels):
    if not selector:
        return False
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        has = e["key"] in labels
        op = e.get("operator")
        vals = e.get("values") or []
        if op == "In" and not (has and labels[e["key"]] in vals):
            return False
        if op == "NotIn" and has and labels[e["key"]] in vals:
            return False
        if op == "Exists" and not has:
            return False
        if op == "DoesNotExist" and has:
            return False
    return True


def help_flags(binary):
    """Flags a Momentum binary accepts, from its --help (CLI11 format)."""
    try:
        r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{binary} --help: {e}"
    if r.returncode != 0:
        return None, f"{binary} --help: exit {r.returncode}"
    flags, required = set(), set()
    for line in r.stdout.split("\n"):
        m = re.match(r"^\s+(?:-\w,)?--([a-z0-9][a-z0-9-]*)\b", line)
        if not m:
            continue
        flags.add(m.group(1))
        if re.search(r"\bREQUIRED\b", line):
            required.add(m.group(1))
    return {"flags": flags, "required": required}, None


def parse_flags(args):
    """"--flag=value" or "--flag value" -> [(flag, value)]; a non-flag: (None, arg)."""
    out = []
    i = 0
    while i < len(args):
        m = re.match(r"^--([^=]+)(?:=(.*))?$", args[i], re.S)
        if not m:
            out.append((None, args[i]))
            i += 1
            continue
        value = m.group(2)
        if value is None and i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            value = args[i]
        out.append((m.group(1), value))
        i += 1
    return out


FILE_FLAGS = ("state-dir", "tls-cert", "tls-key", "tls-client-ca", "tls-ca", "token-file",
              "data-root", "output-root", "work-dir")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def policy_violations(objects, name, gpu, binaries):
    """Violations of Momentum's policies in one render, each naming render,
    object and field."""
    v = []

    def bad(o, field, msg):
        v.append(f"{name}: {id_of(o)}: {field}: {msg}")

    def by_kind(k):
        return [o for o in objects if o.get("kind") == k]

    def find(k, n):
        return next((o for o in objects if o.get("kind") == k and o["metadata"].get("name") == n), None)

    workloads = [o for o in objects if pod_template(o)]

    def comp(o):
        return ((pod_template(o).get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")

    coordinators = [o for o in workloads if comp(o) == "coordinator"]
    agents = [o for o in workloads if comp(o) == "agent"]
    if len(coordinators) != 1:
        v.append(f"{name}: expected one coordinator workload, found {len(coordinators)}")
    if len(agents) != 1:
        v.append(f"{name}: expected one agent workload, found {len(agents)}")

    for o in objects:
        md = o.get("metadata") or {}
        labels = md.get("labels") or {}
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/part-of"):
            if not labels.get(k):
                bad(o, f'metadata.labels["{k}"]', "missing")
        if o.get("kind") != "Namespace" and not md.get("namespace"):
            bad(o, "metadata.namespace", "missing")
    for sa in by_kind("ServiceAccount"):
        if sa.get("automountServiceAccountToken") is not False:
            bad(sa, "automountServiceAccountToken", "must be false")

    for o in workloads:
        t = pod_template(o)
        ps = t.get("spec") or {}
        psc = ps.get("securityContext") or {}
        tl = (t.get("metadata") or {}).get("labels") or {}
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component"):
            if not tl.get(k):
                bad(o, f'spec.template.metadata.labels["{k}"]', "missing")
        if ps.get("automountServiceAccountToken") is not False:
            bad(o, "spec.template.spec.automountServiceAccountToken", "must be false")
        if not ps.get("serviceAccountName") or not find("ServiceAccount", ps.get("serviceAccountName")):
            bad(o, "spec.template.spec.serviceAccountName",
                f"names no ServiceAccount of this render ({ps.get('serviceAccountName')})")
        fs_group = psc.get("fsGroup")
        if not (isinstance(fs_group, (int, float)) and not isinstance(fs_group, bool) and fs_group > 0):
            bad(o, "spec.template.spec.securityContext.fsGroup", "must be set (non-zero) for the volumes")
        volumes = {vol["name"]: vol for vol in ps.get("volumes") or []}
        for vol in ps.get("volumes") or []:
            if vol.get("secret") and not find("Secret", vol["secret"].get("secretName")):
                bad(o, f"volumes[{vol['name']}].secret.secretName",
                    f"no Secret {vol['secret'].get('secretName')} in this render")
            pvc = vol.get("persistentVolumeClaim")
            if pvc and not find("PersistentVolumeClaim", pvc.get("claimName")):
                bad(o, f"volumes[{vol['name']}].persistentVolumeClaim.claimName",
                    f"no PersistentVolumeClaim {pvc.get('claimName')} in this render")
        containers = [(c, "initContainers") for c in ps.get("initContainers") or []] + \
                     [(c, "containers") for c in ps.get("containers") or []]
        for c, lst in containers:
            f = f"spec.template.spec.{lst}[{c.get('name')}]"
            sc = c.get("securityContext") or {}
            if lst == "containers":
                for p in ("livenessProbe", "readinessProbe"):
                    if not c.get(p):
                        bad(o, f"{f}.{p}", "missing")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if not (res.get(kind) and res[kind].get(r) is not None):
                        bad(o, f"{f}.resources.{kind}.{r}", "missing")
            img = c.get("image") or ""
            m = re.match(r"^(.*?)(?::(\w[\w.-]*))?(?:@sha256:[0-9a-f]{64})?$", img[img.rfind("/") + 1:])
            if not img:
                bad(o, f"{f}.image", "missing")
            elif not (m and m.group(2)) and "@sha256:" not in img:
                bad(o, f"{f}.image", f"{img} has no tag (pin one)")
            elif m and m.group(2) == "latest":
                bad(o, f"{f}.image", f"{img}: tag latest is not pinned")
            non_root = sc["runAsNonRoot"] if "runAsNonRoot" in sc else psc.get("runAsNonRoot")
            uid = sc["runAsUser"] if "runAsUser" in sc else psc.get("runAsUser")
            if non_root is not True:
                bad(o, f"{f}.securityContext.runAsNonRoot", "must be true")
            if not (isinstance(uid, int) and not isinstance(uid, bool) and uid > 0):
                bad(o, f"{f}.securityContext.runAsUser", f"must be a non-zero uid, got {js_str(uid)}")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad(o, f"{f}.securityContext.allowPrivilegeEscalation", "must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad(o, f"{f}.securityContext.readOnlyRootFilesystem", "must be true")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                bad(o, f"{f}.securityContext.capabilities.drop", "must contain ALL")
            if caps.get("add"):
                bad(o, f"{f}.securityContext.capabilities.add", "must be empty")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                bad(o, f"{f}.securityContext.seccompProfile.type", f"must be RuntimeDefault, got {js_str(seccomp)}")
            if sc.get("privileged"):
                bad(o, f"{f}.securityContext.privileged", "must not be set")
            mounts = c.get("volumeMounts") or []
            for vm in mounts:
                if vm.get("name") not in volumes:
                    bad(o, f"{f}.volumeMounts[{vm.get('name')}]", "names no volume of the pod")

            # Momentum binaries: flags the built binary accepts, $(VAR)s
            # defined, file paths on a mounted volume, health port = probe port.
            binary = os.path.basename((c.get("command") or [""])[0] or "")
            if binary not in ("momentum-server", "momentum-agent"):
                continue
            hlp = binaries.get(binary)
            args = c.get("args") or []
            flags = parse_flags(args)
            env = {e["name"]: e for e in c.get("env") or []}
            for a in args:
                for ref in VAR_REF.finditer(a):
                    if ref.group(1) not in env:
                        bad(o, f"{f}.args", f"{a} uses $({ref.group(1)}), which the container's env does not define")
            for flag, value in flags:
                if flag is None:
                    bad(o, f"{f}.args", f"stray argument {value}")
                elif hlp and flag not in hlp["flags"]:
                    bad(o, f"{f}.args", f"--{flag} is not a flag {binary} accepts ({binary} --help)")
                if flag and flag in FILE_FLAGS and value and value.startswith("/"):
                    mounted = any(value == vm["mountPath"] or
                                  value.startswith(vm["mountPath"].rstrip("/") + "/") for vm in mounts)
                    if not mounted:
                        bad(o, f"{f}.args", f"--{flag}={value} is on no mounted volume (read-only root filesystem)")
            if hlp:
                for r in sorted(hlp["required"]):
                    if not any(fl == r for fl, _ in flags):
                        bad(o, f"{f}.args", f"required --{r} missing")

            def flag_value(n):
                return next((val for fl, val in flags if fl == n), None)

            def resolved_flag(n):
                """The flag's value, a $(VAR) resolved through the container's
                env from its ConfigMap; None where it cannot be."""
                value = flag_value(n)
                var = re.match(r"^\$\((\w+)\)$", value or "")
                if not var:
                    return value
                ref = ((env.get(var.group(1)) or {}).get("valueFrom") or {}).get("configMapKeyRef")
                cm = find("ConfigMap", ref.get("name")) if ref else None
                return (cm.get("data") or {}).get(ref["key"]) if cm else None

            health = flag_value("health-listen")
            if not health:
                bad(o, f"{f}.args", "--health-listen missing (the grpc probes need it)")
            for p in ("livenessProbe", "readinessProbe", "startupProbe"):
                if not c.get(p):
                    continue
                if not c[p].get("grpc"):
                    bad(o, f"{f}.{p}", "must be a grpc probe")
                elif health and js_str(c[p]["grpc"].get("port")) != health.split(":")[-1]:
                    bad(o, f"{f}.{p}.grpc.port",
                        f"{js_str(c[p]['grpc'].get('port'))} is not the --health-listen port ({health})")

            def env_from(n, want):
                e = env.get(n)
                ref = ((e or {}).get("valueFrom") or {}).get("fieldRef") or {}
                return bool(e) and ref.get("fieldPath") in want

            if binary == "momentum-server":
                spec = o.get("spec") or {}
                if not (o.get("kind") == "Deployment" and spec.get("replicas") == 1 and
                        (spec.get("strategy") or {}).get("type") == "Recreate"):
                    bad(o, "spec", "the coordinator must be a Deployment of 1 replica with strategy Recreate "
                        "(one writer of the store)")
                state = flag_value("state-dir")
                vm = next((x for x in mounts if x.get("mountPath") == state), None)
                if not vm or not (volumes.get(vm.get("name")) or {}).get("persistentVolumeClaim"):
                    bad(o, f"{f}.volumeMounts", f"--state-dir={js_str(state)} is not a PersistentVolumeClaim mount")
                for fl in ("tls-cert", "tls-key", "tls-client-ca", "token-file"):
                    if not flag_value(fl):
                        bad(o, f"{f}.args", f"--{fl} missing (TLS, mutual TLS and tokens are required)")
                if flag_value("slots") != "0":
                    bad(o, f"{f}.args", "--slots must be 0 (agents run the ranks)")
                if flag_value("gpus") != "none":
                    bad(o, f"{f}.args", "--gpus must be none (agents run the ranks)")
                metrics_port = (flag_value("metrics-listen") or "").split(":")[-1]
                ann = (t.get("metadata") or {}).get("annotations") or {}
                if (ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != metrics_port
                        or ann.get("prometheus.io/path") != "/metrics"):
                    bad(o, "spec.template.metadata.annotations",
                        f'prometheus.io/scrape "true", port "{metrics_port}" and path /metrics required')
                for port in ((flag_value("listen") or "").split(":")[-1], metrics_port):
                    if not any(js_str(p.get("containerPort")) == port for p in c.get("ports") or []):
                        bad(o, f"{f}.ports", f"no containerPort {port}")
            else:
                if o.get("kind") != "DaemonSet":
                    bad(o, "kind", "agents must be a DaemonSet (one per node)")
                adv = flag_value("advertise") or ""
                adv_var = re.match(r"^\$\((\w+)\)$", adv)
                if not adv_var or not env_from(adv_var.group(1), ["status.podIP"]):
                    bad(o, f"{f}.args",
                        f"--advertise={adv} must be $(VAR) with VAR from the downward API status.podIP")
                nm = re.match(r"^\$\((\w+)\)$", flag_value("name") or "")
                if not nm or not env_from(nm.group(1), ["metadata.name", "spec.nodeName"]):
                    bad(o, f"{f}.args", "--name must come from the pod or node name (downward API)")
                for fl in ("tls-ca", "tls-cert", "tls-key", "token-file"):
                    if not flag_value(fl):
                        bad(o, f"{f}.args", f"--{fl} missing")
                # Slots: a number, from the agent ConfigMap; on GPU nodes = GPUs.
                slots = resolved_flag("slots")
                if not re.match(r"^[1-9][0-9]*$", js_str(slots)):
                    bad(o, f"{f}.args", f"--slots must resolve to a positive integer, got {js_str(slots)}")
                # GPUs: those the pod was given on GPU nodes, none elsewhere.
                gpus = resolved_flag("gpus")
                want_gpus = "auto" if gpu else "none"
                if js_str(gpus) != want_gpus:
                    bad(o, f"{f}.args", f"--gpus must resolve to {want_gpus}"
                        f"{' (the GPUs the pod holds)' if gpu else ' (a pod without GPUs)'}, got {js_str(gpus)}")
                limits = (c.get("resources") or {}).get("limits") or {}
                if gpu:
                    lim = limits.get("nvidia.com/gpu")
                    if lim is None:
                        bad(o, f'{f}.resources.limits["nvidia.com/gpu"]', "missing in the gpu overlay")
                    elif js_str(lim) != js_str(slots):
                        bad(o, f'{f}.resources.limits["nvidia.com/gpu"]',
                            f"{js_str(lim)} differs from --slots {js_str(slots)} (one rank per GPU)")
                    shm = next((x for x in mounts if x.get("mountPath") == "/dev/shm"), None)
                    vol = volumes.get(shm.get("name")) if shm else None
                    if not (vol and (vol.get("emptyDir") or {}).get("medium") == "Memory"):
                        bad(o, f"{f}.volumeMounts",
                            "the gpu overlay needs an emptyDir with medium Memory mounted at /dev/shm")
                    if not ps.get("nodeSelector") and not ps.get("affinity"):
                        bad(o, "spec.template.spec.nodeSelector", "gpu agents must be confined to GPU nodes")
                    if "NCCL_SOCKET_IFNAME" not in env:
                        bad(o, f"{f}.env", "NCCL_SOCKET_IFNAME missing")
                elif limits.get("nvidia.com/gpu") is not None:
                    bad(o, f"{f}.resources.limits", "nvidia.com/gpu outside the gpu overlay")
            # Shared storage: /data and /outputs on ReadWriteMany claims.
            for mp in ("/data", "/outputs"):
                vm = next((x for x in mounts if x.get("mountPath") == mp), None)
                pvc = (volumes.get(vm.get("name")) or {}).get("persistentVolumeClaim") if vm else None
                claim = find("PersistentVolumeClaim", pvc.get("claimName")) if pvc else None
                if not (claim and "ReadWriteMany" in ((claim.get("spec") or {}).get("accessModes") or [])):
                    bad(o, f"{f}.volumeMounts", f"{mp} must be a ReadWriteMany PersistentVolumeClaim")

    # The rendezvous Service: headless, published before ready, selects agents.
    agent_labels = ((pod_template(agents[0]).get("metadata") or {}).get("labels") or {}) if agents else {}
    services = by_kind("Service")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"
                and selects({"matchLabels": s["spec"].get("selector")}, agent_labels)]
    if not headless:
        v.append(f"{name}: no headless Service (clusterIP: None) selects the agent pods")
    for s in headless:
        if s["spec"].get("publishNotReadyAddresses") is not True:
            bad(s, "spec.publishNotReadyAddresses", "must be true (rendezvous before readiness)")

    # Coordinator Service: gRPC and metrics, scrape annotations.
    if len(coordinators) == 1:
        cl = (pod_template(coordinators[0]).get("metadata") or {}).get("labels") or {}
        svc = [s for s in services if s["spec"].get("clusterIP") != "None"
               and selects({"matchLabels": s["spec"].get("selector")}, cl)]
        if len(svc) != 1:
            v.append(f"{name}: expected one Service for the coordinator, found {len(svc)}")
        for s in svc:
            ports = [p.get("port") for p in s["spec"].get("ports") or []]
            for p in (50051, 9464):
                if p not in ports:
                    bad(s, "spec.ports", f"port {p} missing")
            a = s["metadata"].get("annotations") or {}
            if (a.get("prometheus.io/scrape") != "true" or a.get("prometheus.io/port") != "9464"
                    or a.get("prometheus.io/path") != "/metrics"):
                bad(s, "metadata.annotations", "prometheus.io/scrape, port 9464 and path /metrics required")

    # NetworkPolicies: the agents (ranks' c10d ports) only from Momentum pods.
    nps = by_kind("NetworkPolicy")
    agent_nps = [n for n in nps if selects(n["spec"].get("podSelector"), agent_labels)]
    if not agent_nps:
        v.append(f"{name}: no NetworkPolicy selects the agent pods (c10d is unauthenticated)")
    def ingress_rules(n):
        """The policy's ingress rules, after the checks every policy needs:
        Ingress among its types, and no rule open to every source."""
        if "Ingress" not in (n["spec"].get("policyTypes") or []):
            bad(n, "spec.policyTypes", "must include Ingress")
        rules = list(enumerate(n["spec"].get("ingress") or []))
        for i, rule in rules:
            if not rule.get("from"):
                bad(n, f"spec.ingress[{i}].from", "empty: allows every source")
        return rules

    for n in agent_nps:
        for i, rule in ingress_rules(n):
            for j, peer in enumerate(rule.get("from") or []):
                ml = (peer.get("podSelector") or {}).get("matchLabels") or {}
                ok = (not peer.get("ipBlock") and not peer.get("namespaceSelector") and peer.get("podSelector")
                      and ml.get("app.kubernetes.io/part-of") == "momentum")
                if not ok:
                    bad(n, f"spec.ingress[{i}].from[{j}]",
                        "agents accept only pods labelled app.kubernetes.io/part-of: momentum of their namespace")
    if len(coordinators) == 1:
        cl = (pod_template(coordinators[0]).get("metadata") or {}).get("labels") or {}
        cn = [n for n in nps if selects(n["spec"].get("podSelector"), cl)]
        if not cn:
            v.append(f"{name}: no NetworkPolicy selects the coordinator")
        for n in cn:
            for i, rule in ingress_rules(n):
                if not rule.get("ports"):
                    bad(n, f"spec.ingress[{i}].ports", "empty: opens every port")
    # Every Momentum pod carries the label the agents' policy trusts.
    for o in workloads:
        if ((pod_template(o).get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/part-of") != "momentum":
            bad(o, "spec.template.metadata.labels", "app.kubernetes.io/part-of: momentum missing")
    return v


# ---------------------------------------------------------------- live check
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEALTH_CODE = "\n".join([
    "import grpc, sys",
    "ch = grpc.insecure_channel(sys.argv[1])",
    "f = ch.unary_unary('/grpc.health.v1.Health/Check', request_serializer=lambda x: x, "
    "response_deserializer=lambda x: x)",
    "r = f(b'', timeout=5)",
    "print(r[1] if len(r) >= 2 and r[0] == 8 else 0)",
])


def health_check(python, address):
    """grpc.health.v1.Health/Check on a plaintext address, as the kubelet's
    grpc probe does: 1 SERVING, 2 NOT_SERVING, or an error string."""
    try:
        r = subprocess.run([python, "-c", HEALTH_CODE, address], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"health check of {address} failed: {e}"
    if r.returncode != 0:
        last = ((r.stderr or "").strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return f"health check of {address} failed: {last}"
    try:
        return int(r.stdout.strip())
    except ValueError:
        return f"health check of {address}: {r.stdout.strip()!r}"


def b64(s):
    return base64.b64decode(re.sub(r"\s+", "", s or ""))


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, argv, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def live_check(objects, bin_dir, tmp, user_files, python):
    """Runs the real server and agent with the rendered arguments (paths
    mapped to a temp dir, addresses to loopback) and the make-secrets
    Secrets. Returns [(ok, message)]."""
    def workload(comp):
        return next(o for o in objects if pod_template(o) and
                    pod_template(o)["metadata"]["labels"].get("app.kubernetes.io/component") == comp)

    coord, agent = workload("coordinator"), workload("agent")
    root = os.path.join(tmp, "live")

    def mapper(o):
        # Materialise each pod's mounts: secrets decoded, other volumes as dirs.
        ps = pod_template(o)["spec"]
        c = ps["containers"][0]
        vols = {v["name"]: v for v in ps["volumes"]}
        mounts = []
        for vm in c["volumeMounts"]:
            d = os.path.join(root, o["metadata"]["name"], vm["mountPath"].lstrip("/"))
            os.makedirs(d, exist_ok=True)
            vol = vols[vm["name"]]
            if vol.get("secret"):
                s = next(x for x in objects if x["kind"] == "Secret" and
                         x["metadata"]["name"] == vol["secret"]["secretName"])
                for k, val in (s.get("data") or {}).items():
                    p = os.path.join(d, k)
                    with open(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                        f.write(b64(val))
            mounts.append((vm["mountPath"], d))
        mounts.sort(key=lambda m: -len(m[0]))

        def map_path(p):
            for mp, d in mounts:
                if p == mp or p.startswith(mp + "/"):
                    return d + p[len(mp):]
            return p
        return map_path

    def map_args(c, map_path, subst, flags):
        out = []
        for a in c.get("args") or []:
            m = re.match(r"^--([^=]+)=(.*)$", a, re.S)
            if not m:
                out.append(a)
                continue
            val = VAR_REF.sub(lambda r: subst.get(r.group(1), r.group(0)), m.group(2))
            if m.group(1) in flags:
                val = flags[m.group(1)]
            elif val.startswith("/"):
                val = map_path(val)
            out.append(f"--{m.group(1)}={val}")
        return out

    results = []
    cc = pod_template(coord)["spec"]["containers"][0]
    cmap = mapper(coord)
    grpc_port, metrics_port, health_port, agent_health = (free_port() for _ in range(4))
    ready = os.path.join(root, "ready.json")
    sargs = map_args(cc, cmap, {}, {"listen": f"127.0.0.1:{grpc_port}",
                                    "metrics-listen": f"127.0.0.1:{metrics_port}",
                                    "health-listen": f"127.0.0.1:{health_port}"})
    sargs.append(f"--ready-file={ready}")
    server = Proc([os.path.join(bin_dir, "server", "momentum-server")] + sargs, os.path.join(tmp, "server.log"))
    procs = [server]
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(ready) and os.path.getsize(ready) > 0):
            if server.p.poll() is not None or time.monotonic() > deadline:
                results.append((False, "momentum-server with the rendered coordinator args did not start:\n"
                                + " ".join(sargs) + "\n" + server.text()))
                return results
            time.sleep(0.1)
        first = (server.text().strip().splitlines() or [""])[0]
        results.append((True, "momentum-server serves with the rendered coordinator args and make-secrets.sh's "
                        f"Secrets ({first})"))
        if python:
            h = health_check(python, f"127.0.0.1:{health_port}")
            results.append((h == 1, f"the coordinator's grpc probe port (--health-listen) answers SERVING: {h}"))
        # A user with the made certificate and token lists jobs over mutual TLS.
        client = os.path.join(bin_dir, "client", "momentum")
        base = [f"--server=localhost:{grpc_port}", f"--tls-ca={user_files['ca']}",
                f"--tls-cert={user_files['crt']}", f"--tls-key={user_files['key']}"]
        lst = subprocess.run([client] + base + [f"--token-file={user_files['token']}", "list"],
                             capture_output=True, text=True, timeout=20)
        results.append((lst.returncode == 0, f"momentum list with the user's certificate and token: exit "
                        f"{lst.returncode} {(lst.stdout + lst.stderr).strip()}"))
        no_tok = subprocess.run([client] + base + ["list"], capture_output=True, text=True, timeout=20)
        results.append((no_tok.returncode != 0 and "UNAUTHENTICATED" in no_tok.stderr,
                        f"momentum list without a token is refused: exit {no_tok.returncode} "
                        f"{no_tok.stderr.strip()}"))
        # The agent, with its rendered args, registers its slots.
        ac = pod_template(agent)["spec"]["containers"][0]
        amap = mapper(agent)
        # $(VAR)s from the ConfigMaps, as the kubelet expands them.
        from_maps = {}
        for e in ac["env"]:
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                from_maps[e["name"]] = next(x for x in objects if x["kind"] == "ConfigMap" and
                                            x["metadata"]["name"] == ref["name"])["data"][ref["key"]]
        slots = from_maps["MOMENTUM_SLOTS"]
        aargs = map_args(ac, amap,
                         {**from_maps, "POD_IP": "127.0.0.1", "POD_NAME": "momentum-agent-test",
                          "NODE_NAME": "node-test"},
                         {"server": f"localhost:{grpc_port}", "health-listen": f"127.0.0.1:{agent_health}",
                          "worker": "/bin/false"})
        ag = Proc([os.path.join(bin_dir, "server", "momentum-agent")] + aargs, os.path.join(tmp, "agent.log"))
        procs.append(ag)
        # The agent goes by its token's name (make-secrets.sh: agents), its
        # --name under it (docs/security.md).
        want = f"registered as agents/momentum-agent-test with {slots} slots"
        deadline = time.monotonic() + 20
        while want not in ag.text() and ag.p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        registered = want in ag.text()
        results.append((registered, f'momentum-agent with the rendered agent args: "{want}"\n'
                        + " ".join(aargs) + "\n" + ag.text().strip()))
        if python and registered:
            h = None
            for _ in range(50):
                h = health_check(python, f"127.0.0.1:{agent_health}")
                if h == 1:
                    break
                time.sleep(0.1)
            results.append((h == 1, f"the agent's grpc probe port (--health-listen) answers SERVING once "
                            f"registered: {h}"))
        return results
    finally:
        for p in reversed(procs):
            p.stop()


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--binary-dir", required=True)
    ap.add_argument("--python", help="a Python with grpcio, for the grpc health probes")
    args = ap.parse_args()
    src = os.path.abspath(args.source_dir)
    bin_dir = os.path.abspath(args.binary_dir)
    tmp = tempfile.mkdtemp(prefix="momentum-k8s-")
    try:
        run(src, bin_dir, os.path.join(src, "deploy", "k8s"), tmp, args.python)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def run(src, bin_dir, k8s, tmp, python):
    # --- 1. render
    # The ServiceMonitor component on the cpu overlay, as a user composes it.
    sm_dir = os.path.join(tmp, "with-servicemonitor")
    os.makedirs(sm_dir)
    with open(os.path.join(sm_dir, "kustomization.yaml"), "w") as f:
        f.write("\n".join([
            "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:",
            f"  - {os.path.relpath(os.path.join(k8s, 'overlays', 'cpu'), sm_dir)}", "components:",
            f"  - {os.path.relpath(os.path.join(k8s, 'components', 'servicemonitor'), sm_dir)}", ""]))
    # What make-secrets.sh writes (gpu overlay, one user).
    sec_dir = os.path.join(tmp, "secrets")
    ms = subprocess.run(["bash", os.path.join(k8s, "make-secrets.sh"), sec_dir, "gpu", "alice"],
                        capture_output=True, text=True, timeout=120)
    check("deploy/k8s/make-secrets.sh writes certificates, tokens and a kustomization", ms.returncode == 0,
          ms.stderr)
    if ms.returncode == 0:
        v = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(sec_dir, "ca.crt")] +
                           [os.path.join(sec_dir, f"{n}.crt") for n in ("server", "agent", "user-alice")],
                           capture_output=True, text=True, timeout=60)
        check("make-secrets.sh: server, agent and user certificates verify against its CA", v.returncode == 0,
              v.stdout + v.stderr)

    renders = [
        {"name": "deploy/k8s/base", "dir": os.path.join(k8s, "base"), "gpu": False},
        {"name": "deploy/k8s/overlays/cpu", "dir": os.path.join(k8s, "overlays", "cpu"), "gpu": False},
        {"name": "deploy/k8s/overlays/gpu", "dir": os.path.join(k8s, "overlays", "gpu"), "gpu": True},
        {"name": "overlays/cpu + components/servicemonitor", "dir": sm_dir, "gpu": False},
        {"name": "make-secrets.sh output (gpu)", "dir": sec_dir, "gpu": True},
    ]
    for r in renders:
        r["objects"], err = kustomize(r["dir"])
        n = f"{len(r['objects'])} objects" if r["objects"] is not None else "error"
        check(f"kubectl kustomize {r['name']} renders ({n})", r["objects"] is not None, err)
    ok = [r for r in renders if r["objects"] is not None]

    def by_name(n):
        return next((r for r in ok if r["name"] == n), None)

    sm = by_name("overlays/cpu + components/servicemonitor")
    base_r = by_name("deploy/k8s/base")
    if sm and base_r:
        check("the component adds a ServiceMonitor; the base has none",
              any(o["kind"] == "ServiceMonitor" for o in sm["objects"]) and
              not any(o["kind"] == "ServiceMonitor" for o in base_r["objects"]))

    # --- 2. schemas, with broken copies that must fail
    items = [(f"{r['name']}: {id_of(o)}", o) for r in ok for o in r["objects"]]
    schemas = {}
    for ver in K8S_VERSIONS:
        schemas[ver] = SchemaSet(ver)
        bad = [(label, errs) for label, o in items if (errs := schemas[ver].errors(o))]
        check(f"all {len(items)} rendered objects are valid Kubernetes {ver} objects (kubernetes-validate "
              f"{kubernetes_validate.__version__} strict schema: unknown fields, types, required fields, "
              f"formats; ServiceMonitor: {SERVICEMONITOR_ORIGIN})", not bad,
              "\n".join(f"{label}: " + "; ".join(f"{p or '(object)'}: {k}: {m}" for p, k, m in errs)
                        for label, errs in bad))

    cpu_r = by_name("deploy/k8s/overlays/cpu")
    gpu_r = by_name("deploy/k8s/overlays/gpu")
    cpu_objs = cpu_r["objects"] if cpu_r else []
    deploy = next((o for o in cpu_objs if o["kind"] == "Deployment"), None)
    svc = next((o for o in cpu_objs if o["kind"] == "Service"), None)
    secret = next((o for o in cpu_objs if o["kind"] == "Secret"), None)
    monitor = next((o for o in sm["objects"] if o["kind"] == "ServiceMonitor"), None) if sm else None

    def coord_c(objs):
        return pod_template(next(o for o in objs if o["kind"] == "Deployment"))["spec"]["containers"][0]

    def agent_c(objs):
        return pod_template(next(o for o in objs if o["kind"] == "DaemonSet"))["spec"]["containers"][0]

    def pod_spec(o):
        return pod_template(o)["spec"]

    def set_(path, value):
        """A mutation setting the field at path (a list of keys) to value."""
        def mutate(c):
            node = c
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        return mutate

    def delete(path):
        def mutate(c):
            node = c
            for k in path[:-1]:
                node = node[k]
            del node[path[-1]]
        return mutate

    containers0 = ["spec", "template", "spec", "containers", 0]
    # (what, object, mutation, expected field path, expected kind of error,
    #  the versions that must reject it; the others must accept it)
    every = K8S_VERSIONS
    schema_breaks = []
    if deploy:
        schema_breaks += [
            ("unknown field in a container", deploy, set_(containers0 + ["imagePullPolcy"], "Always"),
             "spec.template.spec.containers[0].imagePullPolcy", UNKNOWN, every),
            ("unknown field in the Deployment spec", deploy, set_(["spec", "replica"], 1),
             "spec.replica", UNKNOWN, every),
            ("replicas as a string", deploy, set_(["spec", "replicas"], "1"), "spec.replicas", TYPE, every),
            ("container without its required name", deploy, delete(containers0 + ["name"]),
             "spec.template.spec.containers[0].name", MISSING, every),
            ('cpu limit "two" (not a quantity)', deploy, set_(containers0 + ["resources", "limits", "cpu"], "two"),
             "spec.template.spec.containers[0].resources.limits.cpu", FORMAT, every),
            ("runAsUser beyond int64", deploy, set_(containers0 + ["securityContext", "runAsUser"], 2 ** 63),
             "spec.template.spec.containers[0].securityContext.runAsUser", FORMAT, every),
            # Fields newer Kubernetes versions added: unknown to the older.
            ("pod-level resources (a field since 1.32)", deploy,
             set_(["spec", "template", "spec", "resources"], {"limits": {"cpu": "2"}}),
             "spec.template.spec.resources", UNKNOWN, older_than("1.32")),
            ("securityContext.supplementalGroupsPolicy (a field since 1.31)", deploy,
             set_(["spec", "template", "spec", "securityContext", "supplementalGroupsPolicy"], "Strict"),
             "spec.template.spec.securityContext.supplementalGroupsPolicy", UNKNOWN, older_than("1.31")),
            ("hostnameOverride (a field since 1.34)", deploy,
             set_(["spec", "template", "spec", "hostnameOverride"], "coordinator"),
             "spec.template.spec.hostnameOverride", UNKNOWN, older_than("1.34")),
            ("container restartPolicyRules (a field since 1.34)", deploy,
             set_(containers0 + ["restartPolicyRules"],
                  [{"action": "Restart", "exitCodes": {"operator": "In", "values": [42]}}]),
             "spec.template.spec.containers[0].restartPolicyRules", UNKNOWN, older_than("1.34")),
        ]
    if svc:
        schema_breaks += [
            ("Service port as a string", svc, set_(["spec", "ports", 0, "port"], "50051"),
             "spec.ports[0].port", TYPE, every),
            ("Service targetPort as a boolean", svc, set_(["spec", "ports", 0, "targetPort"], True),
             "spec.ports[0].targetPort", TYPE, every),
            ("Service port beyond int32", svc, set_(["spec", "ports", 0, "port"], 2 ** 31),
             "spec.ports[0].port", FORMAT, every),
        ]
    if secret and secret.get("data"):
        key = next(iter(secret["data"]))
        schema_breaks.append(("Secret data not base64", secret, set_(["data", key], "not base64!"),
                              field_path(["data", key]), FORMAT, every))
    if monitor:
        schema_breaks += [
            ("unknown field in a ServiceMonitor endpoint", monitor, set_(["spec", "endpoints", 0, "intervall"], "15s"),
             "spec.endpoints[0].intervall", UNKNOWN, every),
            ("unknown field in the ServiceMonitor spec", monitor, set_(["spec", "endpoint"], []),
             "spec.endpoint", UNKNOWN, every),
            ("ServiceMonitor without its required selector", monitor, delete(["spec", "selector"]),
             "spec.selector", MISSING, every),
            ('ServiceMonitor scheme "tcp"', monitor, set_(["spec", "endpoints", 0, "scheme"], "tcp"),
             "spec.endpoints[0].scheme", TYPE, every),
            ('ServiceMonitor interval "15 seconds"', monitor, set_(["spec", "endpoints", 0, "interval"], "15 seconds"),
             "spec.endpoints[0].interval", FORMAT, every),
            ("unknown field in the ServiceMonitor's selector", monitor,
             set_(["spec", "selector", "matchLabel"], {"a": "b"}), "spec.selector.matchLabel", UNKNOWN, every),
        ]
    for what, obj, mutate, want_path, want_kind, rejecting in schema_breaks:
        c = copy.deepcopy(obj)
        mutate(c)
        for ver in K8S_VERSIONS:
            errs = schemas[ver].errors(c)
            detail = "errors: " + ("; ".join(f"{p or '(object)'}: {k}: {m}" for p, k, m in errs) or "none")
            if ver in rejecting:
                check(f"Kubernetes {ver} rejects BROKEN {id_of(obj)}: {what} ({want_path}: {want_kind})",
                      any(p == want_path and k == want_kind for p, k, _ in errs), detail)
            else:
                check(f"Kubernetes {ver} accepts {id_of(obj)} with {what}", not errs, detail)

    # --- 3. policies
    binaries = {}
    for b in ("momentum-server", "momentum-agent"):
        path = os.path.join(bin_dir, "server", b)
        h, err = help_flags(path)
        check(f"{path} --help lists its flags ({len(h['flags']) if h else 0})", h is not None and len(h["flags"]) > 5,
              err)
        if h:
            binaries[b] = h
    for r in ok:
        v = policy_violations(r["objects"], r["name"], r["gpu"], binaries)
        check(f"policies hold on {r['name']}", not v, "\n".join(v))

    def headless_svc(objs):
        return next(o for o in objs if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None")

    def agent_np(objs):
        return next(o for o in objs if o["metadata"]["name"] == "momentum-agent" and o["kind"] == "NetworkPolicy")

    def daemonset(objs):
        return next(o for o in objs if o["kind"] == "DaemonSet")

    def agent_configmap(objs):
        return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("momentum-agent"))

    negatives = [
        (cpu_r, "image tag latest",
         lambda os_: agent_c(os_).__setitem__("image", "ghcr.io/momentum-ml/momentum-worker-cpu:latest"),
         "tag latest is not pinned"),
        (cpu_r, "image without a tag",
         lambda os_: coord_c(os_).__setitem__("image", "ghcr.io/momentum-ml/momentum-coordinator"), "has no tag"),
        (cpu_r, "no livenessProbe", lambda os_: agent_c(os_).pop("livenessProbe"), "livenessProbe: missing"),
        (cpu_r, "no readinessProbe", lambda os_: coord_c(os_).pop("readinessProbe"), "readinessProbe: missing"),
        (cpu_r, "no memory limit", lambda os_: coord_c(os_)["resources"]["limits"].pop("memory"),
         "resources.limits.memory: missing"),
        (cpu_r, "runAsUser 0", lambda os_: agent_c(os_)["securityContext"].__setitem__("runAsUser", 0),
         "runAsUser: must be a non-zero uid"),
        (cpu_r, "runAsNonRoot false", lambda os_: coord_c(os_)["securityContext"].__setitem__("runAsNonRoot", False),
         "runAsNonRoot: must be true"),
        (cpu_r, "allowPrivilegeEscalation true",
         lambda os_: agent_c(os_)["securityContext"].__setitem__("allowPrivilegeEscalation", True),
         "allowPrivilegeEscalation: must be false"),
        (cpu_r, "a flag momentum-server does not have", lambda os_: coord_c(os_)["args"].append("--max-jobs=3"),
         "--max-jobs is not a flag momentum-server accepts"),
        (cpu_r, "a flag momentum-agent does not have",
         lambda os_: agent_c(os_)["args"].append("--advertize=$(POD_IP)"),
         "--advertize is not a flag momentum-agent accepts"),
        (cpu_r, "an undefined $(VAR)",
         lambda os_: agent_c(os_).__setitem__(
             "args", [a.replace("$(POD_IP)", "$(MY_IP)") for a in agent_c(os_)["args"]]),
         "uses $(MY_IP)"),
        (cpu_r, "exec probe instead of grpc",
         lambda os_: coord_c(os_).__setitem__("livenessProbe", {"exec": {"command": ["true"]}}),
         "must be a grpc probe"),
        (cpu_r, "headless Service without publishNotReadyAddresses",
         lambda os_: headless_svc(os_)["spec"].__setitem__("publishNotReadyAddresses", False),
         "publishNotReadyAddresses: must be true"),
        (cpu_r, "NetworkPolicy not selecting the agents",
         lambda os_: agent_np(os_)["spec"].__setitem__("podSelector", {"matchLabels": {"app": "other"}}),
         "no NetworkPolicy selects the agent pods"),
        (cpu_r, "agent NetworkPolicy open to every namespace",
         lambda os_: agent_np(os_)["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
         "agents accept only pods labelled"),
        (cpu_r, "coordinator with 2 replicas",
         lambda os_: next(o for o in os_ if o["kind"] == "Deployment")["spec"].__setitem__("replicas", 2),
         "1 replica with strategy Recreate"),
        (gpu_r, "gpu agent without /dev/shm",
         lambda os_: agent_c(os_).__setitem__(
             "volumeMounts", [m for m in agent_c(os_)["volumeMounts"] if m["mountPath"] != "/dev/shm"]),
         "emptyDir with medium Memory mounted at /dev/shm"),
        (gpu_r, "gpu agent /dev/shm on disk",
         lambda os_: next(v for v in pod_spec(daemonset(os_))["volumes"]
                          if v["name"] == "dshm")["emptyDir"].pop("medium"),
         "emptyDir with medium Memory mounted at /dev/shm"),
        (gpu_r, "gpu agent without nvidia.com/gpu limit",
         lambda os_: agent_c(os_)["resources"]["limits"].pop("nvidia.com/gpu"), "missing in the gpu overlay"),
        (gpu_r, "gpu limit differing from slots",
         lambda os_: agent_c(os_)["resources"]["limits"].__setitem__("nvidia.com/gpu", "3"), "differs from --slots"),
        (gpu_r, "gpu agent offering no GPU",
         lambda os_: agent_configmap(os_)["data"].__setitem__("gpus", "none"), "--gpus must resolve to auto"),
        (cpu_r, "cpu agent offering GPUs",
         lambda os_: agent_configmap(os_)["data"].__setitem__("gpus", "auto"), "--gpus must resolve to none"),
        (cpu_r, "coordinator offering GPUs",
         lambda os_: coord_c(os_).__setitem__(
             "args", [a for a in coord_c(os_)["args"] if not a.startswith("--gpus")]),
         "--gpus must be none"),
    ]
    for r, what, mutate, want in negatives:
        if not r:
            continue
        c = copy.deepcopy(r["objects"])
        mutate(c)
        v = policy_violations(c, r["name"], r["gpu"], binaries)
        check(f"policy rejects BROKEN {r['name']}: {what}", any(want in x for x in v),
              f"violations: {json.dumps(v)}")

    # --- 4. Secrets: the base's are marked examples; make-secrets.sh's are real.
    def secrets_text(objs):
        return "\n".join("\n".join(b64(x).decode("utf-8", "replace") for x in (o.get("data") or {}).values())
                         for o in objs if o["kind"] == "Secret")

    if base_r:
        base_secrets = [o for o in base_r["objects"] if o["kind"] == "Secret"]
        marked = [o for o in base_secrets
                  if all("REPLACE-ME" in b64(x).decode("utf-8", "replace") for x in (o.get("data") or {}).values())]
        check(f"every value of the base's {len(marked)} Secrets is a marked example (REPLACE-ME)",
              len(marked) == len(base_secrets) and len(marked) == 4)
        # The example token file is refused by the real server (tokens < 16 chars).
        tf = os.path.join(tmp, "example-tokens")
        with open(tf, "w") as f:
            f.write(secrets_text([o for o in base_r["objects"]
                                  if o["metadata"]["name"].startswith("momentum-server-tokens")]))
        try:
            r = subprocess.run([os.path.join(bin_dir, "server", "momentum-server"),
                                f"--state-dir={os.path.join(tmp, 'ex-state')}", "--listen=127.0.0.1:0",
                                "--metrics-listen=127.0.0.1:0", "--slots=0", f"--token-file={tf}"],
                               capture_output=True, text=True, timeout=20)
            rc, err = r.returncode, r.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            rc, err = None, str(e)
        check("momentum-server refuses to start with the example token file",
              rc == 2 and "at least 16 characters" in err, f"exit {rc}: {err}")
    sec_r = by_name("make-secrets.sh output (gpu)")
    if sec_r:
        check("make-secrets.sh's kustomization replaces every example Secret value",
              "REPLACE-ME" not in secrets_text(sec_r["objects"]) and
              sum(1 for o in sec_r["objects"] if o["kind"] == "Secret") == 4)
        if len(binaries) == 2 and os.path.exists(os.path.join(bin_dir, "client", "momentum")):
            live = live_check(sec_r["objects"], bin_dir, tmp, {
                "ca": os.path.join(sec_dir, "ca.crt"), "crt": os.path.join(sec_dir, "user-alice.crt"),
                "key": os.path.join(sec_dir, "user-alice.key"), "token": os.path.join(sec_dir, "user-alice.token"),
            }, python)
            for good, msg in live:
                lines = msg.split("\n")
                check(lines[0], good, "\n".join(lines[1:]))
        else:
            check("built momentum-server, momentum-agent and momentum client present for the live check", False,
                  f"under {bin_dir}")


if __name__ == "__main__":
    sys.exit(main())
