#!/usr/bin/env python3
"""Checks deploy/docker/*.Dockerfile offline (no Docker engine needed).

- each Dockerfile parses into named stages (FROM image AS name); every
  COPY --from= names an earlier stage; no FROM image lacks a tag or uses
  `latest`; the final stage runs as a numeric non-root USER, has the
  image's ENTRYPOINT, EXPOSEs its ports and fails its build when `ldd`
  finds a library of the binaries missing;
- every `scripts/setup.sh` call in a RUN is one setup.sh accepts (run with
  --list, which installs nothing) and lists packages;
- the coordinator is built without the worker, makes no virtual
  environment, its packages and their dependency closure hold no LibTorch,
  and its binaries in the build tree do not load it;
- the worker images take LibTorch from the project's virtual environment
  (PyPI's torch, scripts/python-requirements.txt, every package pinned with
  ==): the build stage makes it with setup.sh at a fixed MOMENTUM_VENV (with
  the requirements next to setup.sh) and configures with
  -DMOMENTUM_PYTHON=<venv>/bin/python and -DMOMENTUM_WITH_CUDA=OFF (cpu) or
  ON (cuda); nothing is downloaded besides (no LibTorch zip); the runtime
  stage does not carry the venv but the libraries copied out of it
  (`cp --parents` from its site-packages), registered with ld.so.conf.d and
  ldconfig; those cover what LibTorch's libraries load (ldd on the venv's
  own wheel files: libtorch_cpu and libc10 for cpu; libtorch, libtorch_cuda,
  libc10_cuda and what torch opens later for cuda, whose nvidia/*/lib
  folders are copied whole since their libraries open siblings), and need at
  most Debian 12's glibc and libstdc++;
- worker-cuda: the CUDA toolkit comes from a pinned nvidia/cuda devel image
  of the CUDA version torch was built with (the cuda-toolkit pin), on a
  distribution whose glibc is not newer than Debian 12's, and only the
  toolkit is taken from it (NCCL and cuDNN are the venv's);
- the system headers and libraries the build tree's binaries were compiled
  and linked from (Ninja's deps log) belong to packages the image's build
  stage installs (or their dependencies), to the venv it makes, or (CUDA)
  to the toolkit it copies;
- the libraries the build tree's binaries load belong to packages that the
  image's runtime stage installs (or their dependencies, or Debian's
  required base that every debian image has), or, for the worker image of
  the build tree's kind (CUDA when it links libtorch_cuda), to the libraries
  it copies from the venv (or the toolkit's);
- every package any setup.sh role names exists in Debian 12 (bookworm);
- broken copies of the Dockerfiles (a runtime stage without torch/lib, a
  build without MOMENTUM_PYTHON, the whole venv copied, ...) are rejected.

Usage: check_images.py SOURCE_DIR BINARY_DIR
Exit 0 when all pass, 1 when one fails, 77 when all that ran passed but the
apt checks were skipped (no apt lists: run apt-get update).
"""
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

# What the lead fixed for each image (independent of the Dockerfiles).
IMAGES = {
    "coordinator": {
        "entrypoint": "/usr/local/bin/momentum-server",
        "expose": {"50051", "9464", "8081"},
        "binaries": ["server/momentum-server", "client/momentum"],
        "torch": None,
    },
    "worker-cpu": {
        "entrypoint": "/usr/local/bin/momentum-agent",
        "expose": {"8081"},
        "binaries": ["server/momentum-agent", "worker/momentum-worker"],
        "torch": "cpu",
    },
    "worker-cuda": {
        "entrypoint": "/usr/local/bin/momentum-agent",
        "expose": {"8081"},
        "binaries": ["server/momentum-agent", "worker/momentum-worker"],
        "torch": "cuda",
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
# setup.sh role:kind pairs that make the virtual environment (LibTorch).
VENV_ROLES = {"worker-cpu:build", "worker-cuda:build", "test:build", "test:runtime",
              "all:build", "all:runtime"}
TORCH_RE = re.compile(r"torch|libc10|caffe2")
# What the worker links from the wheel (cmake/MomentumTorch.cmake): without
# CUDA libtorch_cpu and libc10; with CUDA the wheel's TorchConfig.cmake.
TORCH_LINKED = {
    "cpu": ["torch/lib/libtorch_cpu.so", "torch/lib/libc10.so"],
    "cuda": ["torch/lib/libtorch.so", "torch/lib/libtorch_cuda.so", "torch/lib/libc10_cuda.so",
             "torch/lib/libtorch_cpu.so", "torch/lib/libc10.so"],
}
# Loaded by LibTorch with dlopen when first needed (linear algebra on the
# GPU, NVRTC kernels), so ldd does not show them.
TORCH_DLOPENED = {
    "cpu": [],
    "cuda": ["torch/lib/libtorch_cuda_linalg.so", "torch/lib/libcaffe2_nvrtc.so"],
}
# Debian 12: glibc 2.36, libstdc++ of GCC 12.
DEBIAN_SYMBOL_VERSIONS = {"GLIBC": (2, 36), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13)}
# glibc of the distributions NVIDIA's CUDA images are built on.
CUDA_IMAGE_GLIBC = {
    "ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39),
    "ubi8": (2, 28), "ubi9": (2, 34), "rockylinux8": (2, 28), "rockylinux9": (2, 34),
    "oraclelinux8": (2, 28), "oraclelinux9": (2, 34),
}
TOOLKIT_PREFIX = "/usr/local/cuda"
# The GPU driver's libraries: on a GPU machine, or mounted by the NVIDIA
# container runtime; a build machine without a GPU has none.
DRIVER_LIB = re.compile(r"^libcuda\.so\.1$|^libnvidia-")


class Results:
    """Counts and prints checks; a quiet one (broken variants) only
    collects the failures."""

    def __init__(self, quiet=False):
        self.quiet = quiet
        self.passes = 0
        self.failures = []
        self.skipped = []
        self.notes = []

    def check(self, ok, what):
        if ok:
            self.passes += 1
        else:
            self.failures.append(what)
        if not self.quiet:
            print(f"{'PASS' if ok else 'FAIL'} {what}")
        return ok

    def skip(self, what):
        self.skipped.append(what)

    def note(self, what):
        if not self.quiet:
            print(f"NOTE {what}")


def version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text))


def fmt_version(v):
    return ".".join(str(x) for x in v)


# ---- Dockerfile parsing ----

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
    """Docker's ${NAME}, ${NAME:-default} and $NAME, from args; raises
    KeyError for an unset name without default."""
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


def expand(text, env):
    """Like substitute, but leaves what env does not set as it is (shell
    variables, $(...))."""
    def repl(m):
        name = m.group(1) or m.group(3)
        value = env.get(name)
        if value is None:
            return m.group(2) if m.group(2) is not None else m.group(0)
        return value
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, text)


def env_pairs(rest):
    """The NAME=value pairs of an ENV (or ARG) instruction."""
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    if len(words) >= 2 and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]  # legacy ENV NAME value
    return [tuple(w.split("=", 1)) if "=" in w else (w, None) for w in words]


def parse_dockerfile(path):
    """Returns (stages, errors). A stage: name, image, line, body: a list of
    (line, keyword, rest, env) where env holds the ARG and ENV values in
    effect (as a RUN's shell sees them)."""
    name = os.path.basename(path)
    global_args, stages, errors = {}, [], []
    env = {}
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
            env = {}
        elif not stages:
            if keyword == "ARG":
                key, eq, value = rest.partition("=")
                global_args[key.strip()] = value.strip().strip('"') if eq else None
            else:
                errors.append(f"{name}:{line}: {keyword} before the first FROM")
        else:
            if keyword == "ARG":
                for key, value in env_pairs(rest):
                    env[key] = expand(value, env) if value is not None else global_args.get(key)
            elif keyword == "ENV":
                for key, value in env_pairs(rest):
                    env[key] = expand(value or "", env)
            stages[-1]["body"].append((line, keyword, rest, dict(env)))
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


def segments(rest):
    """The commands of a RUN, split at &&, || and ;."""
    return [s.strip() for s in re.split(r"&&|\|\||;", rest) if s.strip()]


# A command (after &&, ||, ; or |) that runs setup.sh, directly or via a
# shell, possibly with NAME=value assignments before it.
SETUP_CALL = re.compile(
    r"^\s*((?:\w+=\S*\s+)*)(?:(?:ba)?sh\s+)?(\S*/setup\.sh|setup\.sh)(\s.*)?$")


def setup_calls(rest):
    """(assignments, setup.sh path, arguments) of each setup.sh call in a
    RUN command."""
    calls = []
    for part in re.split(r"&&|\|\||;|\|", rest):
        m = SETUP_CALL.match(part)
        if m:
            assigns = dict(a.split("=", 1) for a in m.group(1).split())
            calls.append((assigns, m.group(2), shlex.split(m.group(3) or "")))
    return calls


def role_kind(args):
    role, kind = None, None
    for i, a in enumerate(args):
        if a == "--role" and i + 1 < len(args):
            role = args[i + 1]
        elif a.startswith("--role="):
            role = a.split("=", 1)[1]
        elif a in ("--build", "--runtime"):
            kind = a[2:]
    if role in ("test", "all"):
        kind = kind or "build"
    return role, kind


def copy_args(rest):
    """(options, sources, destination) of a COPY or ADD."""
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    opts = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        opts[key] = value
    if len(words) < 2:
        return opts, [], None
    return opts, words[:-1], words[-1]


def context_file_at(stage, before_line, target, source):
    """The file of the build context (relative path) that the stage's
    COPYs before before_line put at target, or None."""
    found = None
    for line, keyword, rest, _ in stage["body"]:
        if line >= before_line:
            break
        if keyword not in ("COPY", "ADD"):
            continue
        opts, srcs, dest = copy_args(rest)
        if "from" in opts or not dest:
            continue
        for src in srcs:
            src_path = os.path.normpath(os.path.join(source, src))
            if os.path.isdir(src_path):
                prefix = dest.rstrip("/") + "/"
                if target.startswith(prefix):
                    rel = os.path.relpath(os.path.join(src_path, target[len(prefix):]), source)
                    if os.path.isfile(os.path.join(source, rel)):
                        found = rel
            elif len(srcs) > 1 or dest.endswith("/"):
                if dest.rstrip("/") + "/" + os.path.basename(src) == target:
                    found = os.path.normpath(src)
            elif dest == target:
                found = os.path.normpath(src)
    return found


def configure_options(stage):
    """The -D options of the stage's `cmake -S ... -B ...` configure (with
    ARG and ENV values expanded), or None when it has none."""
    for line, keyword, rest, env in stage["body"]:
        if keyword != "RUN":
            continue
        for seg in segments(rest):
            if re.match(r"^cmake\s", seg) and "--build" not in seg and re.search(r"\s-S\s", seg):
                text = expand(seg, env)
                return {m.group(1): m.group(2).strip("'\"")
                        for m in re.finditer(r"-D(\w+)(?::\w+)?=(\S+)", text)}
    return None


# ---- the host: processes, packages, the venv ----

@functools.lru_cache(maxsize=None)
def run_setup(source, args, path_env=None):
    env = dict(os.environ)
    if path_env is not None:
        env["PATH"] = path_env
    proc = subprocess.run(["/bin/bash", os.path.join(source, "scripts/setup.sh"), *args, "--list"],
                          capture_output=True, text=True, env=env, timeout=30)
    return proc.returncode, tuple(proc.stdout.split()), proc.stderr.strip()


def apt_lists_present():
    lists = "/var/lib/apt/lists"
    return os.path.isdir(lists) and any("_Packages" in f for f in os.listdir(lists))


@functools.lru_cache(maxsize=None)
def _closure(packages):
    if not packages:
        return frozenset()
    proc = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        capture_output=True, text=True, timeout=60)
    return frozenset(l.strip().strip("<>") for l in proc.stdout.splitlines() if l and not l.startswith(" "))


def dependency_closure(packages):
    return set(_closure(tuple(sorted(packages))))


def required_base():
    """Debian's required packages (in every debian image, slim included)
    and what they depend on."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Priority}\n"],
                         capture_output=True, text=True).stdout
    required = {l.split()[0] for l in out.splitlines() if l.endswith(" required")}
    return dependency_closure(required) | required


@functools.lru_cache(maxsize=None)
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
    return tuple(paths), tuple(missing)


@functools.lru_cache(maxsize=None)
def symbol_versions(path):
    """The highest GLIBC, GLIBCXX and CXXABI version path needs."""
    out = subprocess.run(["readelf", "-V", "-W", path], capture_output=True, text=True).stdout
    need = {}
    for m in re.finditer(r"Name: (GLIBC|GLIBCXX|CXXABI)_([0-9.]+)", out):
        v = version_tuple(m.group(2))
        need[m.group(1)] = max(need.get(m.group(1), ()), v)
    return need


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


def cmake_cache(binary_dir):
    values = {}
    try:
        with open(os.path.join(binary_dir, "CMakeCache.txt"), errors="replace") as cache:
            for line in cache:
                m = re.match(r"^(\w+):\w+=(.*)$", line.rstrip("\n"))
                if m:
                    values[m.group(1)] = m.group(2)
    except OSError:
        pass
    return values


@functools.lru_cache(maxsize=None)
def build_inputs(binary_dir, target, keep_under=None):
    """System files (headers, libraries) the Ninja build of target read, or
    None when the tree is not a Ninja build. Files of the source and binary
    trees are the project's own, except those under keep_under (the venv,
    which may live in the source tree)."""
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
        # Libraries passed as -Wl,...,/path/lib.so (the CPU LibTorch).
        for w in words:
            files.update(re.findall(r"(?<=,)(/[^,]*\.so(?:\.[0-9.]+)?)", w))
    deps = subprocess.run(["ninja", "-C", binary_dir, "-t", "deps", *outputs],
                          capture_output=True, text=True, timeout=60).stdout
    files.update(l.strip() for l in deps.splitlines() if l.startswith("    /"))
    # The project's own files: the tree's source directory, as CMake has it.
    src = os.path.realpath(os.path.join(os.path.dirname(__file__), "../../.."))
    home = cmake_cache(binary_dir).get("CMAKE_HOME_DIRECTORY")
    if home:
        src = os.path.realpath(home)
    own = (src + "/", os.path.realpath(binary_dir) + "/")
    return frozenset(os.path.normpath(f) for f in files
                     if not os.path.realpath(f).startswith(own)
                     or (keep_under and os.path.realpath(f).startswith(keep_under + "/")))


class Venv:
    """The torch of the project's virtual environment (the build's
    MOMENTUM_PYTHON): its site-packages and what its libraries load."""

    def __init__(self, python):
        self.python = python
        self.site = None
        self.version = None
        self.cuda = None
        self.error = None
        probe = ("import importlib.metadata as m, importlib.util as u, os; "
                 "s = u.find_spec('torch'); "
                 "print(os.path.dirname(os.path.dirname(s.origin)) if s else ''); "
                 "print(m.version('torch') if s else '')")
        try:
            proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
        except OSError as e:
            self.error = f"{python}: {e}"
            return
        lines = proc.stdout.splitlines()
        if proc.returncode != 0 or len(lines) < 2 or not lines[0]:
            self.error = f"{python} has no torch ({proc.stderr.strip()[-200:]})"
            return
        self.site = os.path.realpath(lines[0])
        self.version = lines[1]
        try:
            text = open(os.path.join(self.site, "torch/version.py")).read()
            m = re.search(r"^cuda\b.*?=\s*'([^']+)'", text, re.M)
            self.cuda = m.group(1) if m else None
        except OSError:
            pass

    def rel(self, path):
        """path relative to site-packages when it is inside, else None."""
        real = os.path.realpath(path)
        if self.site and real.startswith(self.site + "/"):
            return os.path.relpath(real, self.site)
        return None

    def exists(self, rel):
        return self.site is not None and os.path.exists(os.path.join(self.site, rel))

    def closure(self, rels):
        """rels and the libraries inside site-packages that they load
        (ldd), relative to site-packages."""
        out = set()
        for rel in rels:
            path = os.path.join(self.site, rel)
            if not os.path.exists(path):
                continue
            out.add(rel)
            for p in ldd_libraries(path)[0]:
                r = self.rel(p)
                if r:
                    out.add(r)
        return out

    def files_under(self, rel):
        """The shared libraries a staged entry (file or folder) holds."""
        path = os.path.join(self.site, rel)
        if os.path.isfile(path):
            return {os.path.normpath(rel)}
        out = set()
        for root, _, files in os.walk(path):
            for f in files:
                if re.search(r"\.so(\.[0-9.]+)?$", f):
                    out.add(os.path.relpath(os.path.join(root, f), self.site))
        return out


def requirement_pins(source):
    """{normalised name: version} of scripts/python-requirements.txt, and
    the lines that are not exact pins."""
    pins, loose = {}, []
    path = os.path.join(source, "scripts/python-requirements.txt")
    if not os.path.exists(path):
        return None, ["(no scripts/python-requirements.txt)"]
    for raw in open(path):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;=<>~,]*)$", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
        else:
            loose.append(line)
    return pins, loose


# ---- the Dockerfile checks ----

class Context:
    """What the checks of one Dockerfile need from outside it."""

    def __init__(self, source, binary, venv, pins, have_apt, base, tree_flavor, static):
        self.source = source
        self.binary = binary
        self.venv = venv
        self.pins = pins or {}
        self.have_apt = have_apt
        self.base = base
        self.tree_flavor = tree_flavor
        self.static = static


def staged_libraries(stages, final, venv_path):
    """The build stage's `cp --parents` out of the venv's site-packages:
    (stage, staging folder, entries, whether a cd into the venv precedes
    it), or None."""
    for stage in stages:
        if stage is final:
            continue
        for line, keyword, rest, env in stage["body"]:
            if keyword != "RUN":
                continue
            segs = segments(expand(rest, env))
            for i, seg in enumerate(segs):
                if not re.match(r"^cp\s", seg) or "--parents" not in seg:
                    continue
                words = [w for w in shlex.split(seg)[1:] if not w.startswith("-")]
                if len(words) < 2:
                    continue
                cd_venv = bool(venv_path) and any(
                    re.match(r"^cd\s", s) and venv_path in s for s in segs[:i])
                return stage, os.path.normpath(words[-1]), [os.path.normpath(w) for w in words[:-1]], cd_venv
    return None


def toolkit_collection(stages, final):
    """The build stage's folder that `ldd ... | ... /usr/local/cuda ... cp`
    collects the toolkit libraries the binaries load into, or None."""
    for stage in stages:
        if stage is final:
            continue
        for line, keyword, rest, env in stage["body"]:
            if keyword == "RUN" and re.search(r"\bldd\s", rest) and TOOLKIT_PREFIX in rest:
                after = rest[rest.index("ldd"):]
                m = re.search(r"\bcp\s[^|;&]*?(/[\w./-]+)/?\s*;", after) or \
                    re.search(r"\bcp\s.*\s(/[\w./-]+)/?\s*$", after)
                if m:
                    return stage, os.path.normpath(m.group(1))
    return None


def final_copies(final):
    """(line, from, sources, destination) of the final stage's COPY --from."""
    out = []
    for line, keyword, rest, env in final["body"]:
        if keyword in ("COPY", "ADD"):
            opts, srcs, dest = copy_args(expand(rest, env))
            if "from" in opts and dest:
                out.append((line, opts["from"], [os.path.normpath(s) for s in srcs], dest))
    return out


def copied_to(copies, stage_name, folder):
    """Where the final stage puts the build stage's folder, or None."""
    for line, src_stage, srcs, dest in copies:
        if src_stage == stage_name and folder in srcs and len(srcs) == 1:
            return os.path.normpath(dest), line
    return None, None


def ld_conf(final):
    """(folders that the final stage writes into /etc/ld.so.conf.d, index of
    that instruction, index of the ldconfig after it or None)."""
    folders, conf_at, ldconfig_at = set(), None, None
    for idx, (line, keyword, rest, env) in enumerate(final["body"]):
        if keyword != "RUN":
            continue
        for seg in segments(expand(rest, env)):
            if "/etc/ld.so.conf.d/" in seg:
                words = re.findall(r"(?<![\w>])(/[\w./+-]+)", seg)
                folders.update(os.path.normpath(w) for w in words if not w.startswith("/etc/ld.so.conf.d"))
                conf_at = idx
            elif re.match(r"^ldconfig\b", seg) and conf_at is not None:
                ldconfig_at = idx
    return folders, conf_at, ldconfig_at


def check_image(image, want, path, ctx, R):
    fname = os.path.basename(path)
    source = ctx.source
    stages, errors = parse_dockerfile(path)
    R.check(not errors, f"{fname}: parses into named stages" + "".join(f"\n    {e}" for e in errors))
    R.check(len(stages) >= 2, f"{fname}: multi-stage ({len(stages)} stages)")
    names = []
    for index, stage in enumerate(stages):
        img = stage["image"]
        if img not in names:
            problem = image_tag_problem(img)
            R.check(problem is None, f"{fname}:{stage['line']}: FROM {img} is pinned"
                    + (f" ({problem})" if problem else ""))
        for line, keyword, rest, _ in stage["body"]:
            if keyword in ("COPY", "ADD"):
                m = re.search(r"--from=(\S+)", rest)
                if m:
                    src = m.group(1)
                    ok = src in names or (src.isdigit() and int(src) < index)
                    R.check(ok, f"{fname}:{line}: COPY --from={src} names an earlier stage ({', '.join(names) or 'none'})")
        names.append(stage["name"])
    if not stages:
        return
    final = stages[-1]
    body = final["body"]

    users = [rest for _, k, rest, _ in body if k == "USER"]
    user = users[-1] if users else ""
    uid, _, gid = user.partition(":")
    ok = uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0))
    R.check(ok, f"{fname}: final stage '{final['name']}' runs as a numeric non-root USER (got '{user or 'none'}')")
    R.check(user == "10001:10001", f"{fname}: final USER is 10001:10001 (got '{user or 'none'}')")

    entry = [rest for _, k, rest, _ in body if k == "ENTRYPOINT"]
    R.check(bool(entry) and entry[-1] == f'["{want["entrypoint"]}"]',
            f"{fname}: ENTRYPOINT [\"{want['entrypoint']}\"] (got {entry[-1] if entry else 'none'})")
    exposed = {p.split("/")[0] for _, k, rest, _ in body if k == "EXPOSE" for p in rest.split()}
    R.check(exposed == want["expose"], f"{fname}: EXPOSE {sorted(want['expose'])} (got {sorted(exposed)})")
    labels = " ".join(rest for _, k, rest, _ in body if k == "LABEL")
    for key in ("title", "version", "revision"):
        R.check(f"org.opencontainers.image.{key}=" in labels, f"{fname}: OCI label org.opencontainers.image.{key}")

    # setup.sh calls: accepted, and what they install.
    stage_packages, venv_calls = {}, []
    for stage in stages:
        for line, keyword, rest, env in stage["body"]:
            if keyword != "RUN":
                continue
            for assigns, script, args in setup_calls(rest):
                rc, pkgs, err = run_setup(source, tuple(args))
                R.check(rc == 0 and pkgs, f"{fname}:{line}: setup.sh {' '.join(args)} is accepted and lists packages"
                        + (f" (rc {rc}: {err})" if rc else ""))
                stage_packages.setdefault(stage["name"], set()).update(pkgs)
                role, kind = role_kind(args)
                if f"{role}:{kind}" in VENV_ROLES:
                    venv_calls.append((stage, line, script, assigns.get("MOMENTUM_VENV", env.get("MOMENTUM_VENV")), role))
    runtime = stage_packages.get(final["name"], set())
    R.check(bool(runtime), f"{fname}: final stage installs its runtime packages through setup.sh")

    binaries_at = [f"/usr/local/bin/{os.path.basename(b)}" for b in want["binaries"]]
    guard = [i for i, (_, k, rest, _) in enumerate(body)
             if k == "RUN" and any(re.match(r"^!\s*ldd\s", s) and re.search(r"\|\s*grep\b[^|]*not found", s)
                                   and all(b in s for b in binaries_at) for s in segments(rest))]
    copied_bins = [i for i, (_, k, rest, _) in enumerate(body)
                   if k == "COPY" and "--from=" in rest
                   and any(re.search(r"/" + re.escape(os.path.basename(b)) + r"(\s|$)", rest) for b in binaries_at)]
    R.check(bool(guard) and (not copied_bins or guard[-1] > max(copied_bins)),
            f"{fname}: final stage fails its build when ldd finds a library of {', '.join(binaries_at)} missing "
            f"(`! ldd ... | grep 'not found'` after the binaries are copied)")

    flavor = want["torch"]
    if flavor is None:
        check_coordinator(fname, stages, final, stage_packages, venv_calls, runtime, ctx, R)
        build_stage = stages[-2]["name"] if len(stages) >= 2 else None
        check_build_tree(fname, want, build_stage, stage_packages, runtime, None, ctx, R)
        return
    torch = check_worker(fname, flavor, stages, final, venv_calls, ctx, R)
    check_build_tree(fname, want, torch["build_stage"] or (stages[-2]["name"] if len(stages) >= 2 else None),
                     stage_packages, runtime, torch, ctx, R)


def check_coordinator(fname, stages, final, stage_packages, venv_calls, runtime, ctx, R):
    all_pkgs = set().union(*stage_packages.values()) if stage_packages else set()
    torchy = sorted(p for p in all_pkgs if TORCH_RE.search(p))
    R.check(not torchy, f"{fname}: setup.sh packages hold no LibTorch (found {torchy})")
    R.check(not venv_calls, f"{fname}: makes no virtual environment (LibTorch) with setup.sh "
            f"(found {', '.join(f'line {l}: --role {r}' for _, l, _, _, r in venv_calls) or 'none'})")
    opts = {}
    for stage in stages[:-1]:
        opts.update(configure_options(stage) or {})
    R.check(opts.get("MOMENTUM_BUILD_WORKER") == "OFF" and "MOMENTUM_PYTHON" not in opts,
            f"{fname}: configures with -DMOMENTUM_BUILD_WORKER=OFF and no MOMENTUM_PYTHON "
            f"(got MOMENTUM_BUILD_WORKER={opts.get('MOMENTUM_BUILD_WORKER')}, MOMENTUM_PYTHON={opts.get('MOMENTUM_PYTHON')})")
    if ctx.static:
        return
    if ctx.have_apt:
        closure = dependency_closure(runtime)
        torchy = sorted(p for p in closure if TORCH_RE.search(p))
        R.check(not torchy, f"{fname}: runtime packages' dependency closure ({len(closure)} packages) holds no LibTorch (found {torchy})")
    else:
        R.skip(f"{fname}: LibTorch in the runtime closure (no apt lists: run apt-get update)")


def check_worker(fname, flavor, stages, final, venv_calls, ctx, R):
    """The LibTorch of a worker image; returns what check_build_tree needs."""
    venv = ctx.venv
    out = {"build_stage": None, "venv_path": None, "staged": set(), "toolkit_ok": False,
           "toolkit_collected": False, "venv_ok": False, "cuda_version": None}
    # The venv: made by setup.sh in the build stage at a fixed path, with
    # the requirements next to setup.sh.
    builds = [c for c in venv_calls if c[0] is not final and c[4] == fname.split(".")[0]]
    venv_path = builds[0][3] if builds else None
    R.check(bool(builds) and bool(venv_path) and venv_path.startswith("/"),
            f"{fname}: the build stage makes the virtual environment with setup.sh --role {fname.split('.')[0]} "
            f"--build at a fixed MOMENTUM_VENV (got {venv_path or 'no MOMENTUM_VENV'}; without it setup.sh "
            f"puts it under ~/.cache and links .venv)")
    if builds:
        stage, line, script, _, _ = builds[0]
        out["build_stage"] = stage["name"]
        req_at = os.path.join(os.path.dirname(script), "python-requirements.txt")
        got = context_file_at(stage, line, req_at, ctx.source)
        R.check(got == "scripts/python-requirements.txt",
                f"{fname}:{line}: scripts/python-requirements.txt is copied to {req_at}, next to setup.sh, "
                f"before setup.sh makes the venv (got {got or 'nothing there'})")
    out["venv_path"] = venv_path
    build = next((s for s in stages if s["name"] == out["build_stage"]), stages[-2] if len(stages) >= 2 else None)

    # The configure.
    opts = configure_options(build) if build else None
    opts = opts or {}
    want_python = f"{venv_path}/bin/python" if venv_path else "<venv>/bin/python"
    R.check(bool(venv_path) and opts.get("MOMENTUM_PYTHON") == want_python,
            f"{fname}: configures with -DMOMENTUM_PYTHON={want_python} (got {opts.get('MOMENTUM_PYTHON', 'none')})")
    want_cuda = "ON" if flavor == "cuda" else "OFF"
    R.check(opts.get("MOMENTUM_WITH_CUDA") == want_cuda,
            f"{fname}: configures with -DMOMENTUM_WITH_CUDA={want_cuda} (got {opts.get('MOMENTUM_WITH_CUDA', 'none: AUTO')})")
    out["venv_ok"] = bool(venv_path) and opts.get("MOMENTUM_PYTHON") == want_python

    # Nothing but pip brings LibTorch.
    downloads = [f"line {line}: {keyword} {rest[:60]}" for s in stages for line, keyword, rest, _ in s["body"]
                 if (keyword == "RUN" and re.search(r"\b(curl|wget)\b|download\.pytorch\.org|libtorch[-\w]*\.zip", rest))
                 or (keyword == "ARG" and rest.startswith("LIBTORCH_")) or keyword == "ADD"]
    R.check(not downloads, f"{fname}: LibTorch comes only from the venv, no download or LIBTORCH_* argument (found {downloads})")

    # The CUDA toolkit.
    cuda_stages = [s for s in stages if re.match(r"^(\S+/)?nvidia/cuda:", s["image"])]
    if flavor == "cuda":
        check_cuda_toolkit(fname, stages, build, cuda_stages, opts, ctx, R, out)
    else:
        R.check(not cuda_stages and "CUDAToolkit_ROOT" not in opts,
                f"{fname}: uses no CUDA toolkit (found {[s['image'] for s in cuda_stages]}"
                f"{', CUDAToolkit_ROOT' if 'CUDAToolkit_ROOT' in opts else ''})")

    # The runtime stage: not the venv, but the libraries copied out of it.
    copies = final_copies(final)
    whole = [f"line {line}: {s}" for line, _, srcs, _ in copies for s in srcs
             if venv_path and (s == venv_path or venv_path.startswith(s.rstrip("/") + "/") or s == "/")]
    R.check(bool(venv_path) and not whole,
            f"{fname}: final stage does not copy the virtual environment {venv_path} (about 5 GB) (found {whole})")
    staged = staged_libraries(stages, final, venv_path)
    if not R.check(staged is not None and staged[3],
                   f"{fname}: the build stage copies LibTorch's libraries out of the venv's site-packages "
                   f"(cd into it, then cp --parents into a folder of their own)"
                   + ("" if staged is None or staged[3] else f" (cp --parents into {staged[1]} without a cd into {venv_path})")):
        return out
    stage, folder, entries, _ = staged
    if not venv.site:
        R.check(False, f"{fname}: the venv's torch to check the copied libraries against ({venv.error})")
        return out
    absent = [e for e in entries if not venv.exists(e)]
    R.check(not absent, f"{fname}: every path it copies exists in the venv's site-packages (not: {absent})")
    dest, line = copied_to(copies, stage["name"], folder)
    R.check(dest is not None, f"{fname}: final stage copies {folder} from the '{stage['name']}' stage (COPY --from={stage['name']} {folder} ...)")
    files = set()
    for e in entries:
        files |= venv.files_under(e)
    out["staged"] = files
    # What LibTorch needs of them.
    needed = venv.closure(TORCH_LINKED[flavor]) | venv.closure(
        [r for r in TORCH_DLOPENED[flavor] if venv.exists(r)])
    missing = sorted(needed - files)
    size = sum(os.path.getsize(os.path.join(venv.site, f)) for f in files)
    R.check(not missing and needed,
            f"{fname}: the libraries it copies ({len(files)}, {size / 1e6:.0f} MB) hold the {len(needed)} that "
            f"{', '.join(os.path.basename(t) for t in TORCH_LINKED[flavor])} load from the venv (ldd)"
            f"{' or torch opens later' if TORCH_DLOPENED[flavor] else ''} (missing: {missing})")
    if flavor == "cuda":
        folders = sorted({os.path.dirname(f) for f in needed if not f.startswith("torch/")} | {"torch/lib"})
        partial = [d for d in folders if not any(d == e or d.startswith(e + "/") for e in entries)]
        R.check(not partial,
                f"{fname}: copies the folders {', '.join(folders)} whole, since cuDNN, NVRTC, NVSHMEM and torch "
                f"open more of their libraries when first used (copied in part or not at all: {partial})")
    # Debian 12 can run them.
    too_new = []
    for f in sorted(files):
        for sym, v in symbol_versions(os.path.join(venv.site, f)).items():
            if v > DEBIAN_SYMBOL_VERSIONS[sym]:
                too_new.append(f"{f} needs {sym}_{fmt_version(v)}")
    R.check(not too_new, f"{fname}: the copied libraries need at most Debian 12's "
            + ", ".join(f"{k}_{fmt_version(v)}" for k, v in DEBIAN_SYMBOL_VERSIONS.items()) + f" (not: {too_new[:5]})")
    # Registered with the dynamic loader, then the guard.
    conf, conf_at, ldconfig_at = ld_conf(final)
    lib_dirs = sorted({os.path.join(dest, os.path.dirname(f)) for f in files}) if dest else []
    unregistered = [d for d in lib_dirs if d not in conf]
    R.check(dest is not None and conf_at is not None and ldconfig_at is not None and not unregistered,
            f"{fname}: final stage lists {', '.join(lib_dirs) or 'the copied folders'} in /etc/ld.so.conf.d and "
            f"runs ldconfig (not listed: {unregistered}{'' if ldconfig_at is not None else '; no ldconfig after it'})")
    guard = [i for i, (_, k, rest, _) in enumerate(final["body"])
             if k == "RUN" and any(re.match(r"^!\s*ldd\s", s) for s in segments(rest))]
    R.check(bool(guard) and ldconfig_at is not None and guard[-1] >= ldconfig_at,
            f"{fname}: its ldd guard runs after ldconfig")
    collected = toolkit_collection(stages, final)
    if collected:
        cdest, _ = copied_to(copies, collected[0]["name"], collected[1])
        out["toolkit_collected"] = cdest is not None and cdest in conf
        R.check(out["toolkit_collected"],
                f"{fname}: final stage copies the toolkit libraries collected in {collected[1]} and lists them in "
                f"/etc/ld.so.conf.d")
    # The description names the LibTorch it carries.
    labels = " ".join(rest for _, k, rest, _ in final["body"] if k == "LABEL")
    pinned = ctx.pins.get("torch")
    R.check(bool(pinned) and f"LibTorch {pinned}" in labels,
            f"{fname}: OCI description names LibTorch {pinned}, the pinned torch")
    return out


def check_cuda_toolkit(fname, stages, build, cuda_stages, opts, ctx, R, out):
    venv = ctx.venv
    if not R.check(len(cuda_stages) == 1, f"{fname}: one stage FROM NVIDIA's CUDA image (found {[s['image'] for s in cuda_stages]})"):
        return
    cuda = cuda_stages[0]
    tag = cuda["image"].split("@")[0].rsplit(":", 1)[-1]
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)-(\w+)-([a-z]+[0-9.]+)$", tag)
    if not R.check(bool(m), f"{fname}: CUDA image tag {tag} is VERSION-VARIANT-DISTRO (e.g. 13.0.2-devel-ubuntu22.04)"):
        return
    version, variant, distro = ".".join(m.group(1, 2, 3)), m.group(4), m.group(5)
    out["cuda_version"] = ".".join(m.group(1, 2))
    R.check(variant == "devel", f"{fname}: the CUDA image is a devel variant, with nvcc and headers (got {variant})")
    pinned = ctx.pins.get("cuda-toolkit")
    torch_cuda = venv.cuda
    ok = bool(torch_cuda) and version.startswith(torch_cuda + ".") and (not pinned or pinned == version)
    R.check(ok, f"{fname}: the CUDA toolkit {version} is the one torch {venv.version} was built with "
            f"(CUDA {torch_cuda}; cuda-toolkit=={pinned} in python-requirements.txt)")
    glibc = CUDA_IMAGE_GLIBC.get(distro)
    R.check(glibc is not None and glibc <= DEBIAN_SYMBOL_VERSIONS["GLIBC"],
            f"{fname}: the CUDA image's {distro} has a glibc ({fmt_version(glibc) if glibc else 'unknown'}) not newer than "
            f"Debian 12's 2.36, so its toolkit runs in the Debian build stage")
    # Only the toolkit from it.
    toolkit_dirs, others = set(), []
    for line, keyword, rest, env in build["body"] if build else []:
        if keyword in ("COPY", "ADD"):
            o, srcs, dest = copy_args(expand(rest, env))
            if o.get("from") == cuda["name"]:
                for s in srcs:
                    if re.match(r"^/usr/local/cuda(-[0-9.]+)?/?$", s) and s.rstrip("/") == dest.rstrip("/"):
                        toolkit_dirs.add(dest.rstrip("/"))
                    else:
                        others.append(f"line {line}: {s}")
    R.check(bool(toolkit_dirs) and not others,
            f"{fname}: takes only the toolkit ({', '.join(sorted(toolkit_dirs)) or 'none'}) from {cuda['image']}; "
            f"NCCL and cuDNN come from the venv (found also {others})")
    links = set()
    for line, keyword, rest, env in build["body"] if build else []:
        if keyword == "RUN":
            for seg in segments(expand(rest, env)):
                lm = re.match(r"^ln\s+-s\S*\s+(\S+)\s+(\S+)$", seg)
                if lm:
                    target = os.path.normpath(os.path.join(os.path.dirname(lm.group(2)), lm.group(1)))
                    if target in toolkit_dirs:
                        links.add(os.path.normpath(lm.group(2)))
    root = opts.get("CUDAToolkit_ROOT")
    out["toolkit_ok"] = bool(root) and os.path.normpath(root) in toolkit_dirs | links
    R.check(out["toolkit_ok"], f"{fname}: configures with -DCUDAToolkit_ROOT at the copied toolkit "
            f"(got {root or 'none'}; toolkit at {sorted(toolkit_dirs | links)})")


def check_build_tree(fname, want, build_stage, stage_packages, runtime, torch, ctx, R):
    """The build tree's binaries against the image's packages and copies."""
    if ctx.static:
        return
    venv = ctx.venv
    flavor = want["torch"]
    matching = flavor is not None and flavor == ctx.tree_flavor
    if matching and flavor == "cuda":
        tree_cuda = cmake_cache(ctx.binary).get("CUDA_VERSION")
        R.check(bool(tree_cuda) and tree_cuda == torch["cuda_version"],
                f"{fname}: the build tree's CUDA toolkit ({tree_cuda}) is the image's ({torch['cuda_version']})")
    if flavor is not None and ctx.tree_flavor and not matching:
        R.note(f"{fname}: the build tree is a {ctx.tree_flavor.upper()} build: what its worker loads from the venv "
               f"and the toolkit is checked against worker-{ctx.tree_flavor}.Dockerfile; this image's LibTorch "
               f"against the venv's wheel files above")

    def kind_of(path):
        if venv.site and venv.rel(path):
            return "venv"
        if path.startswith(TOOLKIT_PREFIX) or os.path.realpath(path).startswith(TOOLKIT_PREFIX):
            return "toolkit"
        return "debian"

    # The headers and libraries they were built from.
    build_pkgs = stage_packages.get(build_stage, set())
    if ctx.have_apt and want["binaries"]:
        build_closure = dependency_closure(build_pkgs) | ctx.base
        for rel in want["binaries"]:
            inputs = build_inputs(ctx.binary, TARGETS[rel], venv.site)
            if inputs is None:
                R.skip(f"{rel}: build inputs (no such target in a Ninja tree at {ctx.binary})")
                continue
            by_kind = {"venv": [], "toolkit": [], "debian": []}
            for f in inputs:
                by_kind[kind_of(f)].append(f)
            owners = {f: owning_package(f) for f in by_kind["debian"]}
            uncovered = sorted({o for o in owners.values() if o and o not in build_closure})
            unowned = sorted(f for f, o in owners.items() if o is None)[:5]
            problems = []
            if by_kind["venv"] and not (torch and torch["venv_ok"]):
                problems.append(f"{len(by_kind['venv'])} from a venv the build stage does not make and configure with")
            toolkit_note = ""
            if by_kind["toolkit"]:
                if flavor == "cuda":
                    if not torch["toolkit_ok"]:
                        problems.append(f"{len(by_kind['toolkit'])} from a CUDA toolkit the build stage does not copy")
                    toolkit_note = f", {len(by_kind['toolkit'])} of the CUDA toolkit it copies"
                elif flavor == "cpu" and ctx.tree_flavor == "cuda":
                    toolkit_note = (f"; {len(by_kind['toolkit'])} of the CUDA toolkit, which this CUDA build read "
                                    f"and a -DMOMENTUM_WITH_CUDA=OFF build does not")
                else:
                    problems.append(f"{len(by_kind['toolkit'])} from a CUDA toolkit: {sorted(by_kind['toolkit'])[:3]}")
            venv_note = f", {len(by_kind['venv'])} of the venv it makes" if by_kind["venv"] else ""
            R.check(not uncovered and not unowned and not problems,
                    f"{rel}: the {len(inputs)} system headers and libraries it was built from are "
                    f"installed by {fname}'s '{build_stage}' stage ({len(by_kind['debian'])} of Debian packages"
                    f"{venv_note}{toolkit_note}) (not: {uncovered}; no package: {unowned}; {problems or 'ok'})")

    # What they load.
    closure = (dependency_closure(runtime) | ctx.base) if ctx.have_apt and want["binaries"] else set()
    for rel in want["binaries"]:
        binpath = os.path.join(ctx.binary, rel)
        if not R.check(os.access(binpath, os.X_OK), f"{rel}: built in {ctx.binary}"):
            continue
        paths, missing = ldd_libraries(binpath)
        driver = [m for m in missing if DRIVER_LIB.match(m)] if ctx.tree_flavor == "cuda" else []
        missing = [m for m in missing if m not in driver]
        R.check(not missing, f"{rel}: ldd resolves every library (missing {missing}"
                + (f"; {', '.join(driver)} from the GPU driver, which the NVIDIA container runtime mounts" if driver else "")
                + ")")
        if flavor is None:
            torchy = [p for p in paths if re.search(r"libtorch|libc10", os.path.basename(p))]
            R.check(not torchy, f"{rel}: does not load LibTorch (ldd: {len(paths)} libraries, torch ones {torchy})")
        debian = [p for p in paths if kind_of(p) == "debian"]
        if ctx.have_apt:
            owners = {p: owning_package(p) for p in debian}
            unowned = sorted(p for p, o in owners.items() if o is None)
            uncovered = sorted({o for o in owners.values() if o and o not in closure})
            R.check(not unowned and not uncovered,
                    f"{rel}: the {len(set(owners.values()))} Debian packages of its libraries are installed by "
                    f"{fname}'s runtime stage (not: {uncovered}; no package: {unowned})")
        else:
            R.skip(f"{rel}: runtime package coverage (no apt lists: run apt-get update)")
        if flavor is None:
            others = [p for p in paths if kind_of(p) != "debian"]
            R.check(not others, f"{rel}: loads nothing from a venv or CUDA toolkit (found {others})")
        elif matching:
            venv_libs = {venv.rel(p) for p in paths if kind_of(p) == "venv"}
            absent = sorted(venv_libs - torch["staged"])
            R.check(not absent, f"{rel}: the {len(venv_libs)} libraries it loads from the venv are among those "
                    f"{fname} copies (not: {absent})")
            toolkit = sorted(p for p in paths if kind_of(p) == "toolkit")
            staged_names = {os.path.basename(f) for f in torch["staged"]}
            by_name = [p for p in toolkit if os.path.basename(p) not in staged_names]
            if flavor == "cuda":
                R.check(not by_name or torch["toolkit_collected"],
                        f"{rel}: the {len(toolkit)} CUDA toolkit libraries it loads "
                        f"({', '.join(os.path.basename(p) for p in toolkit) or 'none'}) are in the venv's copied "
                        f"folders under the same name, or collected from the toolkit (neither: {by_name})")
            else:
                R.check(not toolkit, f"{rel}: a CPU build loads nothing from a CUDA toolkit (found {toolkit})")


# ---- broken variants ----

def _sub(pattern, repl, count=1):
    return (pattern, repl, count)


# (image, what is broken, [(regex, replacement, count)], a failure that
# must name it). Each is applied to a copy of the image's Dockerfile; the
# regexes must match, so that the variants follow the files.
VARIANTS = [
    ("coordinator", "FROM debian:latest", [_sub(r"ARG DEBIAN_IMAGE=\S+", "ARG DEBIAN_IMAGE=debian:latest")],
     "is pinned (uses tag 'latest')"),
    ("coordinator", "runs as root", [_sub(r"USER 10001:10001", "USER 0:0")], "numeric non-root USER"),
    ("coordinator", "COPY --from a stage that does not exist",
     [_sub(r"COPY --from=build /build/server", "COPY --from=builder /build/server")], "names an earlier stage"),
    ("coordinator", "builds the worker too", [_sub(r" -DMOMENTUM_BUILD_WORKER=OFF( -DMOMENTUM_BUILD_TESTS)", r"\1")],
     "-DMOMENTUM_BUILD_WORKER=OFF"),
    ("coordinator", "makes the venv", [_sub(r"--role coordinator --build", "--role worker-cpu --build")],
     "makes no virtual environment"),
    ("coordinator", "no ldd guard", [_sub(r"RUN ! ldd [^\n]*\n", "")], "fails its build when ldd"),
    ("worker-cpu", "setup.sh role that does not exist", [_sub(r"--role worker-cpu --runtime", "--role worker-gpu --runtime")],
     "is accepted and lists packages"),
    ("worker-cpu", "runtime stage forgets to copy torch/lib",
     [_sub(r"COPY --from=build /opt/momentum/site-packages /opt/momentum/site-packages\n", "")],
     "final stage copies /opt/momentum/site-packages"),
    ("worker-cpu", "build without MOMENTUM_PYTHON",
     [_sub(r"-DMOMENTUM_PYTHON=\$\{MOMENTUM_VENV\}/bin/python ", "")], "-DMOMENTUM_PYTHON="),
    ("worker-cpu", "venv at setup.sh's default (no MOMENTUM_VENV)",
     [_sub(r"ENV MOMENTUM_VENV=/opt/momentum/venv \\\n\s*", "ENV ")], "at a fixed MOMENTUM_VENV"),
    ("worker-cpu", "requirements not copied before setup.sh",
     [_sub(r"COPY scripts/setup.sh scripts/python-requirements.txt /src/scripts/",
           "COPY scripts/setup.sh /src/scripts/setup.sh")], "python-requirements.txt is copied"),
    ("worker-cpu", "runtime carries the whole venv",
     [_sub(r"(COPY --from=build /opt/momentum/site-packages /opt/momentum/site-packages\n)",
           r"\1COPY --from=build /opt/momentum/venv /opt/momentum/venv\n")], "does not copy the virtual environment"),
    ("worker-cpu", "forgets libcupti, which libtorch_cpu links",
     [_sub(r" nvidia/cu13/lib/libcupti\.so\.13", "")], "missing: ['nvidia/cu13/lib/libcupti.so.13']"),
    ("worker-cpu", "forgets ld.so.conf.d",
     [_sub(r"RUN printf [^\n]*\n[^\n]*\n \&\& ldconfig \\\n \&\& ", "RUN ")], "in /etc/ld.so.conf.d"),
    ("worker-cpu", "no ldd guard", [_sub(r" \\\n \&\& ! ldd [^\n]*", "")], "fails its build when ldd"),
    ("worker-cpu", "built with CUDA", [_sub(r"-DMOMENTUM_WITH_CUDA=OFF \\\n", "-DMOMENTUM_WITH_CUDA=ON \\\n")],
     "-DMOMENTUM_WITH_CUDA=OFF"),
    ("worker-cpu", "downloads the LibTorch zip",
     [_sub(r"(RUN bash /src/scripts/setup.sh --role worker-cpu --build --clean)",
           r"\1 && curl -fsSL -o /tmp/libtorch.zip https://download.pytorch.org/libtorch/cpu/libtorch.zip")],
     "no download"),
    ("worker-cuda", "cuDNN cherry-picked instead of its folder",
     [_sub(r" nvidia/cudnn/lib ", " nvidia/cudnn/lib/libcudnn.so.9 ")], "copied in part or not at all: ['nvidia/cudnn/lib']"),
    ("worker-cuda", "forgets NCCL", [_sub(r" nvidia/nccl/lib ", " ")], "nvidia/nccl/lib/libnccl.so.2"),
    ("worker-cuda", "runtime stage forgets torch/lib and the nvidia folders",
     [_sub(r"COPY --from=build /opt/momentum/site-packages /opt/momentum/site-packages\n", "")],
     "final stage copies /opt/momentum/site-packages"),
    ("worker-cuda", "registers only torch/lib",
     [_sub(r"      /opt/momentum/site-packages/nvidia/[^\n]*\n", "", 0)], "not listed: ['/opt/momentum/site-packages/nvidia/"),
    ("worker-cuda", "CUDA image on Ubuntu 24.04 (glibc 2.39)",
     [_sub(r"ARG CUDA_IMAGE=(\S+)-ubuntu22\.04", r"ARG CUDA_IMAGE=\1-ubuntu24.04")], "not newer than Debian 12's"),
    ("worker-cuda", "CUDA 12.4 toolkit", [_sub(r"ARG CUDA_IMAGE=nvidia/cuda:[0-9.]+-", "ARG CUDA_IMAGE=nvidia/cuda:12.4.1-"),
                                          _sub(r"/usr/local/cuda-13\.0", "/usr/local/cuda-12.4", 0),
                                          _sub(r"cuda-13\.0 /usr/local/cuda", "cuda-12.4 /usr/local/cuda")],
     "the one torch"),
    ("worker-cuda", "NCCL from the CUDA image",
     [_sub(r"(COPY --from=cuda /usr/local/cuda-13\.0 /usr/local/cuda-13\.0\n)",
           r"\1COPY --from=cuda /usr/lib/x86_64-linux-gnu/libnccl.so.2 /opt/nccl/lib/\n")], "takes only the toolkit"),
    ("worker-cuda", "built without CUDA", [_sub(r"-DMOMENTUM_WITH_CUDA=ON \\\n", "-DMOMENTUM_WITH_CUDA=OFF \\\n")],
     "-DMOMENTUM_WITH_CUDA=ON"),
    ("worker-cuda", "no CUDAToolkit_ROOT", [_sub(r"[ ]*-DCUDAToolkit_ROOT=\S+ \\\n", "")],
     "-DCUDAToolkit_ROOT"),
    ("worker-cuda", "build without MOMENTUM_PYTHON",
     [_sub(r"-DMOMENTUM_PYTHON=\$\{MOMENTUM_VENV\}/bin/python ", "")], "-DMOMENTUM_PYTHON="),
]


def check_variants(docker_dir, ctx, R):
    with tempfile.TemporaryDirectory() as tmp:
        for image, what, subs, expect in VARIANTS:
            path = os.path.join(docker_dir, f"{image}.Dockerfile")
            if not os.path.exists(path):
                continue
            text = open(path).read()
            applied = True
            for pattern, repl, count in subs:
                text, n = re.subn(pattern, repl, text, count=count)
                applied = applied and n > 0
            if not R.check(applied, f"broken {image}.Dockerfile ({what}): the change applies to the Dockerfile"):
                continue
            vpath = os.path.join(tmp, f"{image}.Dockerfile")
            with open(vpath, "w") as f:
                f.write(text)
            sub = Results(quiet=True)
            check_image(image, IMAGES[image], vpath, ctx, sub)
            hits = [f for f in sub.failures if expect in f]
            R.check(bool(hits), f"broken {image}.Dockerfile ({what}) is rejected"
                    + (f": {hits[0].splitlines()[0][:200]}" if hits else
                       f" (no failure names '{expect}'; failures: {[f[:120] for f in sub.failures]})"))


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    source, binary = sys.argv[1], sys.argv[2]
    R = Results()
    docker_dir = os.path.join(source, "deploy/docker")
    have_apt = apt_lists_present()
    base = required_base() if have_apt else set()

    # .dockerignore keeps build trees, runs, the venv and git out of the context.
    ignore_path = os.path.join(source, ".dockerignore")
    ignore = open(ignore_path).read().split() if os.path.exists(ignore_path) else []
    for entry in (".git", "build", "runs", ".venv"):
        R.check(entry in ignore, f".dockerignore: lists {entry}")

    found = sorted(f for f in os.listdir(docker_dir) if f.endswith(".Dockerfile"))
    R.check(found == sorted(f"{i}.Dockerfile" for i in IMAGES),
            f"deploy/docker: the Dockerfiles are {', '.join(f'{i}.Dockerfile' for i in IMAGES)} (found {found})")

    # The pinned Python environment and the torch in the build's venv.
    pins, loose = requirement_pins(source)
    R.check(pins is not None and not loose and "torch" in pins,
            f"scripts/python-requirements.txt pins every package with == (not: {loose[:5]})")
    cmake_torch = None
    try:
        m = re.search(r"set\(MOMENTUM_TORCH_VERSION\s+(\S+)\)", open(os.path.join(source, "cmake/MomentumTorch.cmake")).read())
        cmake_torch = m.group(1) if m else None
    except OSError:
        pass
    R.check(bool(pins) and pins.get("torch") == cmake_torch,
            f"the pinned torch ({(pins or {}).get('torch')}) is the one cmake/MomentumTorch.cmake builds on ({cmake_torch})")
    python = cmake_cache(binary).get("MOMENTUM_PYTHON") or sys.executable
    venv = Venv(python)
    R.check(venv.site is not None and bool(pins) and (venv.version or "").split("+")[0] == pins.get("torch"),
            f"the build's Python ({python}) has the pinned torch ({venv.version or venv.error}), whose libraries "
            f"the worker images are checked against")

    # The kind of worker the build tree holds.
    tree_flavor = None
    worker = os.path.join(binary, "worker/momentum-worker")
    if os.access(worker, os.X_OK):
        names = {os.path.basename(p) for p in ldd_libraries(worker)[0]}
        tree_flavor = "cuda" if "libtorch_cuda.so" in names else "cpu" if "libtorch_cpu.so" in names else None
        R.note(f"{worker} is a {tree_flavor.upper() if tree_flavor else 'LibTorch-less'} build")

    ctx = Context(source, binary, venv, pins, have_apt, base, tree_flavor, static=False)
    for image, want in IMAGES.items():
        path = os.path.join(docker_dir, f"{image}.Dockerfile")
        if os.path.exists(path):
            check_image(image, want, path, ctx, R)

    # Broken copies of the Dockerfiles are rejected.
    check_variants(docker_dir, Context(source, binary, venv, pins, have_apt, base, tree_flavor, static=True), R)

    # Every package of every role exists in Debian 12. The packages installed
    # only when a command is missing are listed with a PATH that has none.
    with tempfile.TemporaryDirectory() as bare:
        awk = shutil.which("awk")
        os.symlink(awk, os.path.join(bare, "awk"))
        every = set()
        for role in ROLES:
            for kind in ("--build", "--runtime"):
                rc, pkgs, err = run_setup(source, ("--role", role, kind), path_env=bare)
                R.check(rc == 0 and pkgs, f"setup.sh --role {role} {kind} --list (rc {rc}, {len(pkgs)} packages) {err}")
                every.update(pkgs)
        R.check({"kubernetes-client"} <= every,
                "setup.sh --role test installs kubernetes-client when kubectl is missing")
        rc, _, err = run_setup(source, ("--role", "nosuchrole", "--build"))
        R.check(rc != 0 and "nosuchrole" in err, f"setup.sh rejects an unknown role, naming it ({err})")
    if have_apt:
        out = subprocess.run(["apt-cache", "policy", *sorted(every)], capture_output=True, text=True).stdout
        from_bookworm, current = set(), None
        for l in out.splitlines():
            if l and not l.startswith(" "):
                current = l.rstrip(":")
            elif current and re.search(r"\s\d+\s+\S+\s+bookworm(-updates|-security)?/main\s", l + " "):
                from_bookworm.add(current)
        absent = sorted(every - from_bookworm)
        R.check(not absent, f"all {len(every)} packages of setup.sh's roles exist in Debian 12 bookworm (not: {absent})")
    else:
        R.skip("packages exist in Debian 12 (no apt lists: run apt-get update)")

    for s in R.skipped:
        print(f"SKIP {s}")
    print(f"{R.passes} passed, {len(R.failures)} failed")
    if R.failures:
        return 1
    return 77 if R.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
