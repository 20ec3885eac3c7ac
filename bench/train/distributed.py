"""Data-parallel training across processes launched by ``torchrun`` (torch.distributed).

Every process ("rank") holds the same SAE. Each global batch (the spec's
``budget.batch_size``, the same tokens in the same order as a one-process run) is cut
into equal shards, one per rank; each rank computes the loss of its shard, gradients
are averaged across ranks before the method's ``before_optimizer_step`` hook, and
every rank takes the same optimiser step. Losses are per-token means, so with equal
shards the average of the shard gradients IS the gradient of the global batch: the
result equals a one-process run up to float rounding.

A few methods look across the tokens of a batch (BatchTopK's batch-wide top k*B,
AuxK's batch variance, dead-latent counters). They call the ``*_across`` helpers
below, which combine the shards so those quantities are the global batch's too. The
helpers are the identity outside a sharded training loop (one process, or rank 0
scoring on its own), so a baseline never needs to know whether it is distributed.

In stream mode (``budget.source: stream``) the subject model's forward is split as well:
each rank runs the model over its share of every shuffle block and the ranks exchange
the shares (``share_rows``), so every rank holds the block a one-process run reads
(bench/train/batch_stream.py says why this design).

Only rank 0 writes (records, SAEs, checkpoints, run.json) and scores; the others
wait for it. NCCL carries the tensors when the device is a GPU, gloo otherwise;
waits and small Python objects always go over a gloo group, so a rank waiting for
rank 0's harvest or scoring does not hold a GPU kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dictbench.errors import UserError

# Rank 0 harvests and scores alone while the others wait: that can take hours on a
# large run, far past torch's 30-minute default. A dead rank is noticed by torchrun.
DEFAULT_TIMEOUT_MIN = 24 * 60
TIMEOUT_ENV = "DICTBENCH_DIST_TIMEOUT_MIN"

# A baseline whose loss was checked to be a per-token mean, or made exact across shards
# with the helpers below, declares ``data_parallel_exact = True`` in its own class body
# (not inherited: a subclass that changes the loss must check it again).


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int
    backend: str
    cpu_group: Any  # gloo: barriers and Python objects

    @property
    def main(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None
_SHARDED = False  # inside a sharded training loop: the *_across helpers combine ranks


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> Group | None:
    """Join the process group torchrun describes in the environment; None for one process.

    ``device`` is the spec's model device ("auto", "cpu", "cuda", ...): a GPU run uses
    NCCL and pins each process to the GPU of its local rank."""
    global _GROUP
    if not launched():
        return None
    if _GROUP is not None:
        return _GROUP
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and device != "cuda" and device != "auto":
        # "cuda:1" would put every process on one GPU, and NCCL refuses duplicate GPUs.
        raise UserError(
            f"torchrun: model.device {device!r} names one GPU for every process; use "
            "'cuda' or 'auto' (each process takes the GPU of its LOCAL_RANK; choose GPUs "
            "with CUDA_VISIBLE_DEVICES)"
        )
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise UserError(
                f"torchrun: local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                "visible); use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's own GPU
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN)))
    dist.init_process_group(backend, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), local_rank, backend, cpu_group)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    if _GROUP is not None and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def group() -> Group | None:
    return _GROUP


def world() -> int:
    return _GROUP.world if _GROUP is not None else 1


def rank() -> int:
    return _GROUP.rank if _GROUP is not None else 0


def is_main() -> bool:
    return _GROUP is None or _GROUP.main


def barrier() -> None:
    if _GROUP is not None:
        dist.barrier(group=_GROUP.cpu_group)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled in memory between our own processes)."""
    if _GROUP is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_GROUP.cpu_group)
    return box[0]


# --- checks before anything runs ------------------------------------------------------


def class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def refuse_unsupported(planned: list[Any], batch_size: int, seqs_per_step: int) -> None:
    """One-line errors for what a data-parallel run cannot do exactly.

    ``planned``: the run's PlannedSAE list; ``seqs_per_step``: whole windows per step of
    the sequence-batch (e2e) methods."""
    n = world()
    if n == 1:
        return
    if batch_size % n:
        raise UserError(
            f"budget.batch_size {batch_size} does not divide into {n} equal shards; "
            f"use a multiple of {n} (the world size)"
        )
    for p in planned:
        cls = p.cls
        if not vars(cls).get("data_parallel_exact"):
            raise UserError(
                f"baseline '{p.method}' ({class_ref(cls)}) is not known to train exactly "
                "when its batch is split across processes; run it in one process, or set "
                "data_parallel_exact = True on the class once its loss is a mean over tokens"
            )
        if getattr(cls, "needs_downstream", False) and seqs_per_step % n:
            raise UserError(
                f"baseline '{p.method}' trains on {seqs_per_step} whole windows per step, "
                f"which do not divide into {n} equal shards; choose budget.batch_size so "
                f"that batch_size // kept-positions-per-window is a multiple of {n}"
            )


# --- the sharded training loop ------------------------------------------------------------


def shard(n_items: int) -> tuple[int, int]:
    """(start, stop) of this rank's slice of a global batch of ``n_items``."""
    per = n_items // world()
    return rank() * per, (rank() + 1) * per


@contextlib.contextmanager
def sharded() -> Iterator[None]:
    """Marks a training loop whose batches are split across ranks: only inside it do the
    ``*_across`` helpers communicate (rank 0 scoring alone must never wait on others)."""
    global _SHARDED
    before = _SHARDED
    _SHARDED = _GROUP is not None
    try:
        yield
    finally:
        _SHARDED = before


def _active() -> bool:
    return _SHARDED and _GROUP is not None


def _reduced(t: torch.Tensor, op: Any) -> torch.Tensor:
    """``op`` over ranks of ``t`` (a new tensor; ``t`` itself outside sharded training)."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def sum_across(t: torch.Tensor) -> torch.Tensor:
    return _reduced(t, dist.ReduceOp.SUM)


def any_across(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR over ranks of a bool tensor."""
    if not _active():
        return mask
    return sum_across(mask.to(torch.int32)) > 0


def min_across(t: torch.Tensor) -> torch.Tensor:
    return _reduced(t, dist.ReduceOp.MIN)


def gather_across(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on all) concatenated along dim 0, in rank order."""
    if not _active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def rows_across(n_rows: int) -> int:
    """The number of rows in the global batch when this rank holds ``n_rows``."""
    return n_rows * world() if _active() else n_rows


def mean_rows_across(x: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of the global batch (no graph), from equal shards ``x``."""
    if not _active():
        return x.mean(0)
    return sum_across(x.sum(0)) / rows_across(x.shape[0])


def average_grads(params: list[torch.Tensor], flags: torch.Tensor) -> torch.Tensor:
    """Average every parameter's gradient over ranks in one all-reduce, and sum ``flags``
    (a small float tensor of per-rank counts) in the same message.

    A gradient that is None on every rank stays None (Adam must not see a zero gradient
    where a one-process run would see none); None on some ranks only counts as zero."""
    assert _GROUP is not None
    sizes = [p.numel() for p in params]
    grads_end = sum(sizes)
    dev = flags.device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p in params
    ]
    buf = torch.cat(pieces + [has, flags.to(dev, torch.float32)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    seen = buf[grads_end : grads_end + len(params)].tolist()
    offset = 0
    for p, size, count in zip(params, sizes, seen, strict=True):
        if count == 0:
            p.grad = None
        else:
            g = buf[offset : offset + size].view_as(p).div(world()).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        offset += size
    return buf[grads_end + len(params) :]


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering range(n), in order, whose sizes
    differ by at most one: rank q's share of n units of work."""
    return [(n * q // parts, n * (q + 1) // parts) for q in range(parts)]


def share_rows(t: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
    """Complete ``t`` on every rank from the rows each rank filled: rank q holds rows
    ``bounds[q]`` (dim 0) and sends them to the others, one broadcast per rank over the
    gloo group (``t`` is in host memory whatever the backend). The broadcasts write into
    ``t`` itself, so nothing beyond it is allocated. Every rank must call this with the
    same bounds at the same point of its run, like any collective."""
    assert _GROUP is not None and len(bounds) == _GROUP.world
    for q, (a, b) in enumerate(bounds):
        if b > a:
            dist.broadcast(t[a:b], src=q, group=_GROUP.cpu_group)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does at the start)."""
    if _GROUP is None:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def weights_digest(module: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of the weights (sum and sum of squares of every tensor)."""
    vals = []
    for t in list(module.parameters()) + list(module.buffers()):
        d = t.detach().double()
        vals += [d.sum(), d.pow(2).sum()]
    return torch.stack(vals) if vals else torch.zeros(1, dtype=torch.float64)


def same_on_all_ranks(module: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical weights (compared by fingerprint)."""
    if _GROUP is None:
        return True
    mine = weights_digest(module)
    everyone = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(everyone, mine)
    return all(bool(torch.equal(e, everyone[0])) for e in everyone)
