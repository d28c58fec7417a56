"""What ``recipes/train.py`` runs on: processes, batches, the learning-rate curve, resume checks.

- :func:`init_distributed` joins the process group the launcher set up (``torchrun`` or
  ``deepspeed``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with
  gloo on CPU and NCCL on CUDA; one process without DeepSpeed needs no process group.
- :class:`MicroBatches` cuts the data into this rank's micro-batches: epoch ``e`` is a permutation
  seeded by ``seed + e``, each global batch a slice of it, so the order does not depend on when a
  run was interrupted.
- :func:`lr_factor` (warm-up, cosine) and :func:`config_fingerprint` (what a resume must share).
- :func:`clean_interrupted` and :func:`set_aside_previous_run`: the output folder at start.

The engines that run the steps and write the checkpoints are in :mod:`recipes.train_engines`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from recipes.train_config import TrainConfigError
from slime_adapters.config import atomic_write_text

# keys that change how a run is watched or stored, not what it computes: a resume may change them
_RUN_ONLY = {"output_dir", "save_every", "keep_last", "log_every", "progress", "num_workers",
             "device", "check_images"}
# keys added after checkpoints were first written: left out of a fingerprint while at their
# default, so that those checkpoints still resume
_LATER_KEYS = {"data": {"skip_bad_images": False, "max_length": None}}


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
    out["data"] = {k: v for k, v in out["data"].items() if k not in _RUN_ONLY
                   and not (k in _LATER_KEYS["data"] and v == _LATER_KEYS["data"][k])}
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


# what a run writes into training.output_dir (anything else there is the user's)
RUN_ENTRIES = ("checkpoints", "final", "log.jsonl", "report.json", "config.yaml")


def clean_interrupted(out: Path) -> list[str]:
    """Tidy what a killed run left in ``out``; returns one line per thing done.

    A ``final`` or checkpoint that was being replaced (moved aside into ``.final.old-*/previous``
    or ``step-N.replaced``, the new one not yet renamed in) is moved back; unfinished ``.final.tmp-*`` folders, ``step-N.partial``
    checkpoints and the temporary files of atomic writes (``.NAME.*.tmp``) are removed. Nothing
    a finished write produced is touched."""
    done: list[str] = []
    if not out.is_dir():
        return done
    final = out / "final"
    for old in sorted(out.glob(".final.old-*")):
        if not final.exists() and (old / "previous").is_dir():
            os.replace(old / "previous", final)
            done.append(f"restored {final} (its replacement was interrupted)")
    ck = out / "checkpoints"
    for old in sorted(ck.glob("step-*.replaced")):
        back = ck / old.name.removesuffix(".replaced")
        if not back.exists():
            os.replace(old, back)
            done.append(f"restored {back} (its replacement was interrupted)")
    stale = [*ck.glob("step-*.replaced"), *out.glob(".final.tmp-*"), *out.glob(".final.old-*"), *ck.glob("*.partial"),
             *(p for folder in (out, ck) for p in folder.glob(".*.tmp") if p.is_file())]
    for path in sorted(stale):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(f"removed {path.name} (left by an interrupted save)")
    return done


def set_aside_previous_run(out: Path) -> Path | None:
    """Move what an earlier run wrote into ``out`` (:data:`RUN_ENTRIES`) into a new
    ``out/previous-K`` folder, so that a fresh run neither resumes from nor prunes it; returns
    that folder (``None`` when there was nothing to move). Nothing is deleted."""
    found = [out / name for name in RUN_ENTRIES if (out / name).exists()]
    if not found:
        return None
    k = 1
    while (out / f"previous-{k}").exists():
        k += 1
    aside = out / f"previous-{k}"
    aside.mkdir()
    for path in found:
        os.replace(path, aside / path.name)
    return aside


def stage_losses(log: Path) -> list[float]:
    """The losses of ``log.jsonl`` in step order (torn or foreign rows skipped)."""
    if not log.is_file():
        return []
    rows = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) \
                and isinstance(row.get("loss"), int | float):
            rows[row["step"]] = float(row["loss"])
    return [rows[k] for k in sorted(rows)]


def visual_budget(adapter, views: str):
    """The visual tokens an image costs the LLM at most under ``views``, from its slice plan
    (every local token counted: the router keeps at most all of them); picklable."""
    from slime_adapters import visual_token_count

    return functools.partial(
        visual_token_count, global_tokens=adapter.projector.num_tokens,
        num_queries=adapter.compressor.num_queries,
        separator=0 if adapter.config.separator == "none" else 1, views=views)


def latest_checkpoint(ckdir: Path) -> Path | None:
    """The checkpoint ``ckdir/latest`` names (``None`` without one).

    Raises:
        TrainConfigError: a damaged pointer. FileNotFoundError: it names no folder."""
    pointer = ckdir / "latest"
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise TrainConfigError(f"{pointer} is damaged (not a checkpoint name): {exc}") from exc
    path = ckdir / tag
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r}, which is not a folder in {ckdir}")
    return path


def keep_log_until(path: Path, step: int) -> None:
    """Drop the rows of ``log.jsonl`` after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row torn by the interruption
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(line)
    atomic_write_text(path, "".join(f"{ln}\n" for ln in rows))


def append_log(out: Path, row: dict[str, Any]) -> None:
    """Append one row to ``out/log.jsonl``."""
    with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
