#!/usr/bin/env python3
"""Checks that bench/gpu_reference_bench.py's MoCo step is the official MoCo step.

bench/gpu_reference_bench.py re-implements the official MoCo v2 code
(builder.MoCo in a DistributedDataParallel, SGD, CrossEntropyLoss) as the
throughput baseline for the C++ trainer. This check runs that code on the CPU in
float64 with torchvision's resnet18 (dim 16, K 16, batch 8, 32x32 inputs, m 0.99,
so that the queue pointer wraps within the 3 steps) and compares it step by step:

1. one rank (gloo), DDP around the whole MoCo module and, separately, around the
   query encoder alone: against moco_ref.MocoRef started from the same weights and
   queue and given the same key permutation (one BN group): every loss, every
   parameter and buffer of both encoders, the queue and the pointer; and against
   the closed forms theta_k' = m theta_k + (1 - m) theta_q (with the query weights
   before the step), ptr' = (ptr + N) % K, queue columns outside [ptr, ptr + N)
   unchanged, the new columns unit-norm.
2. two ranks (gloo, two processes, 4 images each): against an expectation
   computed on each rank from the whole global batch: keys from moco_ref's
   split-BN key path with rank 0's permutation and 2 groups (rank r encodes
   slice r of the shuffled batch), each rank's loss from its own queries (BN over
   its own 4 images) and the queue before the step, the query update from SGD on
   the mean of the two ranks' losses (DDP's averaged gradient), the queue holding
   the global batch's keys in rank order; parameters of both encoders, the queue,
   the pointer and the loss on both ranks.

Tolerance: max|a - b| / max(max|b|, 1e-12) <= 1e-9 per tensor; integers exact.
Prints PASS or FAIL (with what differs); exit status 0 or 1.

usage: .venv/bin/python tests/reference/official_moco_check.py     (about 10-20 s)
"""

import copy
import multiprocessing
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import gpu_reference_bench as official  # noqa: E402
import moco_ref  # noqa: E402

DIM, K, M, T, LR = 16, 16, 0.99, 0.2, 0.1
BATCH, SIZE, STEPS = 8, 32, 3
RTOL = 1e-9


class Mismatch(Exception):
    pass


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def check_close(what, a, b, failures, rtol=RTOL):
    if a.shape != b.shape:
        failures.append(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    elif not a.is_floating_point():
        if not torch.equal(a, b):
            failures.append(f"{what}: {a.tolist()} != {b.tolist()}")
    else:
        err = rel_err(a, b)
        if not err <= rtol:
            failures.append(f"{what}: relative error {err:.3e} > {rtol:g}")


def unwrap(module):
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def parts(model):
    """(MoCo module, query encoder, key encoder) under any DDP wrapping."""
    moco = unwrap(model)
    return moco, unwrap(moco.encoder_q), moco.encoder_k


def peek_randperm(n):
    """The permutation the next torch.randperm(n) will draw, without drawing it."""
    state = torch.get_rng_state()
    perm = torch.randperm(n)
    torch.set_rng_state(state)
    return perm


def official_step(model, optimizer, criterion, im_q, im_k):
    """One iteration of main_moco.py's train loop."""
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def build(seed):
    torch.manual_seed(seed)
    return official.build_model("resnet18", DIM, K, M, T).double()


# ---------------------------------------------------------------- one rank

def check_one_rank(wrap, seed=1):
    failures = []
    moco = build(seed)
    ref = moco_ref.MocoRef(copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k),
                           dim=DIM, K=K, m=M, T=T, queue=moco.queue.clone(), queue_ptr=0, lr=LR)
    model = official.wrap_ddp(moco, torch.device("cpu"), wrap)
    optimizer = official.make_optimizer(model, LR)
    criterion = nn.CrossEntropyLoss()
    moco, enc_q, enc_k = parts(model)
    gen = torch.Generator().manual_seed(seed + 100)
    for step in range(STEPS):
        im_q = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
        im_k = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
        q_before = [p.detach().clone() for p in enc_q.parameters()]
        k_before = [p.detach().clone() for p in enc_k.parameters()]
        queue_before, ptr_before = moco.queue.clone(), int(moco.queue_ptr)
        perm = peek_randperm(BATCH)

        loss = official_step(model, optimizer, criterion, im_q, im_k)
        ref_loss = ref.step(im_q, im_k, perm=perm, groups=1, lr=LR)

        tag = f"[1 rank, ddp {wrap}] step {step}"
        check_close(f"{tag} loss", loss, torch.tensor(ref_loss, dtype=torch.float64), failures)
        for name_q, name_k, ref_sd, sd in (
                ("encoder_q", "encoder_q", ref.encoder_q.state_dict(), enc_q.state_dict()),
                ("encoder_k", "encoder_k", ref.encoder_k.state_dict(), enc_k.state_dict())):
            if sd.keys() != ref_sd.keys():
                failures.append(f"{tag} {name_q}: state_dict names differ")
                continue
            for name in sd:
                check_close(f"{tag} {name_k}.{name}", sd[name], ref_sd[name], failures)
        check_close(f"{tag} queue", moco.queue, ref.queue, failures)
        if int(moco.queue_ptr) != ref.queue_ptr:
            failures.append(f"{tag} queue_ptr {int(moco.queue_ptr)} != reference {ref.queue_ptr}")

        # Closed forms.
        for i, (pk, pk0, pq0) in enumerate(zip(enc_k.parameters(), k_before, q_before)):
            check_close(f"{tag} momentum update of key parameter {i}", pk,
                        M * pk0 + (1 - M) * pq0, failures)
        if int(moco.queue_ptr) != (ptr_before + BATCH) % K:
            failures.append(f"{tag} pointer {int(moco.queue_ptr)} != ({ptr_before} + {BATCH}) % {K}")
        new = torch.zeros(K, dtype=torch.bool)
        new[ptr_before:ptr_before + BATCH] = True
        if not torch.equal(moco.queue[:, ~new], queue_before[:, ~new]):
            failures.append(f"{tag} queue columns outside [{ptr_before}, {ptr_before + BATCH}) changed")
        norms = moco.queue[:, new].norm(dim=0)
        check_close(f"{tag} norms of the enqueued keys", norms, torch.ones_like(norms), failures)
    return failures


# ---------------------------------------------------------------- two ranks

def join_gloo(rank, world, port):
    """Makes this spawned process rank `rank` of a Gloo group on 127.0.0.1,
    with one intra-op thread."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _two_rank_worker(rank, world, port, seed, results):
    failures = []
    try:
        join_gloo(rank, world, port)
        moco = build(seed)  # same seed on every rank; DDP broadcasts rank 0's state anyway
        ref = moco_ref.MocoRef(copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k),
                               dim=DIM, K=K, m=M, T=T, queue=moco.queue.clone(), queue_ptr=0,
                               lr=LR)
        model = official.wrap_ddp(moco, torch.device("cpu"), "model")
        optimizer = official.make_optimizer(model, LR)
        criterion = nn.CrossEntropyLoss()
        moco, enc_q, enc_k = parts(model)
        torch.manual_seed(seed + 1000 * (rank + 1))  # ranks draw different permutations
        n = BATCH // world
        gen = torch.Generator().manual_seed(seed + 100)
        for step in range(STEPS):
            im_q_all = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
            im_k_all = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
            mine = slice(rank * n, (rank + 1) * n)
            perm = peek_randperm(BATCH)
            dist.broadcast(perm, src=0)  # the step must use rank 0's permutation

            loss = official_step(model, optimizer, criterion, im_q_all[mine], im_k_all[mine])

            # Expectation from the global batch.
            ref._momentum_update()
            k = ref._keys(im_k_all, perm, world)       # slice r of the shuffled batch per group
            queue_before = ref.queue.clone()
            losses = []
            for r in range(world):
                rs = slice(r * n, (r + 1) * n)
                q = F.normalize(ref.encoder_q(im_q_all[rs]), dim=1)
                logits = torch.cat([(q * k[rs]).sum(1, keepdim=True), q @ queue_before], 1) / T
                losses.append(F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)))
            ref.optimizer.zero_grad()
            (sum(losses) / world).backward()
            ref.optimizer.step()
            ref._enqueue(k)

            tag = f"[2 ranks, rank {rank}] step {step}"
            check_close(f"{tag} loss", loss, losses[rank].detach(), failures)
            for what, mine_enc, ref_enc in (("encoder_q", enc_q, ref.encoder_q),
                                            ("encoder_k", enc_k, ref.encoder_k)):
                for (name, p), (_, p_ref) in zip(mine_enc.named_parameters(),
                                                 ref_enc.named_parameters()):
                    check_close(f"{tag} {what}.{name}", p, p_ref, failures)
            check_close(f"{tag} queue", moco.queue, ref.queue, failures)
            if int(moco.queue_ptr) != ref.queue_ptr:
                failures.append(f"{tag} queue_ptr {int(moco.queue_ptr)} != {ref.queue_ptr}")
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported as a failure of this rank
        failures.append(f"[2 ranks, rank {rank}] raised:\n{traceback.format_exc()}")
    results.put((rank, failures))


def run_ranks(target, args, world, timeout):
    """Runs target(rank, *args, results) in `world` spawned processes, each of
    which puts (rank, [failure, ...]) on `results`; returns all failures, and
    one for every rank that reported nothing within `timeout` seconds."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    failures, seen = [], set()
    for _ in range(world):
        try:
            rank, fails = results.get(timeout=timeout)
        except Exception:  # noqa: BLE001
            failures.append(f"[{world} ranks] no result within {timeout} s")
            break
        seen.add(rank)
        failures += fails
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
            p.join()
    if len(seen) != world:
        failures.append(f"[{world} ranks] results from ranks {sorted(seen)} only; exit codes "
                        f"{[p.exitcode for p in procs]}")
    return failures


def report(failures):
    """Prints the first 40 failures and PASS or FAIL; the exit status."""
    for f in failures[:40]:
        print("  " + f)
    if len(failures) > 40:
        print(f"  ... and {len(failures) - 40} more")
    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


def check_two_ranks(seed=2):
    world = 2
    return run_ranks(_two_rank_worker, (world, official.free_port(), seed), world, 300)


def main():
    official.require_torchvision()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    failures = []
    official.init_single_process_group("cpu")
    try:
        for wrap in ("model", "query"):
            fails = check_one_rank(wrap)
            print(f"one rank, DDP around the {'whole MoCo module' if wrap == 'model' else 'query encoder'}: "
                  f"{'ok' if not fails else f'{len(fails)} mismatches'}")
            failures += fails
    finally:
        dist.destroy_process_group()
    fails = check_two_ranks()
    print(f"two ranks (gloo): {'ok' if not fails else f'{len(fails)} mismatches'}")
    failures += fails
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
