"""Train one stage of a SliME model from a YAML configuration (see :mod:`recipes.train_config`).

::

    python -m recipes.train --config recipes/configs/tiny/stage1.yaml          # one process
    torchrun --nproc_per_node 8 -m recipes.train --config CONFIG               # DDP / DeepSpeed
    deepspeed --num_gpus 8 recipes/train.py --config CONFIG                    # DeepSpeed launcher
    python -m recipes.train --config CONFIG --set training.lr=2e-5 --resume never

A stage run builds the model (``model:``, through :func:`recipes.build.build_model`; a later stage
names the previous stage's ``final`` folder in ``model.init_from``), enters the stage of the preset
(only its roles train, on its views, with its router γ and forced expert), and trains for
``training.epochs`` over the data (or ``training.max_steps`` optimizer steps) with AdamW, a cosine
(or constant) learning rate after a linear warm-up, gradient accumulation up to
``training.global_batch_size``, gradient clipping, and bf16 autocast or DeepSpeed ZeRO.

Output folder (``training.output_dir``)::

    config.yaml              the resolved configuration
    log.jsonl                one line per logged step (loss, lr, seconds)
    checkpoints/step-N/      resumable state (weights being trained, optimizer, RNG, step)
    checkpoints/latest       the newest complete checkpoint's name
    final/                   the trained model, a standard Hugging Face folder
                             (recipes.model_folder.save_model_folder); under ZeRO-3
                             with bf16 it holds DeepSpeed's 16-bit gathered weights, not the fp32
                             master copy, and the next stage starts from those
    report.json              steps, first and last loss, time

Checkpoints are written into ``step-N.partial`` by every rank and renamed into place by rank 0
once all ranks are done, and ``latest`` is replaced atomically after that, so an interrupted run
leaves the previous checkpoint as the one to resume from. ``--resume auto`` (the default) resumes
from ``latest`` when it exists and refuses when the checkpoint was written under a different
configuration (it names the keys that differ); the batch order depends only on the seed and the
epoch, so a resumed run sees the batches the interrupted one would have seen. ``--resume never``
into a folder holding an earlier run moves that run's files into ``output_dir/previous-K/``
(nothing is deleted); pruning keeps the ``keep_last`` newest checkpoints up to the one ``latest``
names and never that one.

Faults: every start first tidies what a killed run left (unfinished ``.final.tmp-*`` folders,
``*.partial`` checkpoints, temporary files of atomic writes) and moves back a ``final`` whose
replacement was interrupted. Resuming never unpickles with code execution: the trainer's own
files are read with ``torch.load(weights_only=True)``, and DeepSpeed's, which DeepSpeed unpickles
unrestricted, are inspected first and refused when they name anything DeepSpeed does not write.
``report.json``'s ``loss_first`` / ``loss_last`` are the stage's first and last logged loss (a
rerun that made no step takes them from ``log.jsonl``); a loss that rose is flagged
(``loss_rose``, a warning). A sample longer than ``data.max_length`` (default: the LLM's
``max_position_embeddings``), visual tokens counted from the slice plan, loses text at its end,
never visual tokens nor its whole answer (then the run stops naming the record); the first such
sample warns and the report counts them (``truncated_samples``). ``data.check_images`` slices
every image at open and lists all bad records in one error; ``data.skip_bad_images`` drops them
with a count instead. Non-finite vision features stop the run naming the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not __package__:
    # run as a file (the deepspeed launcher's ``deepspeed recipes/train.py``): make the
    # repository root importable, as ``python -m recipes.train`` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.train_config import TrainConfigError, load_config
from recipes.train_engines import build_engine, deepspeed_config, zero3_loading
from recipes.train_runtime import (
    Distributed,
    append_log,
    clean_interrupted,
    config_fingerprint,
    init_distributed,
    keep_log_until,
    latest_checkpoint,
    lr_factor,
    set_aside_previous_run,
    stage_losses,
    visual_budget,
)
from slime_adapters.config import atomic_write_text

__all__ = ["main", "resolve_stage"]


def resolve_stage(cfg: dict[str, Any], role_names: list[str]):
    """The preset's stage list with the configured stage overridden; returns (stages, stage).

    Raises:
        TrainConfigError: the stage name is not in the preset, or an override is invalid.
    """
    from slime_adapters import alternating, paper_stages, reference_stages
    from slime_adapters.schedule import ScheduleError

    s, t = cfg["stage"], cfg["training"]
    roles = [r for r in role_names if r != "vision"]
    try:
        if s["preset"] == "paper":
            stages = paper_stages(roles=roles)
        elif s["preset"] == "reference":
            stages = reference_stages(roles=roles)
        else:
            stages = alternating(s["rounds"], roles=roles)
        names = [st.name for st in stages]
        if s["name"] not in names:
            raise TrainConfigError(f"stage.name={s['name']!r} is not a stage of preset "
                                   f"{s['preset']!r}: {names}")
        index = names.index(s["name"])
        changes = {k: s[k] for k in ("views", "router_gamma", "force_expert") if s[k] is not None}
        if s["trainable"] is not None:
            unknown = sorted(set(s["trainable"]) - set(role_names))
            if unknown:
                raise TrainConfigError(f"stage.trainable names unknown role(s) {unknown}; "
                                       f"known: {sorted(role_names)}")
            changes["trainable"] = tuple(s["trainable"])
        if t["lr"] is not None:
            changes["lr"] = float(t["lr"])
        changes["weight_decay"] = float(t["weight_decay"])
        stages[index] = dataclasses.replace(stages[index], **changes)
    except ScheduleError as exc:
        raise TrainConfigError(f"stage: {exc}") from exc
    return stages, stages[index]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a stage's YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key, e.g. training.lr=2e-5 (repeatable)")
    ap.add_argument("--resume", default="auto",
                    help="auto (resume from output_dir/checkpoints/latest when present), never, "
                         "or a checkpoint folder")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK rules
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the stage; returns the report (on every rank)."""
    args = _parse(argv)
    if not torch.cuda.is_available():
        # DeepSpeed would pick its CPU accelerator anyway, after a warning on every stage
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        cfg = load_config(args.config, args.set)
        check_before_start(cfg)
    except (TrainConfigError, FileNotFoundError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    dist = init_distributed(cfg)
    try:
        return _train(cfg, args, dist)
    finally:
        dist.close()


GENERATE_KEYS = ("num", "seed", "square", "clutter")


def check_before_start(cfg: dict[str, Any]) -> None:
    """Everything that can be checked without data or weights, so that a typo fails in a second
    rather than after the data is generated and the model is loaded: the ``model:`` schema, the
    slicer's keywords, the template name, ``data.generate``'s keys.

    Raises:
        TrainConfigError: naming the key and the problem.
    """
    from recipes.model_config import parse_model_config
    from recipes.templates import TemplateError, get_template
    from slime_adapters import SlicerConfig

    try:
        parse_model_config(cfg["model"])
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from exc
    try:
        SlicerConfig(**cfg["data"]["slicer"])
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"data.slicer: {exc}") from exc
    try:
        get_template(cfg["data"]["template"])
    except TemplateError as exc:
        raise TrainConfigError(f"data.template: {exc}") from exc
    t = cfg["training"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t["global_batch_size"] % (t["micro_batch_size"] * world):
        raise TrainConfigError(
            f"training.global_batch_size={t['global_batch_size']} must be a multiple of "
            f"micro_batch_size × processes = {t['micro_batch_size']} × {world}")
    if t["deepspeed"] is not None:
        deepspeed_config(t, 1)  # the preset or file exists, parses, leaves the optimizer to us
    unknown = sorted(set(cfg["data"]["generate"] or {}) - set(GENERATE_KEYS))
    if unknown:
        raise TrainConfigError(f"unknown key(s) {[f'data.generate.{k}' for k in unknown]}; "
                               f"known: {list(GENERATE_KEYS)}")


def _prepare_data(cfg: dict[str, Any], dist: Distributed) -> Path:
    data = cfg["data"]
    index = Path(data["train"])
    if not index.exists() and data["generate"] is not None:
        if index.name != "data.json":
            raise TrainConfigError("data.generate writes <folder>/data.json: data.train must "
                                   f"end with data.json, got {str(index)!r}")
        if dist.rank == 0:
            from recipes.data import make_color_dataset

            gen = dict(data["generate"])
            make_color_dataset(index.parent, int(gen.pop("num", 64)), **gen)
        dist.barrier()
    if not index.is_file():
        raise FileNotFoundError(f"data.train: dataset index {str(index)!r} does not exist")
    return index


def _train(cfg: dict[str, Any], args: argparse.Namespace, dist: Distributed) -> dict[str, Any]:
    from recipes.build import build_model
    from recipes.chat import image_token_of, slicer_for
    from recipes.data import LlavaJsonDataset
    from slime_adapters.hf.modeling_slime import NonFiniteFeaturesError
    from slime_adapters import AlternatingScheduler

    t = cfg["training"]
    out = Path(t["output_dir"])
    if dist.rank == 0:
        for line in clean_interrupted(out):
            print(f"train: {line}", flush=True)
        if args.resume == "never":
            aside = set_aside_previous_run(out)
            if aside is not None:
                print(f"train: --resume never: moved the earlier run in {out} to {aside}",
                      flush=True)
    dist.barrier()
    index = _prepare_data(cfg, dist)

    # a whole number since check_before_start (the same WORLD_SIZE as dist.world)
    accum = t["global_batch_size"] // (t["micro_batch_size"] * dist.world)
    ds_config = None if t["deepspeed"] is None else deepspeed_config(t, accum)
    # Under ZeRO-3, transformers' from_pretrained partitions an encoder or LLM loaded from a
    # folder (``path:`` or ``init_from``) while it loads it (deepspeed.zero.Init) as long as this
    # object lives: no rank ever holds a whole 70B model, and DeepSpeed places the parameters
    # itself. Models built from a ``config:`` are partitioned by DeepSpeed's initialize instead.
    zero3 = zero3_loading(ds_config, t["global_batch_size"])
    torch.manual_seed(t["seed"])  # the same initial weights on every rank
    built = build_model(cfg["model"])
    torch.manual_seed(t["seed"] + 1 + dist.rank)  # the projector's noise differs across ranks
    random.seed(t["seed"] + 1 + dist.rank)
    model, tokenizer = built.model, built.tokenizer
    if zero3 is None:
        model = model.to(dist.device)
    stages, stage = resolve_stage(cfg, list(built.roles))
    scheduler = AlternatingScheduler(built.roles, stages, model=model)
    slicer = slicer_for(model, cfg["data"]["slicer"])  # tiles of the encoder's image size
    data = cfg["data"]
    max_length = data["max_length"] or getattr(
        getattr(model.llm, "config", None), "max_position_embeddings", None)
    dataset = LlavaJsonDataset(index, tokenizer=tokenizer, slicer=slicer,
                               template=data["template"], image_root=data["image_root"],
                               image_token=image_token_of(model, tokenizer),
                               max_length=max_length,
                               visual_tokens=visual_budget(model.adapter, stage.views),
                               check_images=data["check_images"],
                               skip_bad_images=data["skip_bad_images"])
    if dataset.skipped_bad_images and dist.rank == 0:
        print(f"train: skipped {dataset.skipped_bad_images} record(s) with a bad image",
              flush=True)

    per_epoch = len(dataset) // t["global_batch_size"]
    if per_epoch < 1:
        raise TrainConfigError(f"the dataset has {len(dataset)} records, fewer than one global "
                               f"batch ({t['global_batch_size']})")
    total = per_epoch * t["epochs"]
    if t["max_steps"] is not None:
        total = min(total, t["max_steps"])

    engine = build_engine(cfg, model, scheduler, stage, dist, accum, ds_config)
    ckdir = out / "checkpoints"
    fingerprint = config_fingerprint(cfg)
    start = 0
    if args.resume != "never":
        found = Path(args.resume) if args.resume != "auto" else latest_checkpoint(ckdir)
        if found is not None:
            start = engine.load(found, fingerprint)
            if dist.rank == 0:
                print(f"train: resumed from {found} at step {start}", flush=True)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(out / "config.yaml", yaml.safe_dump(
            {k: v for k, v in cfg.items() if k != "source"}, sort_keys=False))
        keep_log_until(out / "log.jsonl", start)  # rows of steps a resumed run repeats go
    if start >= total and (out / "final").exists() and (out / "report.json").is_file():
        if dist.rank == 0:
            print(f"train: stage {stage.name} is already complete in {out}", flush=True)
        return json.loads((out / "report.json").read_text(encoding="utf-8"))

    from recipes.train_runtime import MicroBatches

    batches = MicroBatches(dataset, tokenizer.pad_token_id, seed=t["seed"],
                           global_batch=t["global_batch_size"], micro=t["micro_batch_size"],
                           rank=dist.rank, world=dist.world, per_epoch=per_epoch)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start * accum, total * accum),
        num_workers=cfg["data"]["num_workers"],
        # its own generator: the loader's seeding must not draw from the global RNG, which a
        # resumed run restores to where the interrupted one stood
        generator=torch.Generator().manual_seed(t["seed"]))
    progress = _progress(total, start, enabled=t["progress"] and dist.rank == 0)
    losses: list[float] = []
    t0 = time.perf_counter()
    step, window, truncated = start, [], 0
    for micro_index, batch in enumerate(loader, start=start * accum):
        boundary = (micro_index + 1) % accum == 0
        engine.set_lr(lr_factor(step, total, t))
        if batch["truncated"] and not truncated and dist.rank == 0:
            print(f"train: warning: samples longer than {max_length} tokens (text + visual) "
                  f"lose text at their end (never visual tokens); the report counts them",
                  file=sys.stderr, flush=True)
        truncated += batch["truncated"]
        try:
            result = engine.forward(batch, views=scheduler.views,
                                    router_gamma=scheduler.router_gamma,
                                    force_expert=scheduler.force_expert)
        except NonFiniteFeaturesError as exc:
            names = [batch["records"][i] for i in exc.images]
            raise FloatingPointError(f"train: step {step} (micro-batch {micro_index}): the "
                                     f"vision features of {', '.join(names)} are not finite; "
                                     f"stopping before they spread") from exc
        if not torch.isfinite(result.loss):
            raise FloatingPointError(f"train: the loss is {result.loss.item()} at step {step} "
                                     f"(micro-batch {micro_index}); stopping before it spreads")
        engine.backward(result.loss, boundary=boundary)
        window.append(result.loss.detach().float())
        if not boundary:
            continue
        engine.step()
        step += 1
        loss = dist.mean(torch.stack(window).mean())
        window = []
        losses.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if dist.rank == 0 and (step % t["log_every"] == 0 or step in (1, total)):
            append_log(out, {"step": step, "loss": loss, "lr": engine.lr,
                       "seconds": round(time.perf_counter() - t0, 3)})
        if t["save_every"] and step % t["save_every"] == 0 and step < total:
            engine.save(ckdir, step, fingerprint, keep_last=t["keep_last"])
    progress.close()
    if start < total or not (out / "final").exists():
        engine.save_final(out / "final", tokenizer, extra={
            "template": cfg["data"]["template"], "slicer": cfg["data"]["slicer"],
            "stage": stage.to_dict(), "preset": cfg["stage"]["preset"]})
    if total > start:
        engine.save(ckdir, total, fingerprint, keep_last=t["keep_last"])
    # the stage's first and last logged loss (log.jsonl holds the steps before a resume too, and
    # a rerun killed before its report made no step of its own)
    curve = stage_losses(out / "log.jsonl") if dist.rank == 0 else losses
    first = curve[0] if curve else (losses[0] if losses else None)
    last = losses[-1] if losses else (curve[-1] if curve else None)
    rose = first is not None and last is not None and last > first
    truncated = round(dist.mean(torch.tensor(float(truncated))) * dist.world)  # every rank's
    report = {"stage": stage.name, "views": stage.views, "trainable": list(stage.trainable),
              "steps": total, "resumed_from": start, "world_size": dist.world,
              "accumulation": accum, "loss_first": first, "loss_last": last, "loss_rose": rose,
              "truncated_samples": truncated,
              "seconds": time.perf_counter() - t0, "engine": engine.name}
    if dist.rank == 0:
        atomic_write_text(out / "report.json", json.dumps(report, indent=2))
        print(f"train: stage {stage.name} ({stage.views}, trains {', '.join(stage.trainable)}): "
              f"{total - start} steps, loss {_fmt(first)} -> {_fmt(last)}; "
              f"saved {out / 'final'}", flush=True)
        if truncated:
            print(f"train: {truncated} sample(s) were cut to {max_length} tokens (text at "
                  f"their end)", flush=True)
        if rose:
            print(f"train: warning: the loss of stage {stage.name} rose ({_fmt(first)} -> "
                  f"{_fmt(last)}); check training.lr and the stage's data before the next stage",
                  file=sys.stderr, flush=True)
    return report


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _progress(total: int, start: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


if __name__ == "__main__":
    try:
        main()
    # the library's errors (bad records, images, checkpoints: ValueError subclasses) and a
    # non-finite loss or feature name their problem: one line, exit status 2
    except (TrainConfigError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        message = str(exc)
        print(message if message.startswith("train: ") else f"train: {message}", file=sys.stderr)
        sys.exit(2)
