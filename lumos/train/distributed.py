"""Data-parallel training for :func:`lumos.fit`: process group, sharding and collectives.

``fit(..., distributed=True)`` under ``torchrun`` (or with a process group already initialised)
trains one replica per process with DDP. What stays equal across ranks, and why:

- the weights: DDP broadcasts rank 0's at the start and averages every gradient;
- the gate masks: a pure function of (seed, step, gate offset) from lumos' own sampler, whose
  state is broadcast from rank 0 at the start; torch's RNG is not involved;
- lam: the budget controller reads only the gates (equal) and the averaged gradients; fit checks
  at every epoch end that lam and a checksum of the weights agree on every rank;
- buffers (BatchNorm statistics): broadcast from rank 0 at the end of every epoch, so that the
  models evaluated, saved and compacted are the same on every rank.

The batch is global: each of N processes computes ``batch_size / N`` rows of the same batch a
single process would take, in the same order (:func:`shard_positions`, DistributedSampler's
rule), so the steps per epoch, the budget schedule and the learning dynamics do not change
with N (the results agree up to the order of floating-point sums).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: ``rank`` of ``world`` processes, the
    device its replica lives on, and the device its collectives run on (CUDA for NCCL)."""

    rank: int
    world: int
    device: torch.device
    comm_device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names rank and world)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_process_group(who: str = "lumos") -> Ranks:
    """Initialise the default process group from torchrun's environment if none is: NCCL when
    CUDA is available (device ``cuda:LOCAL_RANK``), gloo on CPU. Returns this process's ranks."""
    if not dist.is_available():
        raise RuntimeError(f"{who}: this torch build has no torch.distributed")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise RuntimeError(f"{who}: distributed training needs a process group: launch with "
                               "`torchrun --nproc-per-node N script.py` (or `lumos run WORKLOAD --nproc N`), "
                               "or call torch.distributed.init_process_group first")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    return _ranks(None)


def distributed_run(who: str = "lumos") -> Ranks | None:
    """This process's :class:`Ranks` when ``torchrun`` started more than one process (the
    process group initialised on first call), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _ranks(None)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    return init_process_group(who)


def _ranks(model_device: torch.device | None) -> Ranks:
    backend = dist.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    device = model_device if model_device is not None else comm
    return Ranks(dist.get_rank(), dist.get_world_size(), device, comm)


def ranks_for_fit(distributed: bool | None, model_device: torch.device, who: str) -> Ranks | None:
    """The :class:`Ranks` of a ``fit`` call, or None for a one-process run.

    ``distributed=None``: data-parallel when a process group of more than one process is
    initialised, or when torchrun started more than one process (then the group is initialised
    here). True: the same, and an error if there is neither. False: never.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"{who}: `distributed` must be True, False or None (detect), got {distributed!r}")
    if distributed is False or not dist.is_available():
        if distributed:
            raise RuntimeError(f"{who}: this torch build has no torch.distributed")
        return None
    if distributed is None and not dist.is_initialized() \
            and not (launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1):
        return None
    init_process_group(who)
    if dist.get_world_size() == 1:
        return None
    ranks = _ranks(model_device)
    if dist.get_backend() == "nccl" and model_device.type != "cuda":
        raise ValueError(f"{who}: the process group uses NCCL but the model is on {model_device}; move it to "
                         f"cuda:{torch.cuda.current_device()} (torchrun's LOCAL_RANK) before fit")
    return ranks


def wrap_ddp(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` in DistributedDataParallel on its device."""
    device_ids = [ranks.device] if ranks.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


# -- collectives ---------------------------------------------------------------------------------

def all_reduce(tensor: torch.Tensor, ranks: Ranks, op=None) -> torch.Tensor:
    """``tensor`` reduced over ranks (sum by default), on ``tensor``'s device."""
    moved = tensor.to(ranks.comm_device).clone()
    dist.all_reduce(moved, op=op if op is not None else dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def broadcast_object(obj, ranks: Ranks):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ranks.comm_device if ranks.comm_device.type == "cuda" else None)
    return box[0]


def gather_objects(obj, ranks: Ranks) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    boxes = [None] * ranks.world
    dist.all_gather_object(boxes, obj)
    return boxes


def barrier(ranks: Ranks) -> None:
    if ranks.comm_device.type == "cuda":
        dist.barrier(device_ids=[ranks.comm_device.index])
    else:
        dist.barrier()


def broadcast_buffers(model: nn.Module, ranks: Ranks) -> None:
    """Rank 0's buffers (BatchNorm statistics...) on every rank: after an epoch each rank's
    buffers saw only its own shard."""
    for buffer in model.buffers():
        moved = buffer.to(ranks.comm_device)
        dist.broadcast(moved, src=0)
        if moved is not buffer:
            buffer.copy_(moved)


@torch.no_grad()
def check_ranks_agree(model: nn.Module, lam: float | None, ranks: Ranks, who: str) -> None:
    """Raise on every rank if lam or the weights (a float64 checksum) differ between ranks."""
    checksum = sum((p.detach().double().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64,
                                                                                          device=ranks.device))
    values = torch.stack([checksum, torch.tensor(lam if lam is not None else 0.0, dtype=torch.float64,
                                                 device=ranks.device)])
    high = all_reduce(values, ranks, dist.ReduceOp.MAX)
    low = -all_reduce(-values, ranks, dist.ReduceOp.MAX)
    if not torch.equal(high, low):
        what = "the weights" if high[0] != low[0] else "lam"
        raise RuntimeError(f"{who}: the data-parallel replicas diverged: {what} differ between ranks "
                           f"(from {float(low[int(what == 'lam')]):.17g} to {float(high[int(what == 'lam')]):.17g}). "
                           "A rank changed its model outside fit, or ran a non-deterministic reduction")


def check_same_model(model: nn.Module, ranks: Ranks, who: str) -> None:
    """Raise on every rank unless every rank holds the same state_dict, value for value (the
    entries in float64, their elementwise maximum and minimum over the ranks compared)."""
    values = [t.detach().reshape(-1).double() for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    if not values:
        return
    flat = torch.cat(values).to(ranks.device)
    high = all_reduce(flat, ranks, dist.ReduceOp.MAX)
    low = -all_reduce(-flat, ranks, dist.ReduceOp.MAX)
    if not torch.equal(high, low):
        raise RuntimeError(f"{who}: the model differs between ranks ({int((high != low).sum())} of "
                           f"{flat.numel()} values); the data-parallel replicas diverged")


# -- data ----------------------------------------------------------------------------------------

def shard_positions(total: int, ranks: Ranks) -> torch.Tensor:
    """Positions ``0..total-1`` of an epoch's order that this rank takes: DistributedSampler's
    rule (padded by wrapping around to a multiple of ``world``, then every ``world``-th from
    ``rank``), so that every rank takes as many rows and the k-th rows of all ranks together
    are k-th block of the order."""
    sampler = DistributedSampler(range(total), num_replicas=ranks.world, rank=ranks.rank, shuffle=False)
    return torch.tensor(list(sampler), dtype=torch.long)


def per_rank_batch(batch_size: int, ranks: Ranks, who: str, name: str = "batch_size") -> int:
    """``batch_size`` (the global batch) split over the ranks; it must divide evenly."""
    if batch_size % ranks.world:
        raise ValueError(f"{who}: `{name}`={batch_size} is the global batch, split over {ranks.world} processes; "
                         f"it must be a multiple of {ranks.world} (e.g. {batch_size - batch_size % ranks.world or ranks.world})")
    return batch_size // ranks.world


def shard_loader(loader, ranks: Ranks, seed: int, who: str) -> DataLoader:
    """A DataLoader like ``loader`` that reads this rank's share of every batch through a
    DistributedSampler (shuffled if ``loader`` was, from ``seed`` and the epoch); one already
    sharded by a DistributedSampler is kept."""
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or loader.batch_size is None or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(f"{who}: distributed training shards `train` over the processes: pass (inputs, target) "
                         "tensors, a DataLoader over a map-style dataset with a batch_size and no custom sampler, or "
                         "a DataLoader whose sampler is already a DistributedSampler")
    batch = per_rank_batch(loader.batch_size, ranks, who, "train` DataLoader's `batch_size")
    sampler = DistributedSampler(loader.dataset, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    extra = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers) \
        if loader.num_workers else {}
    return DataLoader(loader.dataset, batch_size=batch, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      **extra)
