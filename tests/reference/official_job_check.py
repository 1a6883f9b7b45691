#!/usr/bin/env python3
"""Checks that bench/official_job.py trains the official MoCo step on OUR model.

bench/official_job.py is the whole-job baseline momentum-worker is compared
with (bench/job_bench.sh). This check runs its pieces, as its ranks run them,
on two Gloo processes of one thread each, in float64, and compares them with
independent computations:

1. the model: official_job.build_moco(spec)'s query encoder has the parameter
   and buffer names and shapes of moco_ref.build_encoder(..., mlp=True), the
   encoder momentum-worker trains (tests/reference/moco_ref.py);
2. three steps of official_job.train_step in DistributedDataParallel, 4 images
   per rank (width 4, 16x16, 1 channel, small stem, dim 16, K 16 so the queue
   wraps), against an expectation computed on each rank from the whole global
   batch with moco_ref.MocoRef: keys from its split-BN key path with rank 0's
   permutation and one group per rank, each rank's loss from its own queries,
   the query update from SGD on the mean of the two losses (DDP's averaged
   gradient) at the learning rate official_job.learning_rate gives, the queue
   holding the global batch's keys in rank order; every loss, parameter of
   both encoders, the queue and its pointer, on both ranks;
3. official_job.learning_rate against closed forms of worker/optim.cc's
   schedule (cosine with a linear warm-up, the step schedule, the time bound);
4. official_job.knn_top1 (sharded over the two ranks, rank 0's BN buffers)
   against a direct one-process kNN (k 5, weights exp(sim / 0.1)) on random
   images.

Tolerance: max|a - b| / max(max|b|, 1e-12) <= 1e-10 per tensor; integers exact.
Prints PASS or FAIL (with what differs); exit status 0 or 1. About 10 s.

usage: .venv/bin/python tests/reference/official_job_check.py
"""

import copy
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import moco_ref  # noqa: E402
import official_job  # noqa: E402
import official_moco  # noqa: E402
import official_moco_check  # noqa: E402
from official_moco_check import join_gloo, peek_randperm, report, run_ranks  # noqa: E402

RTOL = 1e-10
WORLD, BATCH, SIZE, STEPS = 2, 8, 16, 3
OVERRIDES = [
    "model={arch: resnet18, width: 4, in_channels: 1, small_stem: true}",
    "moco={dim: 16, queue_size: 16, momentum: 0.99, temperature: 0.2}",
    "optim={batch_size: 8, lr: 0.5, momentum: 0.9, weight_decay: 0.01, schedule: cosine,"
    " warmup: 0.4, epochs: 0, steps: 5, time_budget_s: 0}",
    "eval={knn_k: 5, knn_temperature: 0.1, batch_size: 7}",
    "data.image_size=16",
]


def check_close(what, a, b, failures):
    official_moco_check.check_close(what, a, b, failures, rtol=RTOL)


def spec():
    return official_job.load_spec(None, OVERRIDES)


# ---------------------------------------------------------------- one process

def check_model(s):
    failures = []
    torch.manual_seed(0)
    moco = official_job.build_moco(s)
    m = s["model"]
    ours = moco_ref.build_encoder(m["arch"], m["width"], m["in_channels"], m["small_stem"],
                                  dim=s["moco"]["dim"], mlp=True)
    got = {k: tuple(v.shape) for k, v in moco.encoder_q.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if got != want:
        failures.append(f"[model] query encoder differs from moco_ref's: "
                        f"{sorted(set(got.items()) ^ set(want.items()))[:6]}")
    return failures


def check_schedule():
    failures = []
    optim = {"lr": 0.12, "batch_size": 512, "schedule": "cosine", "warmup": 0.1,
             "milestones": [0.6, 0.8], "gamma": 0.1, "epochs": 0, "steps": 100,
             "time_budget_s": 0.0}
    base = 0.12 * 512 / 256
    cases = [(0, base * 0.5 * (1 + math.cos(0)) * (1 / 100) / 0.1),
             (9, base * 0.5 * (1 + math.cos(math.pi * 0.09)) * 1.0),
             (50, base * 0.5 * (1 + math.cos(math.pi * 0.5)))]
    for step, want in cases:
        got = official_job.learning_rate(optim, step, 10, 0.0, 0.0)
        if abs(got - want) > 1e-12 * base:
            failures.append(f"[schedule] cosine step {step}: {got} != {want}")
    step_optim = dict(optim, schedule="step", warmup=0.0)
    for step, want in ((59, base), (60, base * 0.1), (85, base * 0.01)):
        got = official_job.learning_rate(step_optim, step, 10, 0.0, 0.0)
        if abs(got - want) > 1e-12 * base:
            failures.append(f"[schedule] step schedule step {step}: {got} != {want}")
    # A time bound: progress is train_seconds / budget; the warm-up ends a step later.
    timed = dict(optim, steps=0, time_budget_s=200.0, warmup=0.02)
    got = official_job.learning_rate(timed, 3, 10, 1.0, 0.5)
    want = base * 0.5 * (1 + math.cos(math.pi * 1.0 / 200)) * (1.5 / 200) / 0.02
    if abs(got - want) > 1e-12 * base:
        failures.append(f"[schedule] time bound: {got} != {want}")
    return failures


def direct_knn(encoder, train, test, s):
    """kNN top-1 on one process, written out plainly."""
    a = s["data"]["augment"]
    mean, std = a["mean"] or [official_job.FMNIST_MEAN], a["std"] or [official_job.FMNIST_STD]
    encoder.eval()
    with torch.no_grad():
        def feats(images):
            x = (torch.tensor(images, dtype=torch.float64).unsqueeze(1) / 255 - mean[0]) / std[0]
            return F.normalize(encoder.features(x), dim=1)
        bank, queries = feats(train[0]), feats(test[0])
        correct = 0
        for i in range(queries.shape[0]):
            sim = bank @ queries[i]
            top = sim.topk(s["eval"]["knn_k"])
            score = torch.zeros(10, dtype=torch.float64)
            for value, j in zip(top.values, top.indices):
                score[int(train[1][j])] += math.exp(value.item() / s["eval"]["knn_temperature"])
            correct += int(score.argmax()) == int(test[1][i])
    encoder.train()
    return correct / queries.shape[0]


# ---------------------------------------------------------------- two ranks

def _rank(rank, port, results):
    failures = []
    try:
        join_gloo(rank, WORLD, port)
        s = spec()
        optim = s["optim"]
        torch.manual_seed(3)
        moco = official_job.build_moco(s).double()
        ref = moco_ref.MocoRef(copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k),
                               dim=16, K=16, m=0.99, T=0.2, sgd_momentum=optim["momentum"],
                               weight_decay=optim["weight_decay"], queue=moco.queue.clone())
        model = nn.parallel.DistributedDataParallel(moco)
        optimizer = official_moco.make_optimizer(model, optim["lr"], optim["momentum"],
                                                 optim["weight_decay"])
        criterion = nn.CrossEntropyLoss()
        torch.manual_seed(1000 * (rank + 1))  # ranks draw different permutations
        n = BATCH // WORLD
        mine = slice(rank * n, (rank + 1) * n)
        gen = torch.Generator().manual_seed(7)
        for step in range(STEPS):
            im_q_all = torch.randn(BATCH, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
            im_k_all = torch.randn(BATCH, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
            perm = peek_randperm(BATCH)
            dist.broadcast(perm, src=0)  # the step uses rank 0's permutation
            lr = official_job.learning_rate(optim, step, 100, 0.0, 0.0)
            loss, phases = official_job.train_step(model, criterion, optimizer,
                                                   im_q_all[mine], im_k_all[mine], lr)

            ref._momentum_update()
            k = ref._keys(im_k_all, perm, WORLD)
            queue_before = ref.queue.clone()
            losses = []
            for r in range(WORLD):
                rs = slice(r * n, (r + 1) * n)
                q = F.normalize(ref.encoder_q(im_q_all[rs]), dim=1)
                logits = torch.cat([(q * k[rs]).sum(1, keepdim=True), q @ queue_before], 1) / 0.2
                losses.append(F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)))
            for g in ref.optimizer.param_groups:
                g["lr"] = lr
            ref.optimizer.zero_grad()
            (sum(losses) / WORLD).backward()
            ref.optimizer.step()
            ref._enqueue(k)

            tag = f"[2 ranks, rank {rank}] step {step}"
            if set(phases) != {"forward", "communication", "backward", "optimizer", "other"}:
                failures.append(f"{tag} phases {sorted(phases)}")
            check_close(f"{tag} loss", loss, losses[rank].detach(), failures)
            for what, enc, ref_enc in (("encoder_q", moco.encoder_q, ref.encoder_q),
                                       ("encoder_k", moco.encoder_k, ref.encoder_k)):
                for (name, p), (_, p_ref) in zip(enc.named_parameters(),
                                                 ref_enc.named_parameters()):
                    check_close(f"{tag} {what}.{name}", p, p_ref, failures)
            check_close(f"{tag} queue", moco.queue, ref.queue, failures)
            if int(moco.queue_ptr) != ref.queue_ptr:
                failures.append(f"{tag} queue_ptr {int(moco.queue_ptr)} != {ref.queue_ptr}")

        # kNN: sharded over the ranks against one process, rank 0's BN buffers.
        rng = np.random.default_rng(5)
        train = (rng.integers(0, 256, (23, SIZE, SIZE), dtype=np.uint8),
                 rng.integers(0, 10, 23).astype(np.int64))
        test = (rng.integers(0, 256, (11, SIZE, SIZE), dtype=np.uint8),
                rng.integers(0, 10, 11).astype(np.int64))
        got = official_job.knn_top1(moco, train, test, s)
        want = direct_knn(copy.deepcopy(moco.encoder_q), train, test, s)  # buffers now rank 0's
        if abs(got - want) > 1e-12:
            failures.append(f"[2 ranks, rank {rank}] kNN top-1 {got} != direct {want}")
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported as a failure of this rank
        failures.append(f"[2 ranks, rank {rank}] raised:\n{traceback.format_exc()}")
    results.put((rank, failures))


def check_two_ranks():
    return run_ranks(_rank, (official_moco.free_port(),), WORLD, 120)


def main():
    official_moco.require_torchvision("official_job_check")
    torch.set_num_threads(1)
    failures = []
    for name, fails in (("model", check_model(spec())), ("schedule", check_schedule()),
                        ("two ranks (gloo): steps and kNN", check_two_ranks())):
        print(f"{name}: {'ok' if not fails else f'{len(fails)} mismatches'}")
        failures += fails
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
