#!/usr/bin/env python3
"""Cross-check the C++ MoCo trainer against the Python reference.

usage: crosscheck.py INIT RESULT [--rtol 1e-4] [--show N]

INIT and RESULT are written by the C++ side with PickleForTorchLoad (or by
selftest.py with torch.save); both load with torch.load.

INIT   = {"config": {...}, "encoder_q": {name: tensor}, "encoder_k": {...},
          "queue": [dim, K], "queue_ptr": int,
          "steps": [{"query", "key", "perm" (empty when bn none), "lr"}, ...]}
RESULT = {"loss": [float per step], "encoder_q": {...}, "encoder_k": {...},
          "queue": tensor, "queue_ptr": int}
config.precision (default fp32): bf16 autocasts both encoders' forward passes
(autocast_bf16). config.channels_last (default false): the trainer's convolution weights are
channels_last and its activations are from the stem on; the reference's are made
so too, so that both run the same kernels. (In different layouts the float32 results differ by rounding, and
over a few steps some pre-activation within rounding of 0 lands on the other
side of a ReLU in one of them: a gradient of the size of the largest one
differs, and the comparison fails though neither is wrong.)

Runs the steps with moco_ref.MocoRef from INIT's state and compares every loss,
every parameter and buffer of both encoders, the queue and the pointer:
max|a-b| / max(max|b|, 1e-12) <= rtol per tensor (b = Python reference);
integer tensors (num_batches_tracked) and the pointer must match exactly.
Exit 0 on success, 1 on any mismatch or unusable input (with a message naming it).
"""

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moco_ref  # noqa: E402


class InputError(Exception):
    pass


# ---------------------------------------------------------------- tolerant accessors

def _scalar(v, what):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise InputError(f"{what}: expected a scalar, got tensor of shape {tuple(v.shape)}")
        return v.item()
    if isinstance(v, (list, tuple)) and len(v) == 1:
        return _scalar(v[0], what)
    return v


def as_int(v, what="value"):
    v = _scalar(v, what)
    if isinstance(v, float) and not v.is_integer():
        raise InputError(f"{what}: expected an integer, got {v}")
    return int(v)


def as_float(v, what="value"):
    return float(_scalar(v, what))


def as_bool(v, what="value"):
    v = _scalar(v, what)
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def as_dict(v, what):
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, (list, tuple)) and all(isinstance(e, (list, tuple)) and len(e) == 2 for e in v):
        return {str(a): b for a, b in v}
    raise InputError(f"{what}: expected a dict, got {type(v).__name__}")


def get(d, key, what):
    if key not in d:
        raise InputError(f"{what}: missing key {key!r} (have {sorted(map(str, d.keys()))})")
    return d[key]


def state_dict_of(v, what):
    sd = as_dict(v, what)
    out = collections.OrderedDict()
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        out[str(name)] = t
    return out


def as_float_list(v, what):
    if isinstance(v, torch.Tensor):
        return [float(x) for x in v.reshape(-1).tolist()]
    return [as_float(x, f"{what}[{i}]") for i, x in enumerate(v)]


# ---------------------------------------------------------------- model construction

def autocast_bf16(encoder):
    """resources.precision bf16 as the trainer runs it: the encoder's forward
    pass autocast to bfloat16 on the CPU, its output back in the input's
    type (float32), so that the normalisation, logits, loss, queue and
    optimiser stay float32. (Autocast leaves float64, the diagnostic run,
    alone.)"""
    forward = encoder.forward

    def autocast_forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x).to(x.dtype)

    encoder.forward = autocast_forward


def build_from_init(init):
    init = as_dict(init, "INIT")
    cfg = as_dict(get(init, "config", "INIT"), "INIT.config")
    c = {
        "arch": str(get(cfg, "arch", "config")),
        "width": as_int(get(cfg, "width", "config"), "config.width"),
        "in_channels": as_int(get(cfg, "in_channels", "config"), "config.in_channels"),
        "small_stem": as_bool(get(cfg, "small_stem", "config"), "config.small_stem"),
        "dim": as_int(get(cfg, "dim", "config"), "config.dim"),
        "mlp": as_bool(get(cfg, "mlp", "config"), "config.mlp"),
        "queue_size": as_int(get(cfg, "queue_size", "config"), "config.queue_size"),
        "momentum": as_float(get(cfg, "momentum", "config"), "config.momentum"),
        "temperature": as_float(get(cfg, "temperature", "config"), "config.temperature"),
        "sgd_momentum": as_float(get(cfg, "sgd_momentum", "config"), "config.sgd_momentum"),
        "weight_decay": as_float(get(cfg, "weight_decay", "config"), "config.weight_decay"),
        "bn_groups": as_int(cfg.get("bn_groups", 0), "config.bn_groups"),
        "channels_last": as_bool(cfg.get("channels_last", False), "config.channels_last"),
        "precision": str(cfg.get("precision", "fp32")),
    }
    if c["precision"] not in ("fp32", "bf16"):
        raise InputError(f"config.precision must be fp32 or bf16, got {c['precision']!r}")
    enc = {}
    for which in ("encoder_q", "encoder_k"):
        model = moco_ref.build_encoder(c["arch"], c["width"], c["in_channels"],
                                       c["small_stem"], c["dim"], c["mlp"])
        sd = state_dict_of(get(init, which, "INIT"), f"INIT.{which}")
        load_strict(model, sd, f"INIT.{which}")
        if c["channels_last"]:
            # The trainer's layout: the same kernels, the same rounding.
            model.to(memory_format=torch.channels_last)
            # Inputs made so (Moco::Encode), and kept so from the stem on, as
            # the trainer keeps them: a convolution of a 1-channel input may
            # give NCHW by itself.
            model.register_forward_pre_hook(
                lambda module, args: (args[0].contiguous(memory_format=torch.channels_last),))
            model.conv1.register_forward_hook(
                lambda module, args, out: out.contiguous(memory_format=torch.channels_last))
        if c["precision"] == "bf16":
            autocast_bf16(model)
        enc[which] = model
    queue = get(init, "queue", "INIT")
    if not isinstance(queue, torch.Tensor):
        raise InputError("INIT.queue: expected a tensor")
    ref = moco_ref.MocoRef(enc["encoder_q"], enc["encoder_k"], dim=c["dim"],
                           K=c["queue_size"], m=c["momentum"], T=c["temperature"],
                           sgd_momentum=c["sgd_momentum"],
                           weight_decay=c["weight_decay"], queue=queue.float(),
                           queue_ptr=as_int(get(init, "queue_ptr", "INIT"), "INIT.queue_ptr"))
    return ref, c


def load_strict(model, sd, what):
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shape = [f"{k}: file {tuple(sd[k].shape)} vs reference {tuple(want[k].shape)}"
             for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shape:
        msg = [f"{what}: state dict does not match the reference encoder"]
        if missing:
            msg.append("  missing in file (expected by reference): " + ", ".join(missing))
        if unexpected:
            msg.append("  unexpected in file (unknown to reference): " + ", ".join(unexpected))
        if shape:
            msg.append("  shape mismatch: " + "; ".join(shape))
        raise InputError("\n".join(msg))
    model.load_state_dict(sd, strict=True)


def parse_steps(init, cfg):
    steps = get(as_dict(init, "INIT"), "steps", "INIT")
    out = []
    for i, s in enumerate(steps):
        s = as_dict(s, f"INIT.steps[{i}]")
        xq = get(s, "query", f"steps[{i}]")
        xk = get(s, "key", f"steps[{i}]")
        perm = s.get("perm", None)
        if isinstance(perm, torch.Tensor) and perm.numel() == 0:
            perm = None
        if cfg["bn_groups"] == 0:
            if perm is not None:
                raise InputError(f"steps[{i}].perm given but config.bn_groups is 0 (bn none)")
        else:
            if perm is None:
                raise InputError(f"steps[{i}].perm missing but config.bn_groups is {cfg['bn_groups']}")
            perm = perm.reshape(-1).long()
            n = xk.shape[0]
            if perm.numel() != n or not torch.equal(torch.sort(perm).values, torch.arange(n)):
                raise InputError(f"steps[{i}].perm is not a permutation of 0..{n - 1}")
        out.append({"query": xq.float().contiguous(), "key": xk.float().contiguous(),
                    "perm": perm, "lr": as_float(get(s, "lr", f"steps[{i}]"), f"steps[{i}].lr")})
    return out


def to_dtype(ref, cfg, dtype):
    """Moves a reference built by build_from_init to `dtype` (its encoders,
    queue and a fresh optimiser of the moved parameters); float32 stays."""
    if dtype == torch.float32:
        return
    ref.encoder_q.to(dtype)
    ref.encoder_k.to(dtype)
    ref.queue = ref.queue.to(dtype)
    ref.optimizer = torch.optim.SGD(ref.encoder_q.parameters(), lr=0.0,
                                    momentum=cfg["sgd_momentum"],
                                    weight_decay=cfg["weight_decay"])


def run_reference(init, dtype=torch.float32):
    """Runs INIT's steps through MocoRef; returns a RESULT-shaped dict.

    dtype float64 is only a diagnostic (how well-conditioned the problem is)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ref, cfg = build_from_init(init)
    to_dtype(ref, cfg, dtype)
    losses = []
    for s in parse_steps(init, cfg):
        losses.append(ref.step(s["query"].to(dtype), s["key"].to(dtype), s["perm"],
                               cfg["bn_groups"], s["lr"]))
    return {
        "loss": losses,
        "encoder_q": {k: v.detach().clone() for k, v in ref.encoder_q.state_dict().items()},
        "encoder_k": {k: v.detach().clone() for k, v in ref.encoder_k.state_dict().items()},
        "queue": ref.queue.clone(),
        "queue_ptr": ref.queue_ptr,
    }


# ---------------------------------------------------------------- comparison

Row = collections.namedtuple("Row", "name max_abs rel ok note")


def compare_tensor(name, a, b, rtol):
    """a: value under test, b: reference. Returns a Row."""
    a = a if isinstance(a, torch.Tensor) else torch.tensor(a)
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b)
    if tuple(a.shape) != tuple(b.shape):
        return Row(name, float("inf"), float("inf"), False,
                   f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
    exact = not (a.is_floating_point() or b.is_floating_point())
    if a.numel() == 0:
        return Row(name, 0.0, 0.0, True, "empty")
    if exact:
        diff = (a.long() - b.long()).abs().max().item()
        ok = diff == 0
        return Row(name, float(diff), 0.0 if ok else float("inf"), ok,
                   "" if ok else f"integer mismatch: {a.reshape(-1)[:4].tolist()} vs reference {b.reshape(-1)[:4].tolist()}")
    a64, b64 = a.double(), b.double()
    if not torch.isfinite(a64).all():
        return Row(name, float("inf"), float("inf"), False, "non-finite values")
    max_abs = (a64 - b64).abs().max().item()
    rel = max_abs / max(b64.abs().max().item(), 1e-12)
    return Row(name, max_abs, rel, rel <= rtol, "")


def compare(result, reference, rtol=1e-4):
    """Compares a RESULT (under test) with a reference RESULT.

    Returns (ok, rows, problems): rows is a list of Row per tensor, problems
    a list of strings for structural mismatches (missing tensors etc.)."""
    rows, problems = [], []
    result = as_dict(result, "RESULT")

    try:
        got_loss = as_float_list(get(result, "loss", "RESULT"), "RESULT.loss")
    except InputError as e:
        problems.append(str(e))
        got_loss = None
    if got_loss is not None:
        if len(got_loss) != len(reference["loss"]):
            problems.append(f"loss: RESULT has {len(got_loss)} steps, reference {len(reference['loss'])}")
        else:
            for i, (a, b) in enumerate(zip(got_loss, reference["loss"])):
                rows.append(compare_tensor(f"loss[{i}]", torch.tensor(a, dtype=torch.float64),
                                           torch.tensor(b, dtype=torch.float64), rtol))

    for which in ("encoder_q", "encoder_k"):
        if which not in result:
            problems.append(f"RESULT: missing {which}")
            continue
        got = state_dict_of(result[which], f"RESULT.{which}")
        ref = reference[which]
        for k in ref:
            if k not in got:
                problems.append(f"{which}.{k}: missing in RESULT")
        for k in got:
            if k not in ref:
                problems.append(f"{which}.{k}: in RESULT but unknown to the reference")
        for k in ref:
            if k in got:
                rows.append(compare_tensor(f"{which}.{k}", got[k], ref[k], rtol))

    if "queue" in result:
        rows.append(compare_tensor("queue", result["queue"], reference["queue"], rtol))
    else:
        problems.append("RESULT: missing queue")
    if "queue_ptr" in result:
        try:
            p = as_int(result["queue_ptr"], "RESULT.queue_ptr")
            ok = p == reference["queue_ptr"]
            rows.append(Row("queue_ptr", float(abs(p - reference["queue_ptr"])), 0.0 if ok else float("inf"),
                            ok, "" if ok else f"{p} vs reference {reference['queue_ptr']}"))
        except InputError as e:
            problems.append(str(e))
    else:
        problems.append("RESULT: missing queue_ptr")

    ok = not problems and all(r.ok for r in rows)
    return ok, rows, problems


def format_report(ok, rows, problems, rtol, show=15):
    lines = []
    worst = sorted(rows, key=lambda r: (r.ok, -r.rel))
    lines.append(f"{'tensor':<48} {'max|a-b|':>12} {'rel':>12}  status")
    for r in worst[:show]:
        lines.append(f"{r.name:<48} {r.max_abs:>12.3e} {r.rel:>12.3e}  "
                     f"{'ok' if r.ok else 'MISMATCH'}{('  ' + r.note) if r.note else ''}")
    if len(rows) > show:
        lines.append(f"... {len(rows) - show} more tensors (better than the above)")
    for p in problems:
        lines.append("PROBLEM: " + p)
    bad = [r.name for r in rows if not r.ok]
    if ok:
        lines.append(f"OK: {len(rows)} tensors within rtol {rtol:g}")
    else:
        what = ", ".join(bad[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        lines.append(f"MISMATCH (rtol {rtol:g}): {len(bad)} tensor(s) differ"
                     + (f": {what}" if bad else "")
                     + (f"; {len(problems)} structural problem(s)" if problems else ""))
    return "\n".join(lines)


def conditioning_note(init, result, reference, rtol, ref64=None):
    """After a mismatch: how far is the float32 reference itself from float64?

    MoCo steps are not smooth (ReLU kinks, max-pool ties): one activation that
    rounds to the other side of 0 changes a gradient by percents, and SGD then
    carries that forward. If the float32 reference is itself far from a float64
    run, an rtol mismatch may be rounding, not a bug.

    Returns (text, result_matches_float64): the second is True when the float32
    reference is ill-conditioned (not within rtol/10 of float64) and RESULT is
    within rtol of the float64 run in every tensor. Then RESULT is the closer of
    the two to the exact step, and the float64 run decides. `ref64`: the
    float64 run when the caller has made it (crosscheck_dist.py's ranks)."""
    if ref64 is None:
        ref64 = run_reference(init, torch.float64)
    _, rows32, _ = compare(reference, ref64, rtol)
    w32 = max(rows32, key=lambda r: r.rel)
    ill_conditioned = w32.rel > rtol / 10
    matches64 = False
    try:
        ok_t, rows_t, problems_t = compare(result, ref64, rtol)
        wt = max(rows_t, key=lambda r: r.rel)
        tested = f"RESULT vs float64: worst {wt.name} rel {wt.rel:.2e}"
        matches64 = ill_conditioned and ok_t and not problems_t
    except Exception:  # noqa: BLE001
        tested = "RESULT vs float64: not comparable"
    lines = [f"conditioning: float32 reference vs float64: worst {w32.name} rel {w32.rel:.2e}; {tested}"]
    if matches64:
        lines.append(f"MATCH against float64: the float32 reference is ill-conditioned (itself "
                     f"{w32.rel:.2e} from a float64 run) and RESULT is within rtol {rtol:g} of the "
                     "float64 run in every tensor, so the float64 run decides.")
    elif ill_conditioned:
        lines.append("NOTE: this INIT is ill-conditioned in float32 (the reference itself is not within "
                     f"rtol/10 of a float64 run), so a mismatch at rtol {rtol:g} may be rounding amplified "
                     "by ReLU kinks / SGD, not a bug. Use fewer steps, a smaller lr, resnet18, small stem, "
                     "or non-zero BN biases; or compare against float64 with a looser rtol.")
    return "\n".join(lines), matches64


def crosscheck(init, result, rtol=1e-4, diagnose=True):
    """init/result: loaded dicts (or paths). Returns (ok, report_text)."""
    if isinstance(init, (str, os.PathLike)):
        init = torch.load(init)
    if isinstance(result, (str, os.PathLike)):
        result = torch.load(result)
    reference = run_reference(init)
    ok, rows, problems = compare(result, reference, rtol)
    text = format_report(ok, rows, problems, rtol)
    if not ok and diagnose and rows and not problems:
        note, ok = conditioning_note(init, result, reference, rtol)
        text += "\n" + note
    return ok, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("init")
    ap.add_argument("result")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--show", type=int, default=15, help="rows of the worst-differences table")
    ap.add_argument("--no-diagnose", action="store_true",
                    help="on mismatch, skip the float64 re-run that tells rounding from bugs")
    args = ap.parse_args(argv)
    try:
        init = torch.load(args.init)
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot load INIT {args.init}: {e}", file=sys.stderr)
        return 1
    try:
        result = torch.load(args.result)
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot load RESULT {args.result}: {e}", file=sys.stderr)
        return 1
    try:
        reference = run_reference(init)
        ok, rows, problems = compare(result, reference, args.rtol)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(ok, rows, problems, args.rtol, args.show))
    if not ok and rows and not problems and not args.no_diagnose:
        note, ok = conditioning_note(init, result, reference, args.rtol)
        print(note)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
