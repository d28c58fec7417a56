"""What ``recipes/train.py`` runs on: processes, batches, the learning-rate curve, resume checks.

- :func:`init_distributed` joins the process group the launcher set up (``torchrun`` or
  ``deepspeed``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with
  gloo on CPU and NCCL on CUDA; one process without DeepSpeed needs no process group.
- :class:`MicroBatches` cuts the data into this rank's micro-batches: epoch ``e`` is a permutation
  seeded by ``seed + e``, each global batch a slice of it, so the order does not depend on when a
  run was interrupted.
- :func:`lr_factor` (warm-up, cosine) and :func:`config_fingerprint` (what a resume must share).

The engines that run the steps and write the checkpoints are in :mod:`recipes.train_engines`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from typing import Any

import torch

# keys that change how a run is watched or stored, not what it computes: a resume may change them
_RUN_ONLY = {"output_dir", "save_every", "keep_last", "log_every", "progress", "num_workers",
             "device"}


@dataclasses.dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks."""
        if self.world > 1:
            value = value.detach().to(self.device, torch.float32).clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return float(value)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: dict[str, Any]) -> Distributed:
    """Join (or, for one DeepSpeed process, create) the process group; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    t = cfg["training"]
    if t["device"] is not None:
        device = torch.device(t["device"])
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_ds = t["deepspeed"] is not None
    owns = False
    if (world > 1 or use_ds) and not torch.distributed.is_initialized():
        # DeepSpeed needs a process group even for one process; a lone run gets a loopback one.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if use_ds:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            torch.distributed.init_process_group(backend=backend)
        owns = True
    return Distributed(rank, world, local_rank, device, owns)


def lr_factor(step: int, total: int, t: dict[str, Any]) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``: linear
    warm-up over ``ceil(warmup_ratio · total)`` steps, then cosine down to ``min_lr_ratio`` (or
    constant)."""
    warmup = math.ceil(t["warmup_ratio"] * total)
    if step < warmup:
        return (step + 1) / warmup
    if t["lr_schedule"] == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    low = t["min_lr_ratio"]
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def config_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The parts of the configuration a resumed run must share with the interrupted one."""
    out = {k: cfg[k] for k in ("model", "stage", "data")}
    out["training"] = {k: v for k, v in cfg["training"].items() if k not in _RUN_ONLY}
    out["data"] = {k: v for k, v in out["data"].items() if k not in _RUN_ONLY}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``j`` of this rank, collated (``j`` counts micro-batches from the start)."""

    def __init__(self, dataset, pad_id: int, *, seed: int, global_batch: int, micro: int,
                 rank: int, world: int, per_epoch: int) -> None:
        self.dataset, self.pad_id, self.seed = dataset, pad_id, seed
        self.global_batch, self.micro, self.rank, self.world = global_batch, micro, rank, world
        self.accum = global_batch // (micro * world)
        self.per_epoch = per_epoch
        self._perms: dict[int, list[int]] = {}

    def indices(self, j: int) -> list[int]:
        step, m = divmod(j, self.accum)
        epoch, k = divmod(step, self.per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g).tolist()
        first = k * self.global_batch + (m * self.world + self.rank) * self.micro
        return self._perms[epoch][first:first + self.micro]

    def __len__(self) -> int:
        """Micro-batches in one epoch (``j`` past it reads the next epochs' orders)."""
        return self.per_epoch * self.accum

    def __getitem__(self, j: int) -> dict[str, Any]:
        from recipes.data import collate_examples

        return collate_examples([self.dataset[i] for i in self.indices(j)], self.pad_id)
