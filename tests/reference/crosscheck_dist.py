#!/usr/bin/env python3
"""Cross-check MoCo on N C++ ranks against N torch.distributed ranks.

usage: crosscheck_dist.py INIT RESULT [--rtol 1e-4]

INIT is crosscheck.py's format with config.world_size = N; its steps hold the
whole group's batches (rank r owns rows [r*B, (r+1)*B)) and, with shuffled
BatchNorm (config.bn_groups = N), one permutation of the group's batch.
RESULT = {"ranks": [RESULT of crosscheck.py, one per rank]}.

The reference runs N processes in a Gloo group (torch 2.11.0 of the
project's virtual environment) and follows the official MoCo code's
distributed step: the query encoder wrapped in DistributedDataParallel (gradients averaged by PyTorch; each rank keeps its own
BatchNorm statistics, broadcast_buffers=False), the key images gathered from
all ranks, shuffled with the permutation broadcast from rank 0, encoded in
slices, gathered and un-shuffled, and the group's keys enqueued on every rank.
Every rank's losses, both encoders, queue and pointer are compared with the
C++ rank of the same number. Exit 0 when all agree within rtol, or, as in
crosscheck.py, when the float32 reference is itself ill-conditioned (not
within rtol/10 of the same group run in float64: a ReLU kink crossed) and
every rank is within rtol of the float64 group.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crosscheck  # noqa: E402


def gather(t):
    """All ranks' tensors concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


class DistMocoRef:
    """One rank of the reference: crosscheck's MocoRef plus torch.distributed."""

    def __init__(self, ref, shuffle):
        self.ref = ref
        self.shuffle = shuffle
        self.rank = dist.get_rank()
        self.ddp = DistributedDataParallel(ref.encoder_q, broadcast_buffers=False)

    @torch.no_grad()
    def keys(self, x_k, perm):
        """This rank's keys and the group's keys, both normalised."""
        n = x_k.shape[0]
        mine = slice(self.rank * n, (self.rank + 1) * n)
        if not self.shuffle:
            k = F.normalize(self.ref.encoder_k(x_k), dim=1)
            return k, gather(k)
        perm = perm.clone() if self.rank == 0 else torch.empty_like(perm)
        dist.broadcast(perm, src=0)
        x_shuffled = gather(x_k)[perm]
        k_shuffled = gather(self.ref.encoder_k(x_shuffled[mine]))
        all_k = F.normalize(k_shuffled[torch.argsort(perm)], dim=1)
        return all_k[mine], all_k

    def step(self, x_q, x_k, perm, lr):
        ref = self.ref
        ref._momentum_update()
        q = F.normalize(self.ddp(x_q), dim=1)
        k, all_k = self.keys(x_k, perm)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = torch.mm(q, ref.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / ref.T
        loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
        for g in ref.optimizer.param_groups:
            g["lr"] = float(lr)
        ref.optimizer.zero_grad()
        loss.backward()
        ref.optimizer.step()
        ref._enqueue(all_k)
        return float(loss.item())


def run_rank(rank, world, init_path, store_path, out_dir, dtype=torch.float32):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"file://{store_path}",
                            rank=rank, world_size=world)
    try:
        init = torch.load(init_path)
        ref, cfg = crosscheck.build_from_init(init)
        crosscheck.to_dtype(ref, cfg, dtype)  # before DDP wraps the encoder
        model = DistMocoRef(ref, shuffle=cfg["bn_groups"] > 0)
        losses = []
        for s in crosscheck.parse_steps(init, cfg):
            n = s["query"].shape[0] // world
            mine = slice(rank * n, (rank + 1) * n)
            losses.append(model.step(s["query"][mine].to(dtype), s["key"][mine].to(dtype),
                                     s["perm"], s["lr"]))
        torch.save({
            "loss": losses,
            "encoder_q": {k: v.detach().clone() for k, v in ref.encoder_q.state_dict().items()},
            "encoder_k": {k: v.detach().clone() for k, v in ref.encoder_k.state_dict().items()},
            "queue": ref.queue.clone(),
            "queue_ptr": ref.queue_ptr,
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("init")
    ap.add_argument("result")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--no-diagnose", action="store_true",
                    help="on mismatch, skip the float64 group that tells rounding from bugs")
    args = ap.parse_args(argv)
    try:
        init = torch.load(args.init)
        result = torch.load(args.result)
        cfg = crosscheck.as_dict(crosscheck.get(init, "config", "INIT"), "INIT.config")
        world = crosscheck.as_int(crosscheck.get(cfg, "world_size", "INIT.config"),
                                  "config.world_size")
        ranks = crosscheck.get(crosscheck.as_dict(result, "RESULT"), "ranks", "RESULT")
        if len(ranks) != world:
            raise crosscheck.InputError(f"RESULT.ranks: {len(ranks)} entries, "
                                        f"config.world_size is {world}")
    except (crosscheck.InputError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    reference = run_group(world, args.init, torch.float32)
    all_ok, comparable = True, True
    for r in range(world):
        ok, rows, problems = crosscheck.compare(ranks[r], reference[r], args.rtol)
        print(f"== rank {r} of {world}")
        print(crosscheck.format_report(ok, rows, problems, args.rtol, show=5))
        all_ok = all_ok and ok
        comparable = comparable and bool(rows) and not problems
    if all_ok or not comparable or args.no_diagnose:
        return 0 if all_ok else 1
    # A mismatch: the float64 group decides where the float32 one is
    # ill-conditioned, on every rank alike.
    reference64 = run_group(world, args.init, torch.float64)
    all_ok = True
    for r in range(world):
        note, ok = crosscheck.conditioning_note(init, ranks[r], reference[r], args.rtol,
                                                ref64=reference64[r])
        print(f"== rank {r} of {world}, against the float64 group\n{note}")
        all_ok = all_ok and ok
    return 0 if all_ok else 1


def run_group(world, init_path, dtype):
    """The reference group's RESULT per rank, run in `dtype`."""
    with tempfile.TemporaryDirectory(prefix="crosscheck-dist-") as tmp:
        mp.spawn(run_rank, args=(world, init_path, os.path.join(tmp, "store"), tmp, dtype),
                 nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


if __name__ == "__main__":
    sys.exit(main())
