#!/usr/bin/env node
// Checks deploy/k8s (tests/deploy/k8s.cmake runs it from CTest):
//  1. `kubectl kustomize` renders the base, overlays/cpu, overlays/gpu, the
//     optional ServiceMonitor component on an overlay, and the kustomization
//     that deploy/k8s/make-secrets.sh writes;
//  2. every rendered object is valid for Kubernetes 1.30: tsc type-checks it as
//     a fresh object literal of its kubernetes-types@1.30.0 type (unknown
//     fields, wrong types, missing required fields), and the kubernetes-models
//     JSON schemas check value formats (quantities, ...); the ServiceMonitor
//     against @kubernetes-models/prometheus-operator's types and schema;
//  3. Momentum's own policies on every render (probes, resources, pinned
//     images, non-root, GPU, rendezvous Service, NetworkPolicies, labels, ...),
//     including that every flag given to momentum-server / momentum-agent is
//     one the built binaries accept (their --help);
//  4. the Secrets make-secrets.sh makes work: the real momentum-server starts
//     with the coordinator's rendered arguments and them, a user lists jobs,
//     and the real momentum-agent, with its rendered arguments, registers.
// Each check is also run on deliberately broken copies, which must be
// rejected. With --python (a Python with grpcio), the live check also asks
// both health ports what the kubelet's grpc probes would.
// Usage: check.js --source-dir DIR --binary-dir DIR [--python PYTHON]
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const cp = require("child_process");

const here = __dirname;

function parseArgs(argv) {
  const a = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--(source-dir|binary-dir|python)(?:=(.*))?$/.exec(argv[i]);
    if (!m) die(`unknown argument ${argv[i]} (usage: check.js --source-dir DIR --binary-dir DIR [--python PYTHON_WITH_GRPC])`);
    a[m[1]] = m[2] !== undefined ? m[2] : argv[++i];
  }
  for (const k of ["source-dir", "binary-dir"]) if (!a[k]) die(`--${k} is required`);
  return a;
}

function die(msg) {
  console.error(`check.js: ${msg}`);
  process.exit(2);
}

// npm ci when node_modules is missing or older than package-lock.json.
function ensureModules() {
  const lock = path.join(here, "package-lock.json");
  const stamp = path.join(here, "node_modules", ".package-lock.json");
  if (fs.existsSync(stamp) && fs.statSync(stamp).mtimeMs >= fs.statSync(lock).mtimeMs) return;
  console.log("npm ci in", here);
  const r = cp.spawnSync("npm", ["ci", "--no-audit", "--no-fund"], { cwd: here, stdio: "inherit" });
  if (r.status !== 0) die(`npm ci failed in ${here} (exit ${r.status})`);
}

// ---------------------------------------------------------------- results
let passed = 0;
let failed = 0;
function check(name, ok, detail) {
  if (ok) {
    passed++;
    console.log(`ok   ${name}`);
  } else {
    failed++;
    console.log(`FAIL ${name}${detail ? "\n     " + String(detail).split("\n").join("\n     ") : ""}`);
  }
}

const clone = (o) => JSON.parse(JSON.stringify(o));

// ---------------------------------------------------------------- rendering
function kustomize(dir) {
  const r = cp.spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8", maxBuffer: 64 << 20 });
  if (r.error) return { error: `kubectl: ${r.error.message}` };
  if (r.status !== 0) return { error: r.stderr.trim() };
  const YAML = require("yaml");
  const docs = YAML.parseAllDocuments(r.stdout);
  const errs = docs.flatMap((d) => d.errors.map((e) => e.message));
  if (errs.length) return { error: errs.join("\n") };
  return { objects: docs.map((d) => d.toJS()).filter((o) => o) };
}

const idOf = (o) => `${o.kind}/${o.metadata && o.metadata.name}`;

// ---------------------------------------------------------------- schemas
// The kubernetes-types@1.30.0 type (and module) of each kind we render.
const TS_TYPES = {
  "v1/Namespace": "core.Namespace",
  "v1/ServiceAccount": "core.ServiceAccount",
  "v1/PersistentVolumeClaim": "core.PersistentVolumeClaim",
  "v1/Service": "core.Service",
  "v1/ConfigMap": "core.ConfigMap",
  "v1/Secret": "core.Secret",
  "v1/Pod": "core.Pod",
  "apps/v1/Deployment": "apps.Deployment",
  "apps/v1/DaemonSet": "apps.DaemonSet",
  "apps/v1/StatefulSet": "apps.StatefulSet",
  "networking.k8s.io/v1/NetworkPolicy": "networking.NetworkPolicy",
  "policy/v1/PodDisruptionBudget": "policy.PodDisruptionBudget",
  "monitoring.coreos.com/v1/ServiceMonitor": "IServiceMonitor",
};
const MODEL_MODULES = {
  v1: "kubernetes-models/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "networking.k8s.io/v1": "kubernetes-models/networking.k8s.io/v1",
  "policy/v1": "kubernetes-models/policy/v1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

// Writes `value` as a TypeScript literal, one line per scalar, remembering
// each line's field path so tsc's line numbers map back to fields.
function literalLines(value, fieldPath, indent, prefix, suffix, out) {
  const pad = "  ".repeat(indent);
  if (value !== null && typeof value === "object") {
    const isArr = Array.isArray(value);
    const entries = isArr ? value.map((v, i) => [i, v]) : Object.entries(value);
    if (!entries.length) {
      out.push({ text: pad + prefix + (isArr ? "[]" : "{}") + suffix, path: fieldPath });
      return;
    }
    out.push({ text: pad + prefix + (isArr ? "[" : "{"), path: fieldPath });
    entries.forEach(([k, v], i) => {
      const p = isArr ? `${fieldPath}[${k}]` : /^[A-Za-z_][\w]*$/.test(k) ? (fieldPath ? `${fieldPath}.${k}` : k) : `${fieldPath}[${JSON.stringify(k)}]`;
      literalLines(v, p, indent + 1, isArr ? "" : JSON.stringify(k) + ": ", i < entries.length - 1 ? "," : "", out);
    });
    out.push({ text: pad + (isArr ? "]" : "}") + suffix, path: fieldPath });
  } else {
    out.push({ text: pad + prefix + JSON.stringify(value) + suffix, path: fieldPath });
  }
}

// items: [{label, object}]. Returns a Map label -> [errors "field: message"];
// one tsc run for all of them.
function tscCheck(items, workDir) {
  const nm = path.join(here, "node_modules");
  const lines = [
    { text: 'import type * as core from "kubernetes-types/core/v1";' },
    { text: 'import type * as apps from "kubernetes-types/apps/v1";' },
    { text: 'import type * as networking from "kubernetes-types/networking/v1";' },
    { text: 'import type * as policy from "kubernetes-types/policy/v1";' },
    { text: 'import type { IServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";' },
  ];
  const result = new Map();
  items.forEach(({ label, object }, i) => {
    result.set(label, []);
    const type = TS_TYPES[`${object.apiVersion}/${object.kind}`];
    if (!type) {
      result.get(label).push(`no Kubernetes 1.30 schema known here for ${object.apiVersion} ${object.kind}`);
      return;
    }
    const out = [];
    literalLines(object, "", 0, `export const o${i}: ${type} = `, ";", out);
    for (const l of out) lines.push({ text: l.text, path: l.path, label });
  });
  const file = path.join(workDir, "rendered.ts");
  fs.writeFileSync(file, lines.map((l) => l.text).join("\n") + "\n");
  fs.writeFileSync(
    path.join(workDir, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        strict: true, noEmit: true, skipLibCheck: true, types: [], typeRoots: [],
        module: "commonjs", moduleResolution: "node", target: "es2019", baseUrl: nm,
      },
      files: [file],
    }),
  );
  const r = cp.spawnSync(process.execPath, [path.join(nm, "typescript", "bin", "tsc"), "-p", workDir, "--pretty", "false"], { encoding: "utf8", maxBuffer: 64 << 20 });
  const outText = (r.stdout || "") + (r.stderr || "");
  let parsed = 0;
  for (const m of outText.matchAll(/^(.*)\((\d+),(\d+)\): error (TS\d+: .*)$/gm)) {
    parsed++;
    const l = lines[Number(m[2]) - 1];
    if (!l || !l.label) {
      if (!result.has("<tsc>")) result.set("<tsc>", []);
      result.get("<tsc>").push(m[0]);
      continue;
    }
    result.get(l.label).push(`${l.path || "(object)"}: ${m[4]}`);
  }
  if (r.status !== 0 && parsed === 0) result.set("<tsc>", [`tsc exited ${r.status}: ${outText.trim()}`]);
  return result;
}

function modelCheck(object) {
  const mod = MODEL_MODULES[object.apiVersion];
  const cls = mod && require(mod)[object.kind];
  if (!cls) return [`no schema known here for ${object.apiVersion} ${object.kind}`];
  const o = clone(object);
  // kustomize folds long base64 values over several lines; the API server's
  // base64 decoder skips the newlines, the schema's "byte" pattern does not.
  if (o.kind === "Secret" && o.data) for (const k of Object.keys(o.data)) o.data[k] = o.data[k].replace(/\s+/g, "");
  try {
    new cls(o).validate();
    return [];
  } catch (e) {
    return [String(e.message || e)];
  }
}

// ---------------------------------------------------------------- policies
function podTemplate(o) {
  if (["Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"].includes(o.kind)) return o.spec && o.spec.template;
  if (o.kind === "CronJob") return o.spec.jobTemplate.spec.template;
  if (o.kind === "Pod") return o;
  return null;
}

function selects(selector, labels) {
  if (!selector) return false;
  labels = labels || {};
  for (const [k, v] of Object.entries(selector.matchLabels || {})) if (labels[k] !== v) return false;
  for (const e of selector.matchExpressions || []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    if (e.operator === "In" && !(has && e.values.includes(labels[e.key]))) return false;
    if (e.operator === "NotIn" && has && e.values.includes(labels[e.key])) return false;
    if (e.operator === "Exists" && !has) return false;
    if (e.operator === "DoesNotExist" && has) return false;
  }
  return true;
}

// Flags a Momentum binary accepts, from its --help (CLI11 format).
function helpFlags(binary) {
  const r = cp.spawnSync(binary, ["--help"], { encoding: "utf8" });
  if (r.error || r.status !== 0) return { error: `${binary} --help: ${r.error ? r.error.message : "exit " + r.status}` };
  const flags = new Set();
  const required = new Set();
  for (const line of r.stdout.split("\n")) {
    const m = /^\s+(?:-\w,)?--([a-z0-9][a-z0-9-]*)\b/.exec(line);
    if (!m) continue;
    flags.add(m[1]);
    if (/\bREQUIRED\b/.test(line)) required.add(m[1]);
  }
  return { flags, required };
}

// "--flag=value" or "--flag value" -> [{flag, value}]
function parseFlags(args) {
  const out = [];
  for (let i = 0; i < args.length; i++) {
    const m = /^--([^=]+)(?:=(.*))?$/.exec(args[i]);
    if (!m) {
      out.push({ flag: null, value: args[i] });
      continue;
    }
    let value = m[2];
    if (value === undefined && i + 1 < args.length && !args[i + 1].startsWith("--")) value = args[++i];
    out.push({ flag: m[1], value });
  }
  return out;
}

const FILE_FLAGS = ["state-dir", "tls-cert", "tls-key", "tls-client-ca", "tls-ca", "token-file", "data-root", "output-root", "work-dir"];

// objects: one render. ctx: {name, gpu, binaries: {"momentum-server": {flags, required}, ...}}.
// Returns a list of violations, each naming render, object and field.
function policyViolations(objects, ctx) {
  const v = [];
  const bad = (o, field, msg) => v.push(`${ctx.name}: ${idOf(o)}: ${field}: ${msg}`);
  const byKind = (k) => objects.filter((o) => o.kind === k);
  const find = (k, n) => objects.find((o) => o.kind === k && o.metadata.name === n);
  const workloads = objects.filter((o) => podTemplate(o));
  const comp = (o) => podTemplate(o).metadata.labels["app.kubernetes.io/component"];
  const coordinators = workloads.filter((o) => comp(o) === "coordinator");
  const agents = workloads.filter((o) => comp(o) === "agent");
  if (coordinators.length !== 1) v.push(`${ctx.name}: expected one coordinator workload, found ${coordinators.length}`);
  if (agents.length !== 1) v.push(`${ctx.name}: expected one agent workload, found ${agents.length}`);

  for (const o of objects) {
    const l = (o.metadata && o.metadata.labels) || {};
    for (const k of ["app.kubernetes.io/name", "app.kubernetes.io/part-of"])
      if (!l[k]) bad(o, `metadata.labels["${k}"]`, "missing");
    if (o.kind !== "Namespace" && !o.metadata.namespace) bad(o, "metadata.namespace", "missing");
  }
  for (const sa of byKind("ServiceAccount"))
    if (sa.automountServiceAccountToken !== false) bad(sa, "automountServiceAccountToken", "must be false");

  for (const o of workloads) {
    const t = podTemplate(o);
    const ps = t.spec;
    const psc = ps.securityContext || {};
    const tl = (t.metadata && t.metadata.labels) || {};
    for (const k of ["app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component"])
      if (!tl[k]) bad(o, `spec.template.metadata.labels["${k}"]`, "missing");
    if (ps.automountServiceAccountToken !== false) bad(o, "spec.template.spec.automountServiceAccountToken", "must be false");
    if (!ps.serviceAccountName || !find("ServiceAccount", ps.serviceAccountName))
      bad(o, "spec.template.spec.serviceAccountName", `names no ServiceAccount of this render (${ps.serviceAccountName})`);
    if (!(psc.fsGroup > 0)) bad(o, "spec.template.spec.securityContext.fsGroup", "must be set (non-zero) for the volumes");
    const volumes = new Map((ps.volumes || []).map((vol) => [vol.name, vol]));
    for (const vol of ps.volumes || []) {
      if (vol.secret && !find("Secret", vol.secret.secretName)) bad(o, `volumes[${vol.name}].secret.secretName`, `no Secret ${vol.secret.secretName} in this render`);
      if (vol.persistentVolumeClaim && !find("PersistentVolumeClaim", vol.persistentVolumeClaim.claimName))
        bad(o, `volumes[${vol.name}].persistentVolumeClaim.claimName`, `no PersistentVolumeClaim ${vol.persistentVolumeClaim.claimName} in this render`);
    }
    const containers = [...(ps.initContainers || []).map((c) => [c, "initContainers"]), ...(ps.containers || []).map((c) => [c, "containers"])];
    for (const [c, list] of containers) {
      const f = `spec.template.spec.${list}[${c.name}]`;
      const sc = c.securityContext || {};
      if (list === "containers") {
        for (const p of ["livenessProbe", "readinessProbe"]) if (!c[p]) bad(o, `${f}.${p}`, "missing");
      }
      const res = c.resources || {};
      for (const kind of ["requests", "limits"])
        for (const r of ["cpu", "memory"]) if (!(res[kind] && res[kind][r] !== undefined)) bad(o, `${f}.resources.${kind}.${r}`, "missing");
      const img = c.image || "";
      const m = /^(.*?)(?::([\w][\w.-]*))?(?:@sha256:[0-9a-f]{64})?$/.exec(img.slice(img.lastIndexOf("/") + 1));
      if (!img) bad(o, `${f}.image`, "missing");
      else if (!m[2] && !img.includes("@sha256:")) bad(o, `${f}.image`, `${img} has no tag (pin one)`);
      else if (m[2] === "latest") bad(o, `${f}.image`, `${img}: tag latest is not pinned`);
      const nonRoot = sc.runAsNonRoot !== undefined ? sc.runAsNonRoot : psc.runAsNonRoot;
      const uid = sc.runAsUser !== undefined ? sc.runAsUser : psc.runAsUser;
      if (nonRoot !== true) bad(o, `${f}.securityContext.runAsNonRoot`, "must be true");
      if (!(Number.isInteger(uid) && uid > 0)) bad(o, `${f}.securityContext.runAsUser`, `must be a non-zero uid, got ${uid}`);
      if (sc.allowPrivilegeEscalation !== false) bad(o, `${f}.securityContext.allowPrivilegeEscalation`, "must be false");
      if (sc.readOnlyRootFilesystem !== true) bad(o, `${f}.securityContext.readOnlyRootFilesystem`, "must be true");
      if (!(sc.capabilities && (sc.capabilities.drop || []).includes("ALL"))) bad(o, `${f}.securityContext.capabilities.drop`, "must contain ALL");
      if ((sc.capabilities && sc.capabilities.add || []).length) bad(o, `${f}.securityContext.capabilities.add`, "must be empty");
      const seccomp = (sc.seccompProfile || psc.seccompProfile || {}).type;
      if (seccomp !== "RuntimeDefault") bad(o, `${f}.securityContext.seccompProfile.type`, `must be RuntimeDefault, got ${seccomp}`);
      if (sc.privileged) bad(o, `${f}.securityContext.privileged`, "must not be set");
      for (const vm of c.volumeMounts || [])
        if (!volumes.has(vm.name)) bad(o, `${f}.volumeMounts[${vm.name}]`, "names no volume of the pod");

      // Momentum binaries: flags the built binary accepts, $(VAR)s defined,
      // file paths on a mounted volume, health port = probe port.
      const bin = path.basename((c.command || [])[0] || "");
      if (!["momentum-server", "momentum-agent"].includes(bin)) continue;
      const help = ctx.binaries[bin];
      const flags = parseFlags(c.args || []);
      const env = new Map((c.env || []).map((e) => [e.name, e]));
      for (const a of c.args || [])
        for (const ref of a.matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g))
          if (!env.has(ref[1])) bad(o, `${f}.args`, `${a} uses $(${ref[1]}), which the container's env does not define`);
      for (const { flag, value } of flags) {
        if (flag === null) bad(o, `${f}.args`, `stray argument ${value}`);
        else if (help && !help.flags.has(flag)) bad(o, `${f}.args`, `--${flag} is not a flag ${bin} accepts (${bin} --help)`);
        if (flag && FILE_FLAGS.includes(flag) && value && value.startsWith("/")) {
          const mounted = (c.volumeMounts || []).some((vm) => value === vm.mountPath || value.startsWith(vm.mountPath.replace(/\/$/, "") + "/"));
          if (!mounted) bad(o, `${f}.args`, `--${flag}=${value} is on no mounted volume (read-only root filesystem)`);
        }
      }
      if (help) for (const r of help.required) if (!flags.some((x) => x.flag === r)) bad(o, `${f}.args`, `required --${r} missing`);
      const flag = (n) => (flags.find((x) => x.flag === n) || {}).value;
      const health = flag("health-listen");
      if (!health) bad(o, `${f}.args`, "--health-listen missing (the grpc probes need it)");
      for (const p of ["livenessProbe", "readinessProbe", "startupProbe"]) {
        if (!c[p]) continue;
        if (!c[p].grpc) bad(o, `${f}.${p}`, "must be a grpc probe");
        else if (health && String(c[p].grpc.port) !== health.split(":").pop()) bad(o, `${f}.${p}.grpc.port`, `${c[p].grpc.port} is not the --health-listen port (${health})`);
      }
      const envFrom = (name, want) => {
        const e = env.get(name);
        return e && e.valueFrom && e.valueFrom.fieldRef && want.includes(e.valueFrom.fieldRef.fieldPath);
      };
      if (bin === "momentum-server") {
        if (!(o.kind === "Deployment" && o.spec.replicas === 1 && o.spec.strategy && o.spec.strategy.type === "Recreate"))
          bad(o, "spec", "the coordinator must be a Deployment of 1 replica with strategy Recreate (one writer of the store)");
        const state = flag("state-dir");
        const vm = (c.volumeMounts || []).find((x) => x.mountPath === state);
        if (!vm || !(volumes.get(vm.name) || {}).persistentVolumeClaim) bad(o, `${f}.volumeMounts`, `--state-dir=${state} is not a PersistentVolumeClaim mount`);
        for (const fl of ["tls-cert", "tls-key", "tls-client-ca", "token-file"]) if (!flag(fl)) bad(o, `${f}.args`, `--${fl} missing (TLS, mutual TLS and tokens are required)`);
        if (flag("slots") !== "0") bad(o, `${f}.args`, "--slots must be 0 (agents run the ranks)");
        const metricsPort = (flag("metrics-listen") || "").split(":").pop();
        const ann = (t.metadata && t.metadata.annotations) || {};
        if (ann["prometheus.io/scrape"] !== "true" || ann["prometheus.io/port"] !== metricsPort || ann["prometheus.io/path"] !== "/metrics")
          bad(o, "spec.template.metadata.annotations", `prometheus.io/scrape "true", port "${metricsPort}" and path /metrics required`);
        for (const port of [(flag("listen") || "").split(":").pop(), metricsPort])
          if (!(c.ports || []).some((p) => String(p.containerPort) === port)) bad(o, `${f}.ports`, `no containerPort ${port}`);
      } else {
        if (o.kind !== "DaemonSet") bad(o, "kind", "agents must be a DaemonSet (one per node)");
        const adv = flag("advertise") || "";
        const advVar = /^\$\((\w+)\)$/.exec(adv);
        if (!advVar || !envFrom(advVar[1], ["status.podIP"])) bad(o, `${f}.args`, `--advertise=${adv} must be $(VAR) with VAR from the downward API status.podIP`);
        const nm = /^\$\((\w+)\)$/.exec(flag("name") || "");
        if (!nm || !envFrom(nm[1], ["metadata.name", "spec.nodeName"])) bad(o, `${f}.args`, "--name must come from the pod or node name (downward API)");
        for (const fl of ["tls-ca", "tls-cert", "tls-key", "token-file"]) if (!flag(fl)) bad(o, `${f}.args`, `--${fl} missing`);
        // Slots: a number, from the agent ConfigMap; on GPU nodes = GPUs.
        const sl = /^\$\((\w+)\)$/.exec(flag("slots") || "");
        let slots = flag("slots");
        if (sl) {
          const ref = env.get(sl[1]) && env.get(sl[1]).valueFrom && env.get(sl[1]).valueFrom.configMapKeyRef;
          const cm = ref && find("ConfigMap", ref.name);
          slots = cm && cm.data[ref.key];
        }
        if (!/^[1-9][0-9]*$/.test(String(slots))) bad(o, `${f}.args`, `--slots must resolve to a positive integer, got ${slots}`);
        if (ctx.gpu) {
          const lim = (c.resources.limits || {})["nvidia.com/gpu"];
          if (lim === undefined) bad(o, `${f}.resources.limits["nvidia.com/gpu"]`, "missing in the gpu overlay");
          else if (String(lim) !== String(slots)) bad(o, `${f}.resources.limits["nvidia.com/gpu"]`, `${lim} differs from --slots ${slots} (one rank per GPU)`);
          const shm = (c.volumeMounts || []).find((x) => x.mountPath === "/dev/shm");
          const vol = shm && volumes.get(shm.name);
          if (!(vol && vol.emptyDir && vol.emptyDir.medium === "Memory")) bad(o, `${f}.volumeMounts`, "the gpu overlay needs an emptyDir with medium Memory mounted at /dev/shm");
          if (!ps.nodeSelector && !ps.affinity) bad(o, "spec.template.spec.nodeSelector", "gpu agents must be confined to GPU nodes");
          if (!env.has("NCCL_SOCKET_IFNAME")) bad(o, `${f}.env`, "NCCL_SOCKET_IFNAME missing");
        } else if ((c.resources.limits || {})["nvidia.com/gpu"] !== undefined) {
          bad(o, `${f}.resources.limits`, "nvidia.com/gpu outside the gpu overlay");
        }
      }
      // Shared storage: /data and /outputs on ReadWriteMany claims.
      for (const mp of ["/data", "/outputs"]) {
        const vm = (c.volumeMounts || []).find((x) => x.mountPath === mp);
        const pvc = vm && volumes.get(vm.name) && volumes.get(vm.name).persistentVolumeClaim;
        const claim = pvc && find("PersistentVolumeClaim", pvc.claimName);
        if (!(claim && claim.spec.accessModes.includes("ReadWriteMany"))) bad(o, `${f}.volumeMounts`, `${mp} must be a ReadWriteMany PersistentVolumeClaim`);
      }
    }
  }

  // The rendezvous Service: headless, published before ready, selects agents.
  const agentLabels = agents.length ? podTemplate(agents[0]).metadata.labels : {};
  const headless = byKind("Service").filter((s) => s.spec.clusterIP === "None" && selects({ matchLabels: s.spec.selector }, agentLabels));
  if (!headless.length) v.push(`${ctx.name}: no headless Service (clusterIP: None) selects the agent pods`);
  for (const s of headless) if (s.spec.publishNotReadyAddresses !== true) bad(s, "spec.publishNotReadyAddresses", "must be true (rendezvous before readiness)");

  // Coordinator Service: gRPC and metrics, scrape annotations.
  if (coordinators.length === 1) {
    const cl = podTemplate(coordinators[0]).metadata.labels;
    const svc = byKind("Service").filter((s) => s.spec.clusterIP !== "None" && selects({ matchLabels: s.spec.selector }, cl));
    if (svc.length !== 1) v.push(`${ctx.name}: expected one Service for the coordinator, found ${svc.length}`);
    for (const s of svc) {
      const ports = s.spec.ports.map((p) => p.port);
      for (const p of [50051, 9464]) if (!ports.includes(p)) bad(s, "spec.ports", `port ${p} missing`);
      const a = s.metadata.annotations || {};
      if (a["prometheus.io/scrape"] !== "true" || a["prometheus.io/port"] !== "9464" || a["prometheus.io/path"] !== "/metrics")
        bad(s, "metadata.annotations", "prometheus.io/scrape, port 9464 and path /metrics required");
    }
  }

  // NetworkPolicies: the agents (ranks' c10d ports) only from Momentum pods.
  const nps = byKind("NetworkPolicy");
  const agentNps = nps.filter((n) => selects(n.spec.podSelector, agentLabels));
  if (!agentNps.length) v.push(`${ctx.name}: no NetworkPolicy selects the agent pods (c10d is unauthenticated)`);
  for (const n of agentNps) {
    if (!(n.spec.policyTypes || []).includes("Ingress")) bad(n, "spec.policyTypes", "must include Ingress");
    (n.spec.ingress || []).forEach((rule, i) => {
      if (!rule.from || !rule.from.length) bad(n, `spec.ingress[${i}].from`, "empty: allows every source");
      (rule.from || []).forEach((peer, j) => {
        const ok = !peer.ipBlock && !peer.namespaceSelector && peer.podSelector && peer.podSelector.matchLabels && peer.podSelector.matchLabels["app.kubernetes.io/part-of"] === "momentum";
        if (!ok) bad(n, `spec.ingress[${i}].from[${j}]`, "agents accept only pods labelled app.kubernetes.io/part-of: momentum of their namespace");
      });
    });
  }
  if (coordinators.length === 1) {
    const cl = podTemplate(coordinators[0]).metadata.labels;
    const cn = nps.filter((n) => selects(n.spec.podSelector, cl));
    if (!cn.length) v.push(`${ctx.name}: no NetworkPolicy selects the coordinator`);
    for (const n of cn) {
      if (!(n.spec.policyTypes || []).includes("Ingress")) bad(n, "spec.policyTypes", "must include Ingress");
      (n.spec.ingress || []).forEach((rule, i) => {
        if (!rule.from || !rule.from.length) bad(n, `spec.ingress[${i}].from`, "empty: allows every source");
        if (!rule.ports || !rule.ports.length) bad(n, `spec.ingress[${i}].ports`, "empty: opens every port");
      });
    }
  }
  // Every Momentum pod carries the label the agents' policy trusts.
  for (const o of workloads)
    if (podTemplate(o).metadata.labels["app.kubernetes.io/part-of"] !== "momentum") bad(o, "spec.template.metadata.labels", "app.kubernetes.io/part-of: momentum missing");
  return v;
}

// ---------------------------------------------------------------- live check
function freePort() {
  // Bind port 0 in a child to learn a free port (synchronous for simplicity).
  const r = cp.spawnSync(process.execPath, ["-e", "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"], { encoding: "utf8" });
  return Number(r.stdout.trim());
}

function sleep(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

// grpc.health.v1.Health/Check on a plaintext address, as the kubelet's grpc
// probe does: 1 SERVING, 2 NOT_SERVING, or an error string.
function healthCheck(python, address) {
  const code = [
    "import grpc, sys",
    "ch = grpc.insecure_channel(sys.argv[1])",
    "f = ch.unary_unary('/grpc.health.v1.Health/Check', request_serializer=lambda x: x, response_deserializer=lambda x: x)",
    "r = f(b'', timeout=5)",
    "print(r[1] if len(r) >= 2 and r[0] == 8 else 0)",
  ].join("\n");
  const r = cp.spawnSync(python, ["-c", code, address], { encoding: "utf8", timeout: 20000 });
  if (r.status !== 0) return `health check of ${address} failed: ${(r.stderr || "").trim().split("\n").pop()}`;
  return Number(r.stdout.trim());
}

// Runs the real server and agent with the rendered arguments (paths mapped to
// a temp dir, addresses to loopback) and the make-secrets Secrets.
function liveCheck(objects, bin, tmp, userFiles, python) {
  const workload = (comp) => objects.find((o) => podTemplate(o) && podTemplate(o).metadata.labels["app.kubernetes.io/component"] === comp);
  const coord = workload("coordinator");
  const agent = workload("agent");
  const root = path.join(tmp, "live");
  // Materialise each pod's mounts: secrets decoded, other volumes as dirs.
  function mapper(o) {
    const ps = podTemplate(o).spec;
    const c = ps.containers[0];
    const vols = new Map(ps.volumes.map((v) => [v.name, v]));
    const mounts = [];
    for (const vm of c.volumeMounts) {
      const dir = path.join(root, o.metadata.name, vm.mountPath);
      fs.mkdirSync(dir, { recursive: true });
      const vol = vols.get(vm.name);
      if (vol.secret) {
        const s = objects.find((x) => x.kind === "Secret" && x.metadata.name === vol.secret.secretName);
        for (const [k, val] of Object.entries(s.data || {})) fs.writeFileSync(path.join(dir, k), Buffer.from(val, "base64"), { mode: 0o600 });
      }
      mounts.push([vm.mountPath, dir]);
    }
    mounts.sort((a, b) => b[0].length - a[0].length);
    return (p) => {
      for (const [mp, dir] of mounts) if (p === mp || p.startsWith(mp + "/")) return dir + p.slice(mp.length);
      return p;
    };
  }
  const mapArgs = (c, map, subst) =>
    (c.args || []).map((a) => {
      const m = /^--([^=]+)=(.*)$/.exec(a);
      if (!m) return a;
      let val = m[2].replace(/\$\((\w+)\)/g, (_, n) => subst[n]);
      if (m[1] in subst.flags) val = subst.flags[m[1]];
      else if (val.startsWith("/")) val = map(val);
      return `--${m[1]}=${val}`;
    });
  const cc = podTemplate(coord).spec.containers[0];
  const cmap = mapper(coord);
  const [grpcPort, metricsPort, healthPort, agentHealth] = [freePort(), freePort(), freePort(), freePort()];
  const ready = path.join(root, "ready.json");
  const sargs = mapArgs(cc, cmap, {
    flags: { listen: `127.0.0.1:${grpcPort}`, "metrics-listen": `127.0.0.1:${metricsPort}`, "health-listen": `127.0.0.1:${healthPort}` },
  });
  sargs.push(`--ready-file=${ready}`);
  const logs = { server: "", agent: "" };
  const server = cp.spawn(path.join(bin, "server", "momentum-server"), sargs, { stdio: ["ignore", "pipe", "pipe"] });
  server.stdout.on("data", (d) => (logs.server += d));
  server.stderr.on("data", (d) => (logs.server += d));
  const results = [];
  const stopAll = [];
  stopAll.push(() => server.kill("SIGTERM"));
  return new Promise((resolve) => {
    const t0 = Date.now();
    const waitReady = () => {
      if (fs.existsSync(ready) && fs.statSync(ready).size > 0) return afterServer();
      if (server.exitCode !== null || Date.now() - t0 > 20000) {
        results.push([false, `momentum-server with the rendered coordinator args did not start:\n${sargs.join(" ")}\n${logs.server}`]);
        stopAll.forEach((f) => f());
        return resolve(results);
      }
      setTimeout(waitReady, 100);
    };
    const afterServer = () => {
      results.push([true, `momentum-server serves with the rendered coordinator args and make-secrets.sh's Secrets (${logs.server.trim().split("\n")[0]})`]);
      if (python) {
        const h = healthCheck(python, `127.0.0.1:${healthPort}`);
        results.push([h === 1, `the coordinator's grpc probe port (--health-listen) answers SERVING: ${h}`]);
      }
      // A user with the made certificate and token lists jobs over mutual TLS.
      const client = path.join(bin, "client", "momentum");
      const base = [`--server=localhost:${grpcPort}`, `--tls-ca=${userFiles.ca}`, `--tls-cert=${userFiles.crt}`, `--tls-key=${userFiles.key}`];
      const list = cp.spawnSync(client, [...base, `--token-file=${userFiles.token}`, "list"], { encoding: "utf8", timeout: 20000 });
      results.push([list.status === 0, `momentum list with the user's certificate and token: exit ${list.status} ${(list.stdout + list.stderr).trim()}`]);
      const noTok = cp.spawnSync(client, [...base, "list"], { encoding: "utf8", timeout: 20000 });
      results.push([noTok.status !== 0 && /UNAUTHENTICATED/.test(noTok.stderr), `momentum list without a token is refused: exit ${noTok.status} ${noTok.stderr.trim()}`]);
      // The agent, with its rendered args, registers its slots.
      const ac = podTemplate(agent).spec.containers[0];
      const amap = mapper(agent);
      const slotsRef = ac.env.find((e) => e.name === "MOMENTUM_SLOTS").valueFrom.configMapKeyRef;
      const slots = objects.find((x) => x.kind === "ConfigMap" && x.metadata.name === slotsRef.name).data[slotsRef.key];
      const aargs = mapArgs(ac, amap, {
        POD_IP: "127.0.0.1", POD_NAME: "momentum-agent-test", NODE_NAME: "node-test", MOMENTUM_SLOTS: slots,
        flags: { server: `localhost:${grpcPort}`, "health-listen": `127.0.0.1:${agentHealth}`, worker: "/bin/false" },
      });
      const ag = cp.spawn(path.join(bin, "server", "momentum-agent"), aargs, { stdio: ["ignore", "pipe", "pipe"] });
      stopAll.push(() => ag.kill("SIGTERM"));
      ag.stdout.on("data", (d) => (logs.agent += d));
      ag.stderr.on("data", (d) => (logs.agent += d));
      const want = `registered as momentum-agent-test with ${slots} slots`;
      const t1 = Date.now();
      const waitAgent = () => {
        if (logs.agent.includes(want) || ag.exitCode !== null || Date.now() - t1 > 20000) {
          const registered = logs.agent.includes(want);
          results.push([registered, `momentum-agent with the rendered agent args: "${want}"\n${aargs.join(" ")}\n${logs.agent.trim()}`]);
          if (python && registered) {
            let h;
            for (let i = 0; i < 50 && h !== 1; i++) {
              h = healthCheck(python, `127.0.0.1:${agentHealth}`);
              if (h !== 1) sleep(100);
            }
            results.push([h === 1, `the agent's grpc probe port (--health-listen) answers SERVING once registered: ${h}`]);
          }
          stopAll.forEach((f) => f());
          return resolve(results);
        }
        setTimeout(waitAgent, 100);
      };
      waitAgent();
    };
    waitReady();
  });
}

// ---------------------------------------------------------------- main
async function main() {
  const args = parseArgs(process.argv.slice(2));
  const src = path.resolve(args["source-dir"]);
  const bin = path.resolve(args["binary-dir"]);
  const k8s = path.join(src, "deploy", "k8s");
  ensureModules();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "momentum-k8s-"));
  try {
    await run(src, bin, k8s, tmp, args.python);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

async function run(src, bin, k8s, tmp, python) {
  // --- 1. render
  // The ServiceMonitor component on the cpu overlay, as a user composes it.
  const smDir = path.join(tmp, "with-servicemonitor");
  fs.mkdirSync(smDir);
  fs.writeFileSync(
    path.join(smDir, "kustomization.yaml"),
    ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:",
      `  - ${path.relative(smDir, path.join(k8s, "overlays", "cpu"))}`, "components:",
      `  - ${path.relative(smDir, path.join(k8s, "components", "servicemonitor"))}`, ""].join("\n"),
  );
  // What make-secrets.sh writes (gpu overlay, one user).
  const secDir = path.join(tmp, "secrets");
  const ms = cp.spawnSync("bash", [path.join(k8s, "make-secrets.sh"), secDir, "gpu", "alice"], { encoding: "utf8" });
  check("deploy/k8s/make-secrets.sh writes certificates, tokens and a kustomization", ms.status === 0, ms.stderr);
  if (ms.status === 0) {
    const v = cp.spawnSync("openssl", ["verify", "-CAfile", path.join(secDir, "ca.crt"), ...["server", "agent", "user-alice"].map((n) => path.join(secDir, `${n}.crt`))], { encoding: "utf8" });
    check("make-secrets.sh: server, agent and user certificates verify against its CA", v.status === 0, v.stdout + v.stderr);
  }

  const renders = [
    { name: "deploy/k8s/base", dir: path.join(k8s, "base"), gpu: false },
    { name: "deploy/k8s/overlays/cpu", dir: path.join(k8s, "overlays", "cpu"), gpu: false },
    { name: "deploy/k8s/overlays/gpu", dir: path.join(k8s, "overlays", "gpu"), gpu: true },
    { name: "overlays/cpu + components/servicemonitor", dir: smDir, gpu: false, monitor: true },
    { name: "make-secrets.sh output (gpu)", dir: secDir, gpu: true, secrets: true },
  ];
  for (const r of renders) {
    const out = kustomize(r.dir);
    r.objects = out.objects;
    check(`kubectl kustomize ${r.name} renders (${out.objects ? out.objects.length + " objects" : "error"})`, !!out.objects, out.error);
  }
  const ok = renders.filter((r) => r.objects);
  const byName = (n) => ok.find((r) => r.name === n);
  const sm = byName("overlays/cpu + components/servicemonitor");
  if (sm) check("the component adds a ServiceMonitor; the base has none", sm.objects.some((o) => o.kind === "ServiceMonitor") && !byName("deploy/k8s/base").objects.some((o) => o.kind === "ServiceMonitor"));

  // --- 2. schemas, with broken copies that must fail
  const items = [];
  for (const r of ok) for (const o of r.objects) items.push({ label: `${r.name}: ${idOf(o)}`, object: o });
  const base = byName("deploy/k8s/overlays/cpu").objects;
  const deploy = base.find((o) => o.kind === "Deployment");
  const svc = base.find((o) => o.kind === "Service");
  const monitor = sm && sm.objects.find((o) => o.kind === "ServiceMonitor");
  const broken = [];
  const breakCopy = (label, o, mutate, wantPath) => {
    const c = clone(o);
    mutate(c);
    broken.push({ label: `BROKEN ${label}`, object: c, wantPath });
  };
  breakCopy("unknown field in a container", deploy, (c) => (c.spec.template.spec.containers[0].imagePullPolcy = "Always"), "spec.template.spec.containers[0].imagePullPolcy");
  breakCopy("replicas as a string", deploy, (c) => (c.spec.replicas = "1"), "spec.replicas");
  breakCopy("Service port as a string", svc, (c) => (c.spec.ports[0].port = "50051"), "spec.ports[0].port");
  breakCopy("container without its required name", deploy, (c) => delete c.spec.template.spec.containers[0].name, "spec.template.spec.containers[0]");
  if (monitor) breakCopy("unknown field in a ServiceMonitor endpoint", monitor, (c) => (c.spec.endpoints[0].intervall = "15s"), "spec.endpoints[0].intervall");
  const t0 = Date.now();
  const tsc = tscCheck([...items, ...broken], tmp);
  const tscSecs = ((Date.now() - t0) / 1000).toFixed(1);
  if (tsc.has("<tsc>")) check("tsc ran", false, tsc.get("<tsc>").join("\n"));
  const tscBad = items.filter((it) => tsc.get(it.label).length);
  check(`all ${items.length} rendered objects type-check as Kubernetes 1.30 objects (kubernetes-types 1.30.0, tsc ${tscSecs}s)`, tscBad.length === 0,
    tscBad.map((it) => `${it.label}: ${tsc.get(it.label).join("; ")}`).join("\n"));
  for (const b of broken) {
    const errs = tsc.get(b.label);
    check(`tsc rejects ${b.label}`, errs.some((e) => e.startsWith(b.wantPath + ":")), `errors: ${JSON.stringify(errs)}`);
  }
  const modelBad = items.map((it) => [it.label, modelCheck(it.object)]).filter(([, e]) => e.length);
  check(`all ${items.length} rendered objects pass the kubernetes-models JSON schemas (formats, quantities)`, modelBad.length === 0, modelBad.map(([l, e]) => `${l}: ${e.join("; ")}`).join("\n"));
  const badQty = clone(deploy);
  badQty.spec.template.spec.containers[0].resources.limits.cpu = "two";
  const qErr = modelCheck(badQty);
  check("kubernetes-models rejects BROKEN cpu limit \"two\"", qErr.some((e) => /resources\/limits\/cpu/.test(e)), JSON.stringify(qErr));
  const badReplicas = clone(deploy);
  badReplicas.spec.replicas = "1";
  check("kubernetes-models rejects BROKEN replicas as a string", modelCheck(badReplicas).some((e) => /spec\/replicas/.test(e)));

  // --- 3. policies
  const binaries = {};
  for (const b of ["momentum-server", "momentum-agent"]) {
    const h = helpFlags(path.join(bin, "server", b));
    check(`${path.join(bin, "server", b)} --help lists its flags (${h.flags ? h.flags.size : 0})`, !h.error && h.flags.size > 5, h.error);
    if (!h.error) binaries[b] = h;
  }
  for (const r of ok) {
    const v = policyViolations(r.objects, { name: r.name, gpu: r.gpu, binaries });
    check(`policies hold on ${r.name}`, v.length === 0, v.join("\n"));
  }
  const gpuR = byName("deploy/k8s/overlays/gpu");
  const cpuR = byName("deploy/k8s/overlays/cpu");
  const negatives = [
    [cpuR, "image tag latest", (os_) => (agentC(os_).image = "ghcr.io/momentum-ml/momentum-worker-cpu:latest"), "tag latest is not pinned"],
    [cpuR, "image without a tag", (os_) => (coordC(os_).image = "ghcr.io/momentum-ml/momentum-coordinator"), "has no tag"],
    [cpuR, "no livenessProbe", (os_) => delete agentC(os_).livenessProbe, "livenessProbe: missing"],
    [cpuR, "no readinessProbe", (os_) => delete coordC(os_).readinessProbe, "readinessProbe: missing"],
    [cpuR, "no memory limit", (os_) => delete coordC(os_).resources.limits.memory, "resources.limits.memory: missing"],
    [cpuR, "runAsUser 0", (os_) => (agentC(os_).securityContext.runAsUser = 0), "runAsUser: must be a non-zero uid"],
    [cpuR, "runAsNonRoot false", (os_) => (coordC(os_).securityContext.runAsNonRoot = false), "runAsNonRoot: must be true"],
    [cpuR, "allowPrivilegeEscalation true", (os_) => (agentC(os_).securityContext.allowPrivilegeEscalation = true), "allowPrivilegeEscalation: must be false"],
    [cpuR, "a flag momentum-server does not have", (os_) => coordC(os_).args.push("--max-jobs=3"), "--max-jobs is not a flag momentum-server accepts"],
    [cpuR, "a flag momentum-agent does not have", (os_) => agentC(os_).args.push("--advertize=$(POD_IP)"), "--advertize is not a flag momentum-agent accepts"],
    [cpuR, "an undefined $(VAR)", (os_) => (agentC(os_).args = agentC(os_).args.map((a) => a.replace("$(POD_IP)", "$(MY_IP)"))), "uses $(MY_IP)"],
    [cpuR, "exec probe instead of grpc", (os_) => (coordC(os_).livenessProbe = { exec: { command: ["true"] } }), "must be a grpc probe"],
    [cpuR, "headless Service without publishNotReadyAddresses", (os_) => (os_.find((o) => o.kind === "Service" && o.spec.clusterIP === "None").spec.publishNotReadyAddresses = false), "publishNotReadyAddresses: must be true"],
    [cpuR, "NetworkPolicy not selecting the agents", (os_) => (os_.find((o) => o.metadata.name === "momentum-agent" && o.kind === "NetworkPolicy").spec.podSelector = { matchLabels: { app: "other" } }), "no NetworkPolicy selects the agent pods"],
    [cpuR, "agent NetworkPolicy open to every namespace", (os_) => os_.find((o) => o.metadata.name === "momentum-agent" && o.kind === "NetworkPolicy").spec.ingress[0].from.push({ namespaceSelector: {} }), "agents accept only pods labelled"],
    [cpuR, "coordinator with 2 replicas", (os_) => (os_.find((o) => o.kind === "Deployment").spec.replicas = 2), "1 replica with strategy Recreate"],
    [gpuR, "gpu agent without /dev/shm", (os_) => (agentC(os_).volumeMounts = agentC(os_).volumeMounts.filter((m) => m.mountPath !== "/dev/shm")), "emptyDir with medium Memory mounted at /dev/shm"],
    [gpuR, "gpu agent /dev/shm on disk", (os_) => delete podTemplate(os_.find((o) => o.kind === "DaemonSet")).spec.volumes.find((v) => v.name === "dshm").emptyDir.medium, "emptyDir with medium Memory mounted at /dev/shm"],
    [gpuR, "gpu agent without nvidia.com/gpu limit", (os_) => delete agentC(os_).resources.limits["nvidia.com/gpu"], "missing in the gpu overlay"],
    [gpuR, "gpu limit differing from slots", (os_) => (agentC(os_).resources.limits["nvidia.com/gpu"] = "3"), "differs from --slots"],
  ];
  function coordC(os_) { return podTemplate(os_.find((o) => o.kind === "Deployment")).spec.containers[0]; }
  function agentC(os_) { return podTemplate(os_.find((o) => o.kind === "DaemonSet")).spec.containers[0]; }
  for (const [r, what, mutate, want] of negatives) {
    if (!r) continue;
    const c = clone(r.objects);
    mutate(c);
    const v = policyViolations(c, { name: r.name, gpu: r.gpu, binaries });
    check(`policy rejects BROKEN ${r.name}: ${what}`, v.some((x) => x.includes(want)), `violations: ${JSON.stringify(v)}`);
  }

  // --- 4. Secrets: the base's are marked examples; make-secrets.sh's are real.
  const secretsText = (objs) => objs.filter((o) => o.kind === "Secret").map((o) => Object.values(o.data || {}).map((x) => Buffer.from(x, "base64").toString()).join("\n")).join("\n");
  const baseR = byName("deploy/k8s/base");
  if (baseR) {
    const n = baseR.objects.filter((o) => o.kind === "Secret" && Object.values(o.data || {}).every((x) => /REPLACE-ME/.test(Buffer.from(x, "base64").toString())));
    check(`every value of the base's ${n.length} Secrets is a marked example (REPLACE-ME)`, n.length === baseR.objects.filter((o) => o.kind === "Secret").length && n.length === 4);
    // The example token file is refused by the real server (tokens < 16 chars).
    const tf = path.join(tmp, "example-tokens");
    fs.writeFileSync(tf, secretsText(baseR.objects.filter((o) => o.metadata.name.startsWith("momentum-server-tokens"))));
    const r = cp.spawnSync(path.join(bin, "server", "momentum-server"), [`--state-dir=${path.join(tmp, "ex-state")}`, "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", "--slots=0", `--token-file=${tf}`], { encoding: "utf8", timeout: 20000 });
    check("momentum-server refuses to start with the example token file", r.status === 2 && /at least 16 characters/.test(r.stderr), `exit ${r.status}: ${r.stderr}`);
  }
  const secR = byName("make-secrets.sh output (gpu)");
  if (secR) {
    check("make-secrets.sh's kustomization replaces every example Secret value", !/REPLACE-ME/.test(secretsText(secR.objects)) && secR.objects.filter((o) => o.kind === "Secret").length === 4);
    if (Object.keys(binaries).length === 2 && fs.existsSync(path.join(bin, "client", "momentum"))) {
      const live = await liveCheck(secR.objects, bin, tmp, {
        ca: path.join(secDir, "ca.crt"), crt: path.join(secDir, "user-alice.crt"), key: path.join(secDir, "user-alice.key"), token: path.join(secDir, "user-alice.token"),
      }, python);
      for (const [good, msg] of live) check(msg.split("\n")[0], good, msg.split("\n").slice(1).join("\n"));
    } else {
      check("built momentum-server, momentum-agent and momentum client present for the live check", false, `under ${bin}`);
    }
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
