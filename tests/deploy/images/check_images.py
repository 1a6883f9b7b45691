#!/usr/bin/env python3
"""Checks deploy/docker/*.Dockerfile offline (no Docker engine needed).

- each Dockerfile parses into named stages (FROM image AS name); every
  COPY --from= names an earlier stage; no FROM image lacks a tag or uses
  `latest`; the final stage runs as a numeric non-root USER, has the
  image's ENTRYPOINT and EXPOSEs its ports;
- every `scripts/setup.sh` call in a RUN is one setup.sh accepts (run with
  --list, which installs nothing) and lists packages;
- the coordinator's packages and their dependency closure hold no LibTorch,
  and its binaries in the build tree do not load it;
- the system headers and libraries the build tree's binaries were compiled
  and linked from (Ninja's deps log) belong to packages the image's build
  stage installs (or their dependencies);
- the libraries the build tree's binaries load belong to packages that the
  image's runtime stage installs (or their dependencies, or Debian's
  required base that every debian image has);
- every package any setup.sh role names exists in Debian 12 (bookworm).

Usage: check_images.py SOURCE_DIR BINARY_DIR
Exit 0 when all pass, 1 when one fails, 77 when all that ran passed but the
apt checks were skipped (no apt lists: run apt-get update).
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile

# What the lead fixed for each image (independent of the Dockerfiles).
IMAGES = {
    "coordinator": {
        "entrypoint": "/usr/local/bin/momentum-server",
        "expose": {"50051", "9464", "8081"},
        "binaries": ["server/momentum-server", "client/momentum"],
        "torch": False,
    },
    "worker-cpu": {
        "entrypoint": "/usr/local/bin/momentum-agent",
        "expose": {"8081"},
        "binaries": ["server/momentum-agent", "worker/momentum-worker"],
        "torch": True,
    },
    "worker-cuda": {
        "entrypoint": "/usr/local/bin/momentum-agent",
        "expose": {"8081"},
        # Built against another LibTorch than the build tree's: no ldd check.
        "binaries": [],
        "torch": True,
    },
}
# The CMake target of each binary.
TARGETS = {
    "server/momentum-server": "momentum-server",
    "client/momentum": "momentum_cli",
    "server/momentum-agent": "momentum-agent",
    "worker/momentum-worker": "momentum-worker",
}
ROLES = ["coordinator", "worker-cpu", "worker-cuda", "test", "all"]
TORCH_RE = re.compile(r"torch|libc10|caffe2")

failures = []
passes = 0
skipped = []


def check(ok, what):
    global passes
    if ok:
        passes += 1
        print(f"PASS {what}")
    else:
        failures.append(what)
        print(f"FAIL {what}")
    return ok


def logical_lines(path):
    """(line number, instruction text) with continuations joined and
    comment lines dropped, as Docker reads them."""
    out, buf, start = [], "", 0
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if line.strip().startswith("#"):
                continue
            if not buf:
                if not line.strip():
                    continue
                start = n
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            out.append((start, buf.strip()))
            buf = ""
    if buf:
        out.append((start, buf.strip()))
    return out


def substitute(text, args):
    def repl(m):
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = args.get(name)
        if value is None or value == "":
            if default is not None:
                return default
            raise KeyError(name)
        return value
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, text)


def parse_dockerfile(path):
    """Returns (stages, errors). A stage: name, image, line, instructions."""
    name = os.path.basename(path)
    global_args, stages, errors = {}, [], []
    for line, text in logical_lines(path):
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            if len(words) != 3 or words[1].lower() != "as":
                errors.append(f"{name}:{line}: FROM must be 'FROM image AS name', got '{rest}'")
                words = (words or [""])[:1] + ["AS", None]
            try:
                image = substitute(words[0], global_args)
            except KeyError as e:
                errors.append(f"{name}:{line}: FROM uses ${e.args[0]}, which no ARG before the first FROM sets")
                image = words[0]
            stages.append({"name": words[2], "image": image, "line": line, "body": []})
        elif not stages:
            if keyword == "ARG":
                key, eq, value = rest.partition("=")
                global_args[key.strip()] = value.strip().strip('"') if eq else None
            else:
                errors.append(f"{name}:{line}: {keyword} before the first FROM")
        else:
            stages[-1]["body"].append((line, keyword, rest))
    if not stages:
        errors.append(f"{name}: no FROM")
    return stages, errors


def image_tag_problem(image):
    """None when the reference is pinned (a tag other than latest, or a
    digest), else what is wrong."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or not tag:
        return f"uses tag '{tag or '(empty)'}'"
    return None


# A command (after &&, ||, ; or |) that runs setup.sh, directly or via a shell.
SETUP_CALL = re.compile(r"^\s*(?:(?:ba)?sh\s+)?\S*scripts/setup\.sh(\s.*)?$|^\s*(?:(?:ba)?sh\s+)?\S*/setup\.sh(\s.*)?$")


def setup_calls(rest):
    """The argument lists of the setup.sh calls in a RUN command."""
    calls = []
    for part in re.split(r"&&|\|\||;|\|", rest):
        m = SETUP_CALL.match(part)
        if m:
            calls.append(shlex.split(m.group(1) or m.group(2) or ""))
    return calls


def run_setup(source, args, path_env=None):
    env = dict(os.environ)
    if path_env is not None:
        env["PATH"] = path_env
    proc = subprocess.run(["/bin/bash", os.path.join(source, "scripts/setup.sh"), *args, "--list"],
                          capture_output=True, text=True, env=env, timeout=30)
    return proc.returncode, proc.stdout.split(), proc.stderr.strip()


def apt_lists_present():
    lists = "/var/lib/apt/lists"
    return os.path.isdir(lists) and any("_Packages" in f for f in os.listdir(lists))


def dependency_closure(packages):
    if not packages:
        return set()
    proc = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *sorted(packages)],
        capture_output=True, text=True, timeout=60)
    return {l.strip().strip("<>") for l in proc.stdout.splitlines() if l and not l.startswith(" ")}


def required_base():
    """Debian's required packages (in every debian image, slim included)
    and what they depend on."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Priority}\n"],
                         capture_output=True, text=True).stdout
    required = {l.split()[0] for l in out.splitlines() if l.endswith(" required")}
    return dependency_closure(required) | required


def ldd_libraries(binary):
    """(resolved paths, names not found)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    paths, missing = [], []
    for l in out.splitlines():
        if "not found" in l:
            missing.append(l.split()[0])
        m = re.search(r"=>\s+(/\S+)", l)
        if m:
            paths.append(m.group(1))
    return paths, missing


_owners = None


def owning_package(path):
    """The installed package that ships path (usr-merged or not), from
    dpkg's file lists (one read; dpkg -S per library is slow)."""
    global _owners
    if _owners is None:
        _owners = {}
        info = "/var/lib/dpkg/info"
        for f in os.listdir(info):
            if f.endswith(".list"):
                pkg = f[:-5].split(":")[0]
                with open(os.path.join(info, f), errors="replace") as fh:
                    for line in fh:
                        _owners.setdefault(line.rstrip("\n"), pkg)
    for p in (path, os.path.realpath(path)):
        for c in (p, p[4:] if p.startswith("/usr/") else "/usr" + p):
            if c in _owners:
                return _owners[c]
    return None


def build_inputs(binary_dir, target):
    """System files (headers, libraries) the Ninja build of target read, or
    None when the tree is not a Ninja build."""
    if not os.path.exists(os.path.join(binary_dir, ".ninja_deps")):
        return None
    cmds = subprocess.run(["ninja", "-C", binary_dir, "-t", "commands", target],
                          capture_output=True, text=True, timeout=60)
    if cmds.returncode != 0:
        return None
    outputs, files = [], set()
    for cmd in cmds.stdout.splitlines():
        words = cmd.split()
        for i, w in enumerate(words[:-1]):
            if w == "-o" and re.search(r"\.(o|gch)$", words[i + 1]):
                outputs.append(words[i + 1])
        files.update(w for w in words if re.match(r"^/.*\.(so|a)(\.[0-9.]+)?$", w))
    deps = subprocess.run(["ninja", "-C", binary_dir, "-t", "deps", *outputs],
                          capture_output=True, text=True, timeout=60).stdout
    files.update(l.strip() for l in deps.splitlines() if l.startswith("    /"))
    # The project's own files: the tree's source directory, as CMake has it.
    src = os.path.realpath(os.path.join(os.path.dirname(__file__), "../../.."))
    with open(os.path.join(binary_dir, "CMakeCache.txt"), errors="replace") as cache:
        for line in cache:
            if line.startswith("CMAKE_HOME_DIRECTORY:"):
                src = os.path.realpath(line.split("=", 1)[1].strip())
    return {os.path.normpath(f) for f in files
            if not os.path.realpath(f).startswith((src + "/", os.path.realpath(binary_dir) + "/"))}


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    source, binary = sys.argv[1], sys.argv[2]
    docker_dir = os.path.join(source, "deploy/docker")
    have_apt = apt_lists_present()
    base = required_base() if have_apt else set()

    # .dockerignore keeps build trees, runs and git out of the context.
    ignore_path = os.path.join(source, ".dockerignore")
    ignore = open(ignore_path).read().split() if os.path.exists(ignore_path) else []
    for entry in (".git", "build", "runs"):
        check(entry in ignore, f".dockerignore: lists {entry}")
    check(any("node_modules" in e for e in ignore), ".dockerignore: lists node_modules")

    found = sorted(f for f in os.listdir(docker_dir) if f.endswith(".Dockerfile"))
    check(found == sorted(f"{i}.Dockerfile" for i in IMAGES),
          f"deploy/docker: the Dockerfiles are {', '.join(f'{i}.Dockerfile' for i in IMAGES)} (found {found})")

    for image, want in IMAGES.items():
        fname = f"{image}.Dockerfile"
        path = os.path.join(docker_dir, fname)
        if not os.path.exists(path):
            continue
        stages, errors = parse_dockerfile(path)
        check(not errors, f"{fname}: parses into named stages" + "".join(f"\n    {e}" for e in errors))
        check(len(stages) >= 2, f"{fname}: multi-stage ({len(stages)} stages)")
        names = []
        for index, stage in enumerate(stages):
            img = stage["image"]
            if img not in names:
                problem = image_tag_problem(img)
                check(problem is None, f"{fname}:{stage['line']}: FROM {img} is pinned"
                      + (f" ({problem})" if problem else ""))
            for line, keyword, rest in stage["body"]:
                if keyword in ("COPY", "ADD"):
                    m = re.search(r"--from=(\S+)", rest)
                    if m:
                        src = m.group(1)
                        ok = src in names or (src.isdigit() and int(src) < index)
                        check(ok, f"{fname}:{line}: COPY --from={src} names an earlier stage ({', '.join(names) or 'none'})")
            names.append(stage["name"])
        if not stages:
            continue
        final = stages[-1]
        body = final["body"]

        users = [rest for _, k, rest in body if k == "USER"]
        user = users[-1] if users else ""
        uid, _, gid = user.partition(":")
        ok = uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
        check(ok, f"{fname}: final stage '{final['name']}' runs as a numeric non-root USER (got '{user or 'none'}')")
        check(user == "10001:10001", f"{fname}: final USER is 10001:10001 (got '{user or 'none'}')")

        entry = [rest for _, k, rest in body if k == "ENTRYPOINT"]
        check(bool(entry) and entry[-1] == f'["{want["entrypoint"]}"]',
              f"{fname}: ENTRYPOINT [\"{want['entrypoint']}\"] (got {entry[-1] if entry else 'none'})")
        exposed = {p.split("/")[0] for _, k, rest in body if k == "EXPOSE" for p in rest.split()}
        check(exposed == want["expose"], f"{fname}: EXPOSE {sorted(want['expose'])} (got {sorted(exposed)})")
        labels = " ".join(rest for _, k, rest in body if k == "LABEL")
        for key in ("title", "version", "revision"):
            check(f"org.opencontainers.image.{key}=" in labels, f"{fname}: OCI label org.opencontainers.image.{key}")

        # setup.sh calls: accepted, and what they install.
        stage_packages = {}
        for stage in stages:
            for line, keyword, rest in stage["body"]:
                if keyword != "RUN":
                    continue
                for args in setup_calls(rest):
                    rc, pkgs, err = run_setup(source, args)
                    check(rc == 0 and pkgs, f"{fname}:{line}: setup.sh {' '.join(args)} is accepted and lists packages"
                          + (f" (rc {rc}: {err})" if rc else ""))
                    stage_packages.setdefault(stage["name"], set()).update(pkgs)
        runtime = stage_packages.get(final["name"], set())
        check(bool(runtime), f"{fname}: final stage installs its runtime packages through setup.sh")
        all_pkgs = set().union(*stage_packages.values()) if stage_packages else set()
        if not want["torch"]:
            torchy = sorted(p for p in all_pkgs if TORCH_RE.search(p))
            check(not torchy, f"{fname}: setup.sh packages hold no LibTorch (found {torchy})")
            if have_apt:
                closure = dependency_closure(runtime)
                torchy = sorted(p for p in closure if TORCH_RE.search(p))
                check(not torchy, f"{fname}: runtime packages' dependency closure ({len(closure)} packages) holds no LibTorch (found {torchy})")
            else:
                skipped.append(f"{fname}: LibTorch in the runtime closure (no apt lists: run apt-get update)")

        # The build tree's binaries: the headers and libraries they were built
        # from come with the build stage's packages.
        build_stage = stages[-2]["name"] if len(stages) >= 2 else None
        build_pkgs = stage_packages.get(build_stage, set())
        if have_apt and want["binaries"]:
            build_closure = dependency_closure(build_pkgs) | base
            for rel in want["binaries"]:
                target = TARGETS[rel]
                inputs = build_inputs(binary, target)
                if inputs is None:
                    skipped.append(f"{rel}: build inputs (no such target in a Ninja tree at {binary})")
                    continue
                owners = {f: owning_package(f) for f in inputs}
                uncovered = sorted({o for o in owners.values() if o and o not in build_closure})
                unowned = sorted(f for f, o in owners.items() if o is None)[:5]
                check(not uncovered and not unowned,
                      f"{rel}: the {len(inputs)} system headers and libraries it was built from are "
                      f"installed by {fname}'s '{build_stage}' stage (not: {uncovered}; no package: {unowned})")

        # The build tree's binaries: what they load is installed by the image.
        closure = (dependency_closure(runtime) | base) if have_apt and want["binaries"] else set()
        for rel in want["binaries"]:
            binpath = os.path.join(binary, rel)
            if not check(os.access(binpath, os.X_OK), f"{rel}: built in {binary}"):
                continue
            paths, missing = ldd_libraries(binpath)
            check(not missing, f"{rel}: ldd resolves every library (missing {missing})")
            if not want["torch"]:
                torchy = [p for p in paths if re.search(r"libtorch|libc10", os.path.basename(p))]
                check(not torchy, f"{rel}: does not load LibTorch (ldd: {len(paths)} libraries, torch ones {torchy})")
            if have_apt:
                owners = {p: owning_package(p) for p in paths}
                unowned = sorted(p for p, o in owners.items() if o is None)
                uncovered = sorted({o for o in owners.values() if o and o not in closure})
                check(not unowned and not uncovered,
                      f"{rel}: the {len(set(owners.values()))} packages of its libraries are installed by "
                      f"{fname}'s runtime stage (not: {uncovered}; no package: {unowned})")
            else:
                skipped.append(f"{rel}: runtime package coverage (no apt lists: run apt-get update)")

    # Every package of every role exists in Debian 12. The packages installed
    # only when a command is missing are listed with a PATH that has none.
    with tempfile.TemporaryDirectory() as bare:
        awk = subprocess.run(["bash", "-c", "command -v awk"], capture_output=True, text=True).stdout.strip()
        os.symlink(awk, os.path.join(bare, "awk"))
        every = set()
        for role in ROLES:
            for kind in ("--build", "--runtime"):
                rc, pkgs, err = run_setup(source, ["--role", role, kind], path_env=bare)
                check(rc == 0 and pkgs, f"setup.sh --role {role} {kind} --list (rc {rc}, {len(pkgs)} packages) {err}")
                every.update(pkgs)
        check({"nodejs", "npm", "kubernetes-client"} <= every,
              "setup.sh --role test installs nodejs, npm and kubernetes-client when npm and kubectl are missing")
        rc, _, err = run_setup(source, ["--role", "nosuchrole", "--build"])
        check(rc != 0 and "nosuchrole" in err, f"setup.sh rejects an unknown role, naming it ({err})")
    if have_apt:
        out = subprocess.run(["apt-cache", "policy", *sorted(every)], capture_output=True, text=True).stdout
        from_bookworm, current = set(), None
        for l in out.splitlines():
            if l and not l.startswith(" "):
                current = l.rstrip(":")
            elif current and re.search(r"\s\d+\s+\S+\s+bookworm(-updates|-security)?/main\s", l + " "):
                from_bookworm.add(current)
        absent = sorted(every - from_bookworm)
        check(not absent, f"all {len(every)} packages of setup.sh's roles exist in Debian 12 bookworm (not: {absent})")
    else:
        skipped.append("packages exist in Debian 12 (no apt lists: run apt-get update)")

    for s in skipped:
        print(f"SKIP {s}")
    print(f"{passes} passed, {len(failures)} failed")
    if failures:
        return 1
    return 77 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
