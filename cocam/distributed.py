"""Multi-process data-parallel training with ``torchrun`` and :class:`~torch.nn.parallel.DistributedDataParallel`.

:func:`cocam.train.fit` runs data-parallel when it finds itself in a process group of more
than one process: either one the caller initialised (``torch.distributed.init_process_group``)
or one described by ``torchrun``'s environment (``WORLD_SIZE > 1``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), which :func:`init_from_env` initialises (backend ``nccl``
for CUDA devices, ``gloo`` for the CPU). Nothing else changes: the command line and the Python
API are the same as for one process. For example, on one machine with four GPUs::

    torchrun --nproc_per_node=4 -m cocam train --root data/synthetic --out runs/base --batch-size 256
    torchrun --nproc_per_node=4 -m cocam finetune --checkpoint runs/base/best.pt --out runs/guided \\
        --attribute Wearing_Lipstick --batch-size 256
    torchrun --nproc_per_node=4 -m cocam finetune --checkpoint runs/base/best.pt --out runs/control --control \\
        --batch-size 256

(``torchrun ... -m cocam`` runs ``python -m cocam`` in every process; ``--nproc_per_node=2`` with
``--device cpu`` runs two CPU processes over gloo.) Several machines: the usual ``torchrun
--nnodes=N --node_rank=... --rdzv_endpoint=HOST:PORT``, with the run folder (``--out``) and the
data on a file system every machine sees.

**What each process does.**

* **Devices.** With ``device="auto"`` or ``"cuda"``, rank ``r`` uses ``cuda:LOCAL_RANK``; an
  explicit ``"cuda:i"`` is used as given; ``"cpu"`` (or no GPU) runs on the CPU over gloo.
* **Batches.** ``TrainConfig.batch_size`` is the **global** batch: every epoch all ranks draw
  the same shuffled order (seeded by ``(seed, epoch)``), cut it into global batches of
  ``batch_size`` images, and rank ``r`` of ``N`` takes the ``r``-th contiguous
  ``batch_size / N`` images of each one (:class:`cocam.dataset.BatchLoader` with ``rank=`` and
  ``num_replicas=``). The steps, the data each step sees and the learning-rate/batch-size
  relation are therefore those of a single process with the same ``batch_size``, whatever
  ``N`` is: ``batch_size`` must be divisible by ``N`` (else :class:`ValueError`).
* **Gradients.** The whole per-step loss computation (the forward pass, Grad-CAM's
  ``torch.autograd.grad`` with respect to the activations, the guidance loss) runs inside the
  ``forward`` of one module wrapped in DDP, so DDP sees every forward. Its gradient hooks fire
  only when a parameter's gradient is *accumulated*, i.e. once per parameter in
  ``loss.backward()`` (the inner ``autograd.grad`` calls differentiate with respect to
  activations or input images and accumulate nothing), and DDP then averages each gradient
  over the ranks exactly once. Every parameter receives a gradient from the BCE, so
  ``find_unused_parameters`` is not needed.
* **Means over the global batch.** DDP averages gradients, and the shards are equal, so the
  per-rank BCE mean averaged over ranks is the global mean. The guidance term is a *weighted*
  mean, ``Σ w·loss_g / Σ w`` over the guided pairs (only positives for ``target="positive"``),
  and the shards hold different numbers of guided pairs: averaging per-rank weighted means
  would not give the global one. Each rank therefore divides its own ``Σ w·loss_g`` by the
  **global** ``Σ w`` (all-reduced, a constant), times ``N`` (:func:`sharded_weighted_mean`), so
  that DDP's average is exactly the global weighted mean, in value and in gradient.
* **Dropout.** Rank ``r`` seeds the torch RNG with ``seed + r`` so ranks draw independent
  dropout masks (with dropout > 0 the run is then a different but equally valid sample from a
  single-process one; with dropout 0 it gives the single-process weights up to rounding).
  BatchNorm layers (resnet18) use per-rank batch statistics; rank 0's buffers are broadcast
  each step (DDP's default).
* **Reporting and files.** Only rank 0 takes the run folder's lock, writes ``run.json``,
  ``last.pt``/``best.pt`` (the unwrapped model's ``state_dict``, no ``module.`` prefix, plus
  every rank's RNG state for an exact resume) and ``history.csv``, shows the progress bar and
  calls ``on_epoch``. Training losses in the history are means over all ranks; validation
  runs on rank 0 and its metrics are broadcast, so early stopping decides the same on every
  rank. A non-finite loss on any rank stops every rank. ``resume=True`` makes every rank read
  ``last.pt``.
* **The group** that :func:`init_from_env` creates is destroyed at interpreter exit; a group
  the caller created is left to the caller.

The command-line output of ``cocam train``/``finetune`` (the final history table) is printed
by every process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cocam.evaluate import resolve_device

__all__ = [
    "DistributedContext",
    "check_global_batch",
    "env_world_size",
    "init_from_env",
    "sharded_weighted_mean",
]

T = TypeVar("T")

_ENV_NEEDED = ("RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: this process's rank (0 when not distributed).
        world_size: the number of processes (1 when not distributed).
        local_rank: the rank on this machine (``LOCAL_RANK``; picks the GPU).
        device: the device this process trains on.
        backend: the process group's backend (``"nccl"``, ``"gloo"``), ``None`` for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process (and so gradients to synchronise)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and reports."""
        return self.rank == 0

    def _collective_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo only CPU ones.
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all ranks (a new tensor; ``tensor`` is left alone)."""
        if not self.enabled:
            return tensor.detach().clone()
        buf = tensor.detach().to(self._collective_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """``obj`` as rank ``src`` has it (picklable objects), on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index if self.device.index is not None else 0])
            else:
                dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (unchanged for one process).

        DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
        from the same weights.
        """
        if not self.enabled:
            return module
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset); :class:`ValueError` when not a positive integer."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} is not an integer.") from None
    if value < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {value}.")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer.") from None


def _rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The training device of the process with ``local_rank``: ``cuda`` without an index becomes ``cuda:local_rank``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}. "
                             f"Start at most that many processes per node (torchrun --nproc_per_node).")
        resolved = torch.device("cuda", local_rank)
    return resolved


def init_from_env(device: str | torch.device | None = "auto") -> DistributedContext:
    """The :class:`DistributedContext` of this process, initialising the process group if needed.

    * a process group is already initialised: use it (rank and size from it, ``LOCAL_RANK``
      from the environment, else ``rank % number of GPUs``);
    * else ``WORLD_SIZE > 1`` in the environment (``torchrun``): initialise the group with
      ``init_method="env://"``, backend ``nccl`` when this rank's device is CUDA and ``gloo``
      otherwise, and destroy it at interpreter exit;
    * else: one process (``world_size == 1``), nothing initialised.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK`` when
            distributed) or an explicit ``"cuda:i"``.

    Raises:
        ValueError: the torchrun variables are incomplete or not integers, or ``LOCAL_RANK``
            has no GPU.
        RuntimeError: ``torch.distributed`` is not available in this build of PyTorch.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        gpus = torch.cuda.device_count()
        local = _env_int("LOCAL_RANK", rank % gpus if gpus else 0)
        dev = _rank_device(device, local) if world > 1 else resolve_device(device)
        if world > 1 and dev.type == "cuda":
            torch.cuda.set_device(dev)  # object collectives over nccl use the current device
        return DistributedContext(rank, world, local, dev, str(dist.get_backend()))
    world = env_world_size()
    if world == 1:
        return DistributedContext(device=resolve_device(device))
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for distributed training, but this PyTorch build has no "
                           f"torch.distributed.")
    missing = [name for name in _ENV_NEEDED if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with torchrun "
                         f"(e.g. torchrun --nproc_per_node={world} -m cocam ...), or unset WORLD_SIZE.")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}).")
    dev = _rank_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    atexit.register(_destroy_group)
    return DistributedContext(rank, world, local, dev, backend)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_global_batch(batch_size: int, world_size: int) -> int:
    """The per-rank batch ``batch_size / world_size``; :class:`ValueError` unless it divides exactly."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the "
                         f"{world_size} processes: use e.g. {lower or world_size} or {lower + world_size}.")
    return batch_size // world_size


def sharded_weighted_mean(values: Tensor, weight: Tensor, context: DistributedContext) -> Tensor:
    """This rank's share of the weighted mean ``Σ w·v / Σ w`` over the *global* batch.

    Returns ``N · Σ_local w·v / Σ_global w`` (``Σ_global w`` all-reduced over the ``N`` ranks and
    treated as a constant; the result is 0 when no rank has any weight). Its average over the
    ranks, which is what DDP's gradient averaging computes, is exactly the global weighted
    mean, in value and in gradient. With one process it is ``Σ w·v / Σ w``.

    Args:
        values: per-sample values, e.g. ``(B_local, T)`` guidance losses.
        weight: non-negative weights of the same shape (or broadcastable to it).
        context: the :class:`DistributedContext` of this process.
    """
    weight = weight.to(values.dtype)
    numerator = (weight * values).sum()
    denominator = context.all_reduce_sum(torch.broadcast_to(weight, values.shape).sum())
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator * (context.world_size / safe)
