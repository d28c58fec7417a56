"""The demo: does SliME read detail that the 336-px global view misses, at fewer tokens?

``make demo`` (``python -m recipes.demo``) runs on a CPU, with no download:

1. writes the generated detail task (:mod:`recipes.detail_task`; train / val / test, written once
   and reused): small squares that stay 14 px wide in the 336-px tiles and shrink to about 5 px in
   the global view of the larger images, with ``detail`` and ``global`` questions;
2. stage 0 (:mod:`recipes.demo_stage0`): trains the tiny vision encoder once, caches it in
   ``<out>/stage0`` and freezes it for every variant, as the paper keeps its CLIP frozen; every
   view is encoded once and the variants train on the cached features;
3. trains the variants on the same data, steps and seeds (models built by
   :func:`recipes.build.build_model` from :data:`MODEL`, stages run by
   :class:`slime_adapters.AlternatingScheduler`):

   - ``global-only``: global views only (LLaVA-1.5-like): the projector, then projector + LLM;
   - ``slime``: the paper's stages I (projector, global) → II (compressor, local) → III (all but
     the encoder, both views), the router at its γ;
   - ``slime-all-local``: the same trained ``slime`` model evaluated at γ = 1 (every local token);
   - with ``--ablation`` also ``slime-joint`` (everything from the start, both views: the paper's
     end-to-end baseline) and ``local-only`` (tiles only), each over ``--seeds`` seeds (3);

4. evaluates every variant on the held-out test images and prints one table (accuracy on
   ``detail`` and ``global`` questions by image-size bucket, visual tokens per image, the local
   tokens the router keeps), written with ``report.json`` and a PNG into ``--out``.

Everything that calls the model sits in the "model calls" section below.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recipes import detail_task as task
from recipes.build import build_model
from recipes.data import LlavaJsonDataset, build_word_tokenizer
from recipes.demo_report import summarise, write_outputs
from recipes.demo_stage0 import ImageFeatures, encode_images, stage0_encoder
from slime_adapters import AdaptiveSlicer, AlternatingScheduler, Stage, paper_stages

VARIANTS = ("global-only", "slime", "slime-all-local")
ABLATION = ("slime-joint", "local-only")
PROJECTOR = ("mlp_expert", "query_expert", "gate")
ADAPTER_AND_LLM = (*PROJECTOR, "compressor", "llm")


def model_config(vocab_size: int, *, gamma: float, temperature: float) -> dict:
    """The ``model:`` dict the builder reads: a 2-layer CLIP (144 tokens per 336-px view), the
    SliME adapter (16 queries per tile) and a 2-layer Llama over the task's words."""
    return {
        "vision": {"type": "clip", "config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": task.TILE, "patch_size": 28}},
        "feature_layer": -1,  # the tiny encoder's last layer: stage 0 trains it for the adapter
        "llm": {"type": "llama", "config": {
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "vocab_size": vocab_size}},
        "tokenizer": {"type": "word"},
        "adapter": {"projector": {"num_heads": 2},
                    "compressor": {"num_queries": 16, "num_heads": 2},
                    "router": {"gamma": gamma, "temperature": temperature}},
    }


def task_tokenizer(built_tokenizer):
    """The word tokenizer with the task's words added after the builder's own (same ids)."""
    tok = build_word_tokenizer(extra_words=task.TASK_WORDS)
    base, ext = built_tokenizer.get_vocab(), tok.get_vocab()
    if any(ext.get(w) != i for w, i in base.items()):
        raise RuntimeError("the task tokenizer must keep the builder's word ids")
    return tok


# =========================================================================== model calls
# Every call into the model lives here: the view encoder (stage 0 and the feature cache), the
# visual tokens of cached features, the training loss, and the answers of a batch.

def encode_views(model, pixels):
    """``(v, 3, T, T)`` normalised views → ``(v, s, dv)`` the features the adapter reads."""
    return model.encode_views(pixels)


def visual_tokens(model, batch, *, views: str, router_gamma=None, force_expert=None):
    text = model.llm.get_input_embeddings()(batch.question_ids)
    return model.adapter(batch.global_feats if views != "local" else None,
                         batch.tile_feats if views != "global" else None, grids=batch.grids,
                         text_embeds=text, text_mask=batch.question_mask, views=views,
                         force_expert=force_expert, router_gamma=router_gamma)


def training_loss(model, batch, visual):
    """The LM loss on the answers (plus the projector's balance loss) with ``visual`` spliced in."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 labels=batch.labels, visual_tokens=visual).loss


def answer_ids(model, batch, visual):
    """The first answer token of every prompt (greedy)."""
    out = model.generate(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                         visual_tokens=visual, max_new_tokens=1, do_sample=False)
    return out[:, batch.prompt_ids.shape[1]]
# ======================================================================= end of model calls


@dataclass
class Batch:
    global_feats: torch.Tensor
    tile_feats: torch.Tensor
    grids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    answers: list[str]
    records: list[dict]


class Records:
    """A split's records, tokenised once by the ``qa`` template, with their cached features."""

    def __init__(self, index: Path, tokenizer, slicer, features: dict[str, ImageFeatures]):
        ds = LlavaJsonDataset(index, tokenizer=tokenizer, slicer=slicer)  # checks every record
        self.records, self.features, self.pad = ds.records, features, tokenizer.pad_token_id
        self.encoded = [ds.template.encode(tokenizer, r["conversations"],
                                           image_token=ds.image_token) for r in ds.records]

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, idx: list[int]) -> Batch:
        def pad(seqs, value):
            return torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs],
                                                   batch_first=True, padding_value=value)

        recs = [self.records[i] for i in idx]
        enc = [self.encoded[i] for i in idx]
        feats = [self.features[r["image"]] for r in recs]
        ids = pad([e.input_ids for e in enc], self.pad)
        labels = pad([e.labels for e in enc], -100)
        q = [e.question_ids for e in enc]
        prompt_len = torch.tensor([next(i for i, v in enumerate(e.labels) if v != -100)
                                   for e in enc])
        prompt_mask = torch.arange(ids.shape[1])[None] < prompt_len[:, None]
        return Batch(
            global_feats=torch.stack([f.global_view for f in feats]),
            tile_feats=torch.cat([f.tiles for f in feats]),
            grids=torch.tensor([f.grid for f in feats]),
            input_ids=ids, attention_mask=pad([[1] * len(e.input_ids) for e in enc], 0),
            labels=labels, question_ids=pad(q, self.pad),
            question_mask=pad([[1] * len(s) for s in q], 0).bool(),
            prompt_ids=torch.where(prompt_mask, ids, self.pad), prompt_mask=prompt_mask.long(),
            answers=[r["conversations"][1]["value"] for r in recs], records=recs)

    def stream(self, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=g).tolist()
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield self.batch(order[i:i + batch_size])


def variant_stages(variant: str, steps: tuple[int, int, int], lr: float) -> list[Stage]:
    """The stages of a trained variant; every variant runs ``sum(steps)`` steps in all."""
    s1, s2, s3 = steps
    if variant == "slime":
        return paper_stages(roles=ADAPTER_AND_LLM, adapter_lr=lr, finetune_lr=lr,
                            steps={"I": s1, "II": s2, "III": s3})
    if variant == "global-only":
        return [Stage("I", PROJECTOR, views="global", lr=lr, steps=s1),
                Stage("III-global", (*PROJECTOR, "llm"), views="global", lr=lr, steps=s2 + s3)]
    if variant == "local-only":
        return [Stage("II-local", ("mlp_expert", "compressor"), views="local", lr=lr,
                      steps=s1 + s2),
                Stage("III-local", ("mlp_expert", "compressor", "llm"), views="local", lr=lr,
                      steps=s3)]
    if variant == "slime-joint":
        return [Stage("joint", ADAPTER_AND_LLM, views="both", lr=lr, steps=s1 + s2 + s3)]
    raise ValueError(f"unknown variant {variant!r}")


def train_variant(model, roles, stages, data: Records, args, seed: int, label: str) -> list[dict]:
    scheduler = AlternatingScheduler(roles, stages, model=model)
    batches = data.stream(args.batch_size, seed)
    history = []
    for index, stage in enumerate(scheduler.stages):
        optimizer = torch.optim.AdamW(scheduler.enter(index), weight_decay=0.0)
        model.train()
        losses, kept, offered, t0 = [], 0, 0, time.perf_counter()
        bar = tqdm(range(stage.steps), desc=f"{label} stage {stage.name}", unit="step",
                   dynamic_ncols=True, disable=args.quiet, leave=False)
        for _ in bar:
            batch = next(batches)
            visual = visual_tokens(model, batch, views=scheduler.views,
                                   router_gamma=scheduler.router_gamma,
                                   force_expert=scheduler.force_expert)
            loss = training_loss(model, batch, visual)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{label} stage {stage.name}: the loss became {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if visual.aux.num_kept is not None:
                kept += int(visual.aux.num_kept.sum())
                offered += int(visual.aux.num_local.sum())
            post = {"loss(last 20)": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}"}
            if offered:
                post["keep"] = f"{kept / offered:.2f}"
            bar.set_postfix(post)
        bar.close()
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        fell = last < first
        history.append({"variant": label, "seed": seed, "stage": stage.name,
                        "views": stage.views, "steps": len(losses), "loss_window": k,
                        "loss_first": first, "loss_last": last, "loss_fell": fell,
                        "keep_fraction": kept / offered if offered else None,
                        "seconds": time.perf_counter() - t0})
        keep = f", router kept {kept / offered:.0%} of local tokens" if offered else ""
        flag = "" if fell else "   <-- the loss did not fall in this stage"
        print(f"{label} stage {stage.name:10s} views={stage.views:6s} loss, mean of the first "
              f"{k} steps -> last {k}: {first:.2f} -> {last:.2f} ({len(losses)} steps, "
              f"{time.perf_counter() - t0:.0f} s{keep}){flag}")
    return history


@torch.no_grad()
def evaluate(model, data: Records, tokenizer, *, views: str, router_gamma, batch_size: int):
    """One entry per test record: correct?, kind, size bucket, visual tokens, kept / offered."""
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        batch = data.batch(list(range(i, min(i + batch_size, len(data)))))
        visual = visual_tokens(model, batch, views=views, router_gamma=router_gamma)
        pred = tokenizer.convert_ids_to_tokens(answer_ids(model, batch, visual).tolist())
        kept = visual.aux.num_kept.tolist() if visual.aux.num_kept is not None else None
        local = visual.aux.num_local.tolist() if visual.aux.num_local is not None else None
        for j, rec in enumerate(batch.records):
            out.append({"correct": pred[j] == batch.answers[j], "kind": rec["kind"],
                        "size_bucket": rec["size_bucket"],
                        "visual_tokens": int(visual.lengths[j]),
                        "kept": kept[j] if kept else 0, "local": local[j] if local else 0})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (data, encoder, report)")
    p.add_argument("--train", type=int, default=320, help="generated training images")
    p.add_argument("--val", type=int, default=32, help="generated validation images (stage 0)")
    p.add_argument("--test", type=int, default=160, help="generated held-out test images")
    p.add_argument("--steps", type=int, nargs=3, default=(100, 100, 400),
                   metavar=("I", "II", "III"), help="optimizer steps of stages I, II, III; every "
                   "variant trains for their sum")
    p.add_argument("--stage0-steps", type=int, default=200)
    p.add_argument("--stage0-batch", type=int, default=32, help="views per stage-0 step")
    p.add_argument("--stage0-pool", type=int, default=2048,
                   help="336-px pictures of the task drawn once for stage 0")
    p.add_argument("--stage0-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every stage")
    p.add_argument("--gamma", type=float, default=0.9, help="router γ of the slime variants")
    p.add_argument("--temperature", type=float, default=0.1, help="router temperature")
    p.add_argument("--ablation", action="store_true",
                   help="also train slime-joint and local-only, over --seeds seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (1; 3 with "
                   "--ablation)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared or 2-core machine more threads wait "
                        "on each other; measured 4-9x slower with 2 under load)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("train", "val", "test", "threads", "stage0_steps", "stage0_batch", "stage0_pool",
                 "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.steps) < 1:
        p.error(f"--steps must be three numbers >= 1, got {' '.join(map(str, args.steps))}")
    if args.train * 2 < args.batch_size:
        p.error(f"--train {args.train} images give {2 * args.train} records, fewer than "
                f"--batch-size {args.batch_size}")
    if not (0 < args.gamma <= 1 and args.temperature > 0 and args.lr > 0 and args.stage0_lr > 0):
        p.error("--gamma must lie in (0, 1], --temperature and the learning rates above 0")
    args.seeds = args.seeds if args.seeds is not None else (3 if args.ablation else 1)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)  # every argument is checked before anything is written
    t_start = time.perf_counter()
    commit = _commit()  # the code that runs, read before the run
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    indices = {split: task.make_detail_dataset(out / "data" / split, n, seed=seed)
               for split, n, seed in (("train", args.train, 0), ("val", args.val, 1),
                                      ("test", args.test, 2))}
    slicer = AdaptiveSlicer(tile_size=task.TILE, max_tiles=task.MAX_TILES)
    print(f"data: {args.train} / {args.val} / {args.test} train / val / test images "
          f"(2 questions each) in {out / 'data'}")

    def build(seed: int):
        torch.manual_seed(seed)
        probe = build_word_tokenizer()
        cfg = model_config(len(build_word_tokenizer(extra_words=task.TASK_WORDS)),
                           gamma=args.gamma, temperature=args.temperature)
        built = build_model(copy.deepcopy(cfg))
        assert len(built.tokenizer) == len(probe)
        return built, cfg

    built, cfg = build(0)
    tokenizer = task_tokenizer(built.tokenizer)
    records = {s: json.loads(i.read_text(encoding="utf-8")) for s, i in indices.items()}
    encoder_state = stage0_encoder(built.model.vision, lambda x: encode_views(built.model, x),
                                   indices["val"], out, slicer, args, cfg)
    frozen = {k: v.clone() for k, v in built.model.vision.state_dict().items()}
    features = {}
    for split in ("train", "test"):
        names = sorted({r["image"] for r in records[split]})
        feats = encode_images(lambda x: encode_views(built.model, x), names,
                              indices[split].parent, slicer, desc=f"encode {split}",
                              quiet=args.quiet)
        features[split] = Records(indices[split], tokenizer, slicer, feats)
    chance = dict(task.CHANCE)
    variants = VARIANTS + (ABLATION if args.ablation else ())
    trained = [v for v in variants if v != "slime-all-local"]
    rows, stages_log = [], [encoder_state]
    for seed in range(args.seeds):
        for variant in trained:
            built, _ = build(seed)
            built.model.vision.load_state_dict(frozen)
            built.model.vision.requires_grad_(False).eval()
            roles = {k: v for k, v in built.roles.items()}
            stages_log += train_variant(built.model, roles, variant_stages(
                variant, tuple(args.steps), args.lr), features["train"], args, seed, variant)
            views = {"global-only": "global", "local-only": "local"}.get(variant, "both")
            evals = [(variant, None)] + ([("slime-all-local", 1.0)] if variant == "slime" else [])
            for name, gamma in evals:
                result = evaluate(built.model, features["test"], tokenizer, views=views,
                                  router_gamma=gamma, batch_size=32)
                rows += summarise(result, variant=name, seed=seed)
    report = {"rows": rows, "chance": chance, "stages": stages_log,
              "seconds": time.perf_counter() - t_start, "commit": commit, "args": vars(args),
              "variants": list(variants)}
    write_outputs(report, out)
    return report


if __name__ == "__main__":
    main()
