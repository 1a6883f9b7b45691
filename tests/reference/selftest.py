#!/usr/bin/env python3
"""Self-test of the Python MoCo reference and of crosscheck.py.

Builds INIT files (torch.save, same structure the C++ side writes), produces
RESULT files with a second, deliberately naive implementation of the MoCo step
(explicit loops: name-matched momentum update, per-element logits and
log-sum-exp, loop un-shuffle, hand-written SGD, loop enqueue) and checks that
crosscheck accepts them, and rejects them -- naming the tensor -- when one
tensor is perturbed. Also checks build_encoder against torchvision's own
ResNet-18/50 (names, shapes, outputs) and the vectorised enqueue against the
loop for N > K. Runs in a few seconds; exit 0 on success.
"""

import copy
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import crosscheck  # noqa: E402
import moco_ref  # noqa: E402

N, K, S, STEPS, WIDTH = 8, 20, 16, 3, 4

# (config, steps, rtol for naive-vs-reference, run the perturbation checks)
#
# Conditioning: a training step is not a smooth function of its inputs (ReLU
# kinks). Two correct float32 implementations that round differently can put
# one activation on the other side of 0 and then differ by percents after a
# few SGD steps. ResNet-18 with the small stem is well-conditioned here (errors
# ~1e-6 over 3 steps at lr 0.01); the standard stem and ResNet-50 are checked
# over one step. crosscheck.py diagnoses such
# cases on a mismatch by re-running the reference in float64.
CONFIGS = {
    # MoCo v1: linear head, T 0.07, no BN shuffle.
    "v1": (dict(arch="resnet18", width=WIDTH, in_channels=1, small_stem=True, dim=16,
                mlp=False, queue_size=K, momentum=0.99, temperature=0.07,
                sgd_momentum=0.9, weight_decay=1e-4, bn_groups=0), STEPS, 1e-4, True),
    # MoCo v2: MLP head, T 0.2, BN shuffled over 2 groups; RGB input.
    "v2": (dict(arch="resnet18", width=WIDTH, in_channels=3, small_stem=True, dim=16,
                mlp=True, queue_size=K, momentum=0.99, temperature=0.2,
                sgd_momentum=0.9, weight_decay=1e-4, bn_groups=2), STEPS, 1e-4, True),
    # Split BN with 4 groups of 2.
    "split4": (dict(arch="resnet18", width=WIDTH, in_channels=1, small_stem=True, dim=16,
                    mlp=False, queue_size=K, momentum=0.99, temperature=0.2,
                    sgd_momentum=0.9, weight_decay=1e-4, bn_groups=4), STEPS, 1e-4, True),
    # Standard stem (7x7/2 conv + max-pool), one step.
    "stem": (dict(arch="resnet18", width=WIDTH, in_channels=3, small_stem=False, dim=16,
                  mlp=False, queue_size=K, momentum=0.99, temperature=0.07,
                  sgd_momentum=0.9, weight_decay=1e-4, bn_groups=0), 1, 1e-4, False),
    # Bottleneck ResNet-50, MLP head, split BN, one step.
    "r50": (dict(arch="resnet50", width=WIDTH, in_channels=1, small_stem=True, dim=16,
                 mlp=True, queue_size=K, momentum=0.99, temperature=0.2,
                 sgd_momentum=0.9, weight_decay=1e-4, bn_groups=2), 1, 1e-4, False),
}

failures = []


def check(cond, msg):
    if cond:
        print(f"  ok   {msg}")
    else:
        print(f"  FAIL {msg}")
        failures.append(msg)


# ------------------------------------------------------------------ INIT maker

def make_init(cfg, seed, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc_q = moco_ref.build_encoder(cfg["arch"], cfg["width"], cfg["in_channels"],
                                   cfg["small_stem"], cfg["dim"], cfg["mlp"])
    sd_q = {k: v.clone() for k, v in enc_q.state_dict().items()}
    # Non-default BN state so buffers are really exercised.
    for k, v in sd_q.items():
        if k.endswith("running_mean"):
            sd_q[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd_q[k] = 1.0 + 0.2 * torch.rand(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            sd_q[k] = torch.tensor(5, dtype=torch.long)
        elif k.endswith("bn2.weight") or k.endswith("bn3.weight"):
            sd_q[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(".bias"):
            # Non-zero biases: a bias that starts at 0 holds only a few updates,
            # and its relative difference would measure gradient noise alone.
            sd_q[k] = 0.1 * torch.randn(v.shape, generator=g)
    # Key encoder differs slightly from the query encoder, to prove that
    # INIT's encoder_k (not a copy of encoder_q) is what gets loaded.
    sd_k = {}
    for k, v in sd_q.items():
        if v.is_floating_point():
            sd_k[k] = v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g)
        else:
            sd_k[k] = v + 2
    queue = torch.randn(cfg["dim"], cfg["queue_size"], generator=g)
    queue = queue / queue.norm(dim=0, keepdim=True)
    batches = []
    for i in range(steps):
        xq = torch.randn(N, cfg["in_channels"], S, S, generator=g)
        xk = xq + 0.3 * torch.randn(N, cfg["in_channels"], S, S, generator=g)
        perm = (torch.randperm(N, generator=g) if cfg["bn_groups"] > 0
                else torch.empty(0, dtype=torch.long))
        batches.append({"query": xq, "key": xk, "perm": perm, "lr": 0.01 - 0.002 * i})
    return {"config": dict(cfg), "encoder_q": sd_q, "encoder_k": sd_k,
            "queue": queue, "queue_ptr": 13, "steps": batches}


# ------------------------------------------------------------------ naive second implementation

def naive_run(init):
    """A second, loop-based MoCo implementation; returns a RESULT dict."""
    cfg = init["config"]
    enc_q = moco_ref.build_encoder(cfg["arch"], cfg["width"], cfg["in_channels"],
                                   cfg["small_stem"], cfg["dim"], cfg["mlp"])
    enc_k = moco_ref.build_encoder(cfg["arch"], cfg["width"], cfg["in_channels"],
                                   cfg["small_stem"], cfg["dim"], cfg["mlp"])
    enc_q.load_state_dict(init["encoder_q"])
    enc_k.load_state_dict(init["encoder_k"])
    enc_q.train()
    enc_k.train()
    qparams = dict(enc_q.named_parameters())
    kparams = dict(enc_k.named_parameters())
    m, T = cfg["momentum"], cfg["temperature"]
    mom, wd, Kq, G = cfg["sgd_momentum"], cfg["weight_decay"], cfg["queue_size"], cfg["bn_groups"]
    queue = init["queue"].clone()
    ptr = int(init["queue_ptr"])
    bufs = {}
    losses = []
    for st in init["steps"]:
        xq, xk, perm, lr = st["query"], st["key"], st["perm"], st["lr"]
        n = xq.shape[0]
        # (a) momentum update, matched by name.
        with torch.no_grad():
            for name, pk in kparams.items():
                pk.copy_(pk * m + qparams[name] * (1.0 - m))
        # (b) queries.
        q = enc_q(xq)
        q = q / torch.sqrt((q * q).sum(dim=1, keepdim=True))
        # (c) keys.
        with torch.no_grad():
            if perm.numel() == 0:
                k = enc_k(xk)
            else:
                shuf = torch.stack([xk[int(perm[j])] for j in range(n)])
                size = n // G
                outs = []
                for gi in range(G):
                    outs.append(enc_k(shuf[gi * size:(gi + 1) * size]))
                k_shuf = torch.cat(outs)
                k = torch.empty_like(k_shuf)
                for j in range(n):
                    k[int(perm[j])] = k_shuf[j]
            k = k / torch.sqrt((k * k).sum(dim=1, keepdim=True))
        # (d) logits and InfoNCE, element by element.
        per_sample = []
        for i in range(n):
            row = [torch.dot(q[i], k[i])]
            for j in range(Kq):
                row.append(torch.dot(q[i], queue[:, j]))
            row = torch.stack(row) / T
            mx = row.max().detach()
            lse = mx + torch.log(torch.exp(row - mx).sum())
            per_sample.append(lse - row[0])
        loss = torch.stack(per_sample).mean()
        # (e) gradients and hand-written SGD (dampening 0, no Nesterov).
        for p in qparams.values():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for name, p in qparams.items():
                d = p.grad + wd * p
                if name in bufs:
                    bufs[name] = mom * bufs[name] + d
                else:
                    bufs[name] = d.clone()
                p.sub_(lr * bufs[name])
        losses.append(loss.item())
        # (f) enqueue, one column at a time.
        for i in range(n):
            queue[:, (ptr + i) % Kq] = k[i]
        ptr = (ptr + n) % Kq
    return {"loss": losses,
            "encoder_q": {kk: v.clone() for kk, v in enc_q.state_dict().items()},
            "encoder_k": {kk: v.clone() for kk, v in enc_k.state_dict().items()},
            "queue": queue, "queue_ptr": ptr}


# ------------------------------------------------------------------ individual checks

def check_encoder_vs_torchvision():
    print("build_encoder vs torchvision:")
    for arch in ("resnet18", "resnet50"):
        tv = getattr(torchvision.models, arch)()
        ours = moco_ref.build_encoder(arch, 64, 3, False, 1000, False)
        a, b = tv.state_dict(), ours.state_dict()
        same = list(a.keys()) == list(b.keys()) and all(a[k].shape == b[k].shape for k in a)
        check(same, f"{arch}: same parameter/buffer names, order and shapes as torchvision")
        ours.load_state_dict(a)
        tv.eval()
        ours.eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            check(torch.allclose(tv(x), ours(x), rtol=1e-5, atol=1e-5),
                  f"{arch}: same outputs as torchvision with the same weights")
    e = moco_ref.build_encoder("resnet18", 4, 1, True, 16, True)
    sd = e.state_dict()
    check(tuple(sd["conv1.weight"].shape) == (4, 1, 3, 3), "small stem: conv1 3x3, 1 channel, width 4")
    check(not any(k.startswith("maxpool") for k in sd) and isinstance(e.maxpool, torch.nn.Identity),
          "small stem: maxpool is identity")
    check(tuple(sd["fc.0.weight"].shape) == (32, 32) and tuple(sd["fc.2.weight"].shape) == (16, 32),
          "mlp head named fc.0 / fc.2 with feat 8w")
    e50 = moco_ref.build_encoder("resnet50", 4, 1, True, 16, False).state_dict()
    check(tuple(e50["fc.weight"].shape) == (16, 128) and "layer1.0.downsample.0.weight" in e50,
          "resnet50 width 4: feat 128, layer1 downsample present")
    check(e.bn1.eps == 1e-5 and e.bn1.momentum == 0.1, "BatchNorm eps 1e-5 momentum 0.1")


def check_enqueue():
    print("vectorised enqueue vs loop:")
    g = torch.Generator().manual_seed(7)
    ok = True
    for Kq in (5, 8, 20, 3):
        for ptr in range(Kq):
            for n in (1, 3, 8, 11):
                r = moco_ref.MocoRef(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), dim=4, K=Kq,
                                     queue=torch.randn(4, Kq, generator=g), queue_ptr=ptr)
                want = r.queue.clone()
                keys = torch.randn(n, 4, generator=g)
                for i in range(n):
                    want[:, (ptr + i) % Kq] = keys[i]
                r._enqueue(keys)
                ok &= torch.equal(r.queue, want) and r.queue_ptr == (ptr + n) % Kq
    check(ok, "equal for K in {3,5,8,20}, every ptr, N in {1,3,8,11} (incl. N > K)")


def perturbations(result):
    """(description, expected failing row name, mutated copy of result)."""
    out = []
    r = copy.deepcopy(result)
    t = r["encoder_q"]["layer3.0.conv2.weight"]
    t.view(-1)[3] += 1e-3 * t.abs().max()
    out.append(("encoder_q param +1e-3 rel", "encoder_q.layer3.0.conv2.weight", r))
    r = copy.deepcopy(result)
    r["encoder_k"]["bn1.num_batches_tracked"] += 1
    out.append(("encoder_k num_batches_tracked +1", "encoder_k.bn1.num_batches_tracked", r))
    r = copy.deepcopy(result)
    r["encoder_k"]["layer4.1.bn1.running_var"] *= 1.001
    out.append(("encoder_k running_var x1.001", "encoder_k.layer4.1.bn1.running_var", r))
    r = copy.deepcopy(result)
    r["queue"][:, 0] = -r["queue"][:, 0]
    out.append(("queue column negated", "queue", r))
    r = copy.deepcopy(result)
    r["queue_ptr"] = (r["queue_ptr"] + 1) % K
    out.append(("queue_ptr off by one", "queue_ptr", r))
    r = copy.deepcopy(result)
    r["loss"][2] *= 1.001
    out.append(("loss[2] x1.001", "loss[2]", r))
    return out


def check_config(name, cfg, steps, rtol, perturb, tmp, seed):
    print(f"config {name}: {cfg['arch']} mlp={cfg['mlp']} T={cfg['temperature']} "
          f"bn_groups={cfg['bn_groups']} small_stem={cfg['small_stem']} steps={steps}")
    init = make_init(cfg, seed, steps)
    init_path = os.path.join(tmp, f"{name}_init.pt")
    torch.save(init, init_path)
    init = torch.load(init_path)
    naive = naive_run(init)
    res_path = os.path.join(tmp, f"{name}_result.pt")
    torch.save(naive, res_path)

    reference = crosscheck.run_reference(torch.load(init_path))
    ok, rows, problems = crosscheck.compare(torch.load(res_path), reference, rtol)
    worst = max(rows, key=lambda r: r.rel)
    check(ok, f"naive implementation agrees with MocoRef within {rtol:g} "
              f"(worst {worst.name} rel {worst.rel:.2e})")
    if not ok:
        print(crosscheck.format_report(ok, rows, problems, rtol))
    # The run must actually have moved things, or the comparison proves nothing.
    moved = [not torch.equal(init[w][kk], naive[w][kk])
             for w in ("encoder_q", "encoder_k") for kk in init[w]]
    check(all(moved), "every parameter and buffer of both encoders changed during the run")
    check(naive["queue_ptr"] == (13 + steps * N) % K, "queue pointer advanced with wrap-around")
    if not perturb:
        return init_path, res_path

    for desc, bad_name, mutated in perturbations(naive):
        ok, rows, problems = crosscheck.compare(mutated, reference, 1e-4)
        failed = [r.name for r in rows if not r.ok]
        check(not ok and failed == [bad_name], f"detects {desc} -> reports exactly {bad_name}")
    # Structural problems are reported too.
    r = copy.deepcopy(naive)
    del r["encoder_q"]["fc.bias" if not cfg["mlp"] else "fc.2.bias"]
    ok, rows, problems = crosscheck.compare(r, reference, 1e-4)
    check(not ok and any("missing in RESULT" in p for p in problems), "detects a missing tensor")
    return init_path, res_path


def check_float64_arbiter(init_path, res_path):
    """conditioning_note lets the float64 run decide only when the float32
    reference is itself far from it and RESULT is within rtol of it."""
    print("float64 arbiter:")
    init = torch.load(init_path)
    ref32 = crosscheck.run_reference(torch.load(init_path))
    real_run = crosscheck.run_reference

    def scaled(result, name, factor):
        r = copy.deepcopy(result)
        r["encoder_q"][name] = r["encoder_q"][name] * factor
        return r

    name = next(iter(ref32["encoder_q"]))
    # A float64 run that the float32 reference misses by 1e-3 in one tensor:
    # an ill-conditioned INIT.
    ref64 = scaled(ref32, name, 1.001)
    try:
        crosscheck.run_reference = lambda i, dtype=torch.float32: copy.deepcopy(ref64)
        _, ok = crosscheck.conditioning_note(init, ref64, ref32, 1e-4)
        check(ok, "a RESULT equal to the float64 run passes when the float32 reference is ill-conditioned")
        _, ok = crosscheck.conditioning_note(init, scaled(ref64, name, 1.001), ref32, 1e-4)
        check(not ok, "a RESULT 1e-3 from the float64 run still fails")
        crosscheck.run_reference = lambda i, dtype=torch.float32: copy.deepcopy(ref32)
        _, ok = crosscheck.conditioning_note(init, scaled(ref32, name, 1.001), ref32, 1e-4)
        check(not ok, "a well-conditioned INIT leaves the float32 comparison in force")
    finally:
        crosscheck.run_reference = real_run


def run_cli(args):
    p = subprocess.run([sys.executable, os.path.join(HERE, "crosscheck.py")] + args,
                       capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def check_cli(tmp, init_path, res_path):
    print("crosscheck.py command line:")
    rc, out = run_cli([init_path, res_path])
    check(rc == 0 and "OK:" in out, f"exit 0 on a matching RESULT (rc {rc})")
    if rc != 0:
        print(out)
    res = torch.load(res_path)
    res["encoder_k"]["layer2.0.downsample.1.weight"] *= 1.01
    bad_res = os.path.join(tmp, "bad_result.pt")
    torch.save(res, bad_res)
    rc, out = run_cli([init_path, bad_res])
    check(rc == 1 and "MISMATCH" in out and "encoder_k.layer2.0.downsample.1.weight" in out,
          f"exit 1 naming the perturbed tensor (rc {rc})")
    init = torch.load(init_path)
    init["encoder_q"]["layer1.0.bn1.wieght"] = init["encoder_q"].pop("layer1.0.bn1.weight")
    bad_init = os.path.join(tmp, "bad_init.pt")
    torch.save(init, bad_init)
    rc, out = run_cli([bad_init, res_path])
    check(rc == 1 and "layer1.0.bn1.wieght" in out and "layer1.0.bn1.weight" in out,
          f"exit 1 naming the differing state-dict names (rc {rc})")


def main():
    t0 = time.time()
    torch.set_num_threads(1)
    check_encoder_vs_torchvision()
    check_enqueue()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, (cfg, steps, rtol, perturb)) in enumerate(CONFIGS.items()):
            paths[name] = check_config(name, cfg, steps, rtol, perturb, tmp, 1000 + i)
        check_cli(tmp, *paths["v2"])
        check_float64_arbiter(*paths["v2"])
    dt = time.time() - t0
    if failures:
        print(f"selftest FAILED ({len(failures)} failure(s), {dt:.1f} s):")
        for f in failures:
            print("  - " + f)
        return 1
    print(f"selftest passed ({dt:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
