"""The full SliME model: a Hugging Face vision encoder, the SliME adapter and a causal LLM.

The LLM is used unchanged through ``inputs_embeds``: image placeholders in the prompt are replaced
by the adapter's visual tokens (:func:`slime_adapters.splice.splice_into_embeddings`); nothing of
the LLM is patched. The vision encoder runs once per batch on every view (global views and tiles
together) and its layer ``feature_layer`` (−2 by default, as LLaVA) without the CLS token feeds the
adapter.

Legend (for the shapes below)::

    v  views (global views and tiles together)    s  vision tokens per view    dv vision width
    b  images / prompts in the batch              t  prompt tokens             dl LLM width

A saved model (:meth:`SliMEForCausalLM.save_pretrained`) is a folder::

    slime.json     format version, token ids, feature_layer, drop_cls, the build config, extra
    vision/        the vision encoder (Hugging Face save_pretrained, safetensors)
    llm/           the causal LM (with LoRA: the base LM, LoRA layers removed)
    llm_lora/      the peft LoRA adapter (only with LoRA)
    adapter/       the SliME adapter (slime_adapters.save_module)
    tokenizer/     the tokenizer (when one was given)

written into a temporary sibling folder and renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recipes.model_folder import (
    FORMAT,
    FORMAT_VERSION,
    SLIME_JSON,
    fresh_sibling,
    load_complete,
    quiet_transformers,
    read_slime_json,
    replace_folder,
)
from slime_adapters import __version__
from slime_adapters.adapter import SliMEVisualAdapter, VisualTokens
from slime_adapters.checkpoint import load_module, save_module
from slime_adapters.config import atomic_write_text
from slime_adapters.slicing import SlicedBatch
from slime_adapters.splice import SplicedInputs, splice_into_embeddings


class NonFiniteFeaturesError(FloatingPointError):
    """The vision encoder gave NaN or inf features; ``images`` are their batch indices."""

    def __init__(self, message: str, images: list[int]) -> None:
        super().__init__(message)
        self.images = images


def _refuse_non_finite(feats: Tensor, owner: Tensor) -> None:
    """Raise :class:`NonFiniteFeaturesError` when a view's features hold NaN or inf (one
    reduction and one host synchronisation per batch); ``owner`` (v,) maps views to images."""
    if bool(torch.isfinite(feats).all()):
        return
    bad = ~torch.isfinite(feats).flatten(1).all(dim=1)
    images = sorted({int(i) for i in owner[bad.cpu()]})
    raise NonFiniteFeaturesError(
        f"the vision encoder gave non-finite (NaN or inf) features for image(s) {images} of the "
        f"batch ({int(bad.sum())} of {bad.numel()} views); refused before they reach the "
        f"adapter: check those images' pixels and the encoder's weights", images)


@dataclass
class SliMEOutput:
    loss: Tensor | None
    logits: Tensor
    visual: VisualTokens
    spliced: SplicedInputs


class SliMEForCausalLM(nn.Module):
    """Vision encoder + :class:`SliMEVisualAdapter` + causal LM.

    Args:
        vision: a Hugging Face vision model (``CLIPVisionModel``, ``SiglipVisionModel``, ...) that
            returns ``hidden_states`` when called with ``output_hidden_states=True``.
        adapter: the SliME adapter; its vision width must equal the encoder's hidden size and its
            LLM width the LLM's embedding width.
        llm: a Hugging Face causal LM accepting ``inputs_embeds``.
        image_token_id: the prompt's image placeholder id.
        feature_layer: which hidden state feeds the adapter.
        drop_cls: drop the first (CLS) token of every view (CLIP has one, SigLIP has none).
        separator_token_id: the token whose LLM embedding separates global and local tokens
            when the adapter's separator is ``"embedding"`` (the released code uses ``","``).
        build_config: the (normalised) dict :func:`recipes.build.build_model` built this model
            from; saved in ``slime.json`` so that a run can be rebuilt and checked against it.

    Raises:
        ValueError: the adapter's LLM width differs from the LLM's embedding width, or the
            adapter's separator is ``"embedding"`` and no ``separator_token_id`` is given.
    """

    def __init__(self, *, vision: nn.Module, adapter: SliMEVisualAdapter, llm: nn.Module,
                 image_token_id: int, feature_layer: int = -2, drop_cls: bool = True,
                 separator_token_id: int | None = None,
                 build_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        emb = llm.get_input_embeddings().embedding_dim
        if emb != adapter.llm_dim:
            raise ValueError(f"adapter LLM width {adapter.llm_dim} != LLM embedding width {emb}")
        if adapter.config.separator == "embedding" and separator_token_id is None:
            raise ValueError('the adapter\'s separator is "embedding": pass separator_token_id '
                             '(e.g. the id of ",", as the released model does)')
        self.separator_token_id = separator_token_id
        self.vision, self.adapter, self.llm = vision, adapter, llm
        self.image_token_id = image_token_id
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.build_config = None if build_config is None else dict(build_config)

    def encode_views(self, pixels: Tensor) -> Tensor:
        """``(v, 3, T, T)`` normalised views → ``(v, s, dv)`` features."""
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.drop_cls else feats

    def visual_tokens(self, images: SlicedBatch, *, question_ids: Tensor | None = None,
                      question_mask: Tensor | None = None, views: str | None = None,
                      force_expert: int | None = None,
                      router_gamma: float | None = None) -> VisualTokens:
        views = views or self.adapter.config.views
        b = images.global_views.shape[0]
        dev = next(self.adapter.parameters()).device
        # One encoder call for every view this stage needs.
        needed = []
        if views != "local":
            needed.append(images.global_views)
        if views != "global":
            needed.append(images.tiles)
        feats = self.encode_views(torch.cat(needed).to(dev))
        owner = []  # the image of every view, for the error message only
        if views != "local":
            owner.append(torch.arange(b))
        if views != "global":
            owner.append(torch.repeat_interleave(torch.arange(b), images.tiles_per_image.cpu()))
        _refuse_non_finite(feats, torch.cat(owner))
        glob = feats[:b] if views != "local" else None
        tiles = feats[b if views != "local" else 0:] if views != "global" else None
        text = None
        if question_ids is not None:
            text = self.llm.get_input_embeddings()(question_ids.to(dev))
        sep = None
        if self.adapter.config.separator == "embedding":
            # through the embedding module, not its weight: under ZeRO-3 the weight is gathered
            # only while the module runs
            ids = torch.tensor([self.separator_token_id], device=dev)
            sep = self.llm.get_input_embeddings()(ids)[0]
        return self.adapter(glob, tiles, grids=images.grids, text_embeds=text,
                            separator_embeds=sep,
                            text_mask=None if question_mask is None else question_mask.to(dev),
                            views=views, force_expert=force_expert, router_gamma=router_gamma)

    def forward(self, *, images: SlicedBatch, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, question_ids: Tensor | None = None,
                question_mask: Tensor | None = None, views: str | None = None,
                force_expert: int | None = None, router_gamma: float | None = None,
                padding_side: str = "right") -> SliMEOutput:
        dev = next(self.adapter.parameters()).device
        visual = self.visual_tokens(images, question_ids=question_ids, question_mask=question_mask,
                                    views=views, force_expert=force_expert,
                                    router_gamma=router_gamma)
        input_ids = input_ids.to(dev)
        embeds = self.llm.get_input_embeddings()(input_ids)
        spliced = splice_into_embeddings(
            embeds, input_ids, self.image_token_id, visual,
            labels=None if labels is None else labels.to(dev),
            attention_mask=None if attention_mask is None else attention_mask.to(dev),
            padding_side=padding_side,
        )
        out = self.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                       position_ids=spliced.position_ids, labels=spliced.labels)
        loss = out.loss
        if loss is not None and visual.aux.aux_loss is not None:
            loss = loss + visual.aux.aux_loss
        return SliMEOutput(loss, out.logits, visual, spliced)

    @torch.no_grad()
    def generate(self, *, images: SlicedBatch, input_ids: Tensor, attention_mask: Tensor,
                 question_ids: Tensor | None = None, question_mask: Tensor | None = None,
                 views: str | None = None, router_gamma: float | None = None,
                 max_new_tokens: int = 8, visual: VisualTokens | None = None, **kwargs) -> Tensor:
        """Greedy (or ``kwargs``-configured) generation from prompts that end where the answer
        starts (right-padded, as collated); returns only the new token ids, ``(b, n_new)``.

        ``visual``: the batch's visual tokens when the caller computed them already (from
        :meth:`visual_tokens` with the same images and question), so the encoder runs once."""
        dev = next(self.adapter.parameters()).device
        if visual is None:
            visual = self.visual_tokens(images, question_ids=question_ids,
                                        question_mask=question_mask, views=views,
                                        router_gamma=router_gamma)
        input_ids = input_ids.to(dev)
        embeds = self.llm.get_input_embeddings()(input_ids)
        spliced = splice_into_embeddings(embeds, input_ids, self.image_token_id, visual,
                                         attention_mask=attention_mask.to(dev), padding_side="left",
                                         drop_padding=True)
        kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=spliced.inputs_embeds,
                                 attention_mask=spliced.attention_mask,
                                 max_new_tokens=max_new_tokens, **kwargs)

    # ---------------------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike[str], *, tokenizer=None,
                        extra: Mapping[str, Any] | None = None,
                        state_dict: Mapping[str, Tensor] | None = None) -> Path:
        """Write the whole model (and ``tokenizer``) into ``directory``, the module docstring's
        layout; ``extra`` (a JSON-ready dict: the chat template, the slicer's keywords, ...) is kept
        in ``slime.json``. ``state_dict``: this model's full state dict to write instead of the
        module's own tensors (DeepSpeed ZeRO-3 holds only partitions; it gathers them layer by
        layer into one CPU state dict on rank 0).

        Atomic: everything is written into a temporary sibling folder, which is renamed into place
        once complete; an existing ``directory`` is moved aside only then (and restored should that
        rename fail). A failure while writing leaves an existing folder untouched and removes the
        temporary one.

        Returns:
            ``directory`` as a :class:`~pathlib.Path`.

        Raises:
            ValueError: ``extra`` is not a JSON-serialisable mapping, the vision encoder or the
                LLM has no ``save_pretrained`` (not a Hugging Face model), or ``state_dict``
                holds keys outside ``vision.``, ``llm.`` and ``adapter.``.
            slime_adapters.CheckpointError: the adapter holds tensors on the meta device.
            OSError: the folder cannot be written.
        """
        directory = Path(directory)
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must be JSON-serialisable: {exc}") from exc
        lora = _is_peft(self.llm)
        base = self.llm.get_base_model() if lora else self.llm
        for name, part in (("vision", self.vision), ("llm", base)):
            if not callable(getattr(part, "save_pretrained", None)):
                raise ValueError(f"the {name} model ({type(part).__name__}) has no save_pretrained;"
                                 " only Hugging Face models can be saved this way")
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "slime_adapters_version": __version__,
            "image_token_id": self.image_token_id, "separator_token_id": self.separator_token_id,
            "feature_layer": self.feature_layer, "drop_cls": self.drop_cls,
            "vision_class": type(self.vision).__name__, "llm_class": type(base).__name__,
            "lora": lora, "tokenizer": tokenizer is not None,
            "config": self.build_config, "extra": extra,
        }
        parts = None if state_dict is None else _split_state(state_dict)
        given = {} if parts is None else {"vision": {"state_dict": parts["vision"]},
                                          "llm": {"state_dict": parts["llm"]}}
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_sibling(directory, "tmp")
        try:
            with quiet_transformers():
                self.vision.save_pretrained(tmp / "vision", **given.get("vision", {}))
                if lora:
                    # the base LM without peft's wrappers, loadable by any transformers user
                    base_state = (base.state_dict() if parts is None else
                                  _strip_prefix(parts["llm"], "base_model.model."))
                    base.save_pretrained(tmp / "llm", state_dict=_without_lora(base_state))
                    self.llm.save_pretrained(tmp / "llm_lora", **given.get("llm", {}))
                else:
                    base.save_pretrained(tmp / "llm", **given.get("llm", {}))
            adapter = self.adapter
            if parts is not None:  # a copy holding the given tensors
                adapter = SliMEVisualAdapter.from_config(self.adapter.config, device="meta")
                adapter.load_state_dict(parts["adapter"], assign=True)
            save_module(adapter, tmp / "adapter")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            atomic_write_text(tmp / SLIME_JSON, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            replace_folder(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *,
                        lora_trainable: bool = False) -> tuple[SliMEForCausalLM, Any]:
        """Load a folder written by :meth:`save_pretrained`.

        Args:
            directory: the saved folder.
            lora_trainable: with a LoRA model, load the LoRA weights as trainable (for further
                training) instead of frozen (for inference).

        Returns:
            ``(model, tokenizer)``: the model in eval mode, in the dtypes it was saved in; the
            tokenizer is ``None`` when none was saved.

        Raises:
            FileNotFoundError: the folder, its ``slime.json`` or one of its parts is missing.
            ValueError: ``slime.json`` is invalid (names the key), a part is incomplete, or a
                saved class is not a transformers class.
        """
        directory = Path(directory)
        meta = read_slime_json(directory)
        parts = ["vision", "llm", "adapter"] + ["llm_lora"] * meta["lora"]
        parts += ["tokenizer"] * meta["tokenizer"]
        for part in parts:
            if not (directory / part).is_dir():
                raise FileNotFoundError(
                    f"{str(directory)!r}: the saved model's part {part}/ is missing")
        import transformers

        classes = {}
        for key in ("vision_class", "llm_class"):
            klass = getattr(transformers, meta[key], None)
            if not (isinstance(klass, type) and hasattr(klass, "from_pretrained")):
                raise ValueError(f"{str(directory / SLIME_JSON)!r}: {key} {meta[key]!r} is not a "
                                 "transformers model class")
            classes[key] = klass
        with quiet_transformers():
            vision = load_complete(classes["vision_class"], directory / "vision")
            llm = load_complete(classes["llm_class"], directory / "llm")
            if meta["lora"]:
                from peft import PeftModel

                llm = PeftModel.from_pretrained(llm, directory / "llm_lora",
                                                is_trainable=lora_trainable)
            tokenizer = None
            if meta["tokenizer"]:
                tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "tokenizer")
        adapter = load_module(directory / "adapter")
        model = cls(vision=vision, adapter=adapter, llm=llm, image_token_id=meta["image_token_id"],
                    feature_layer=meta["feature_layer"], drop_cls=meta["drop_cls"],
                    separator_token_id=meta["separator_token_id"], build_config=meta["config"])
        return model.eval(), tokenizer


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without peft installed no model can be a peft model
        return False
    return isinstance(module, PeftModel)


def _split_state(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A whole model's state dict as ``{"vision": ..., "llm": ..., "adapter": ...}``."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "llm": {}, "adapter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts or not rest:
            raise ValueError(f"state_dict key {key!r} belongs to no part (vision., llm., adapter.)")
        parts[head][rest] = value
    return parts


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _without_lora(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A peft-wrapped model's state dict with the LoRA tensors dropped and the wrapped layers'
    ``base_layer`` names restored to the plain model's."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value
    return out
