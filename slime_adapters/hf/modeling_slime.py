"""``SliMEForConditionalGeneration``: vision encoder + SliME adapter + causal LM, as a
Hugging Face ``PreTrainedModel`` with ``generate``.

The LLM runs unchanged through ``inputs_embeds``: each image placeholder of ``input_ids`` (one
token per image, ``config.image_token_id``) is replaced by that image's visual tokens
(:func:`slime_adapters.splice_into_embeddings`), whose number the text-guided router decides while
the model runs. The vision encoder runs once per batch on every view the call needs (global views
and tiles together); its hidden state ``config.feature_layer``, without the CLS token when
``config.drop_cls``, feeds the adapter.

Legend (for the shapes below)::

    b  images / prompts     t  prompt tokens (one placeholder per image)     t' after splicing
    P  tiles of the batch   T  tile side in pixels    s  encoder tokens per view
    l  question tokens      dv vision width           dl LLM width

Image inputs (what :class:`~slime_adapters.hf.SliMEImageProcessor` returns): ``pixel_values``
``(b, 3, T, T)`` global views, ``tile_pixel_values`` ``(P, 3, T, T)`` every image's tiles in
row-major order, image after image, and ``image_grids`` ``(b, 2)`` ``(cols, rows)``; or
``images``, a :class:`slime_adapters.SlicedBatch` holding the three.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from slime_adapters.adapter import SliMEVisualAdapter, VisualTokens
from slime_adapters.hf.configuration_slime import SliMEConfig
from slime_adapters.hf.outputs import PromptStreamer, SliMEOutput
from slime_adapters.splice import splice_into_embeddings

__all__ = ["SliMEForConditionalGeneration", "SliMEOutput", "SliMEPreTrainedModel"]


def _part(mapping, config) -> nn.Module:
    """The encoder or the LLM a sub-config describes, built by its class's constructor: inside
    the composite's own construction (``from_pretrained``'s meta device or DeepSpeed's
    ``zero.Init``) rather than through ``from_config``, which would open contexts of its own.

    Raises:
        ValueError: no transformers model class for the config (e.g. a ``text_config`` that is
            not a causal LM's).
    """
    try:
        klass = mapping[type(config)]
    except KeyError:
        kind = "causal LM" if mapping is MODEL_FOR_CAUSAL_LM_MAPPING else "model"
        raise ValueError(f"transformers has no {kind} class for a {type(config).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})") from None
    return klass(config)


def _whole_adapter(config: SliMEConfig) -> SliMEVisualAdapter:
    """The adapter, built whole even inside DeepSpeed's ``zero.Init`` (ZeRO-3 loading): its
    modules initialise their weights in their constructors, which partitioned tensors cannot
    take. DeepSpeed's ``initialize`` partitions it later with the rest, as any module built
    outside ``zero.Init``; DeepSpeed's own ``shutdown_init_context`` is meant for this."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and getattr(zero, "top_level_context", None) is not None
    if active:
        zero.shutdown_init_context()
    try:
        return SliMEVisualAdapter.from_config(config.adapter())
    finally:
        if active:
            zero.restore_init_context()


class SliMEPreTrainedModel(PreTrainedModel):
    config_class = SliMEConfig
    config: SliMEConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # the vision encoder's and the LLM's own layers are added by post_init
    _no_split_modules = ["SliMEVisualAdapter"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the number of visual tokens is data-dependent (the router decides it)
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder and the LLM initialise themselves (post_init dispatches to their own
        # _init_weights); the adapter's modules have their own rule (reset_parameters).
        if module is getattr(self, "adapter", None):
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()


class NonFiniteFeaturesError(FloatingPointError):
    """The vision encoder gave NaN or inf features; ``images`` lists the batch indices of the
    images whose views hold them."""

    def __init__(self, message: str, *, images: list[int]):
        super().__init__(message)
        self.images = images


class SliMEForConditionalGeneration(SliMEPreTrainedModel, GenerationMixin):
    """The full SliME model. ``SliMEForConditionalGeneration(config)`` builds every part from
    its config (random weights); ``vision``, ``llm`` and ``adapter`` hand in parts already built
    (loaded weights; the config must describe them).

    Raises:
        ValueError: a handed-in part contradicts the config (widths, vocabulary).
    """

    def __init__(self, config: SliMEConfig, *, vision: nn.Module | None = None,
                 llm: nn.Module | None = None, adapter: SliMEVisualAdapter | None = None) -> None:
        # parts built already keep the attention implementation they were built with (the
        # composite config's would otherwise be written over their configs, shared with it)
        attn = {id(p): p.config._attn_implementation for p in (vision, llm)
                if p is not None and hasattr(p, "config")}
        super().__init__(config)
        given = [p for p in (vision, llm, adapter) if p is not None]
        for part in (vision, llm):
            if part is not None and attn.get(id(part)) is not None:
                part.config._attn_implementation = attn[id(part)]
        self.vision = vision if vision is not None else _part(MODEL_MAPPING, config.vision_config)
        self.llm = llm if llm is not None else _part(MODEL_FOR_CAUSAL_LM_MAPPING,
                                                     config.text_config)
        self.adapter = adapter if adapter is not None else _whole_adapter(config)
        emb = self.llm.get_input_embeddings()
        if emb.embedding_dim != self.adapter.llm_dim:
            raise ValueError(f"the adapter's LLM width {self.adapter.llm_dim} differs from the "
                             f"LLM's embedding width {emb.embedding_dim}")
        for name in ("image_token_id", "separator_token_id"):
            value = getattr(config, name)
            if value is not None and value >= emb.num_embeddings:
                raise ValueError(f"config.{name} {value} is outside the LLM's embedding table "
                                 f"({emb.num_embeddings} rows)")
        for part in given:  # weights already set: post_init must not draw new ones
            for module in part.modules():
                module._is_hf_initialized = True
        self.post_init()

    # ------------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    # ------------------------------------------------------------------------ visual tokens
    def encode_views(self, pixels: Tensor) -> Tensor:
        """``(v, 3, T, T)`` normalised views → ``(v, s, dv)`` features of ``config.feature_layer``
        (:meth:`get_visual_tokens` checks that they are finite)."""
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer]
        return feats[:, 1:] if self.config.drop_cls else feats

    @staticmethod
    def _image_inputs(images, pixel_values, tile_pixel_values, image_grids):
        if images is not None:
            return images.global_views, images.tiles, images.grids
        return pixel_values, tile_pixel_values, image_grids

    def get_visual_tokens(self, pixel_values: Tensor | None = None,
                          tile_pixel_values: Tensor | None = None,
                          image_grids: Tensor | None = None, *, images=None,
                          question_ids: Tensor | None = None,
                          question_mask: Tensor | None = None,
                          text_embeds: Tensor | None = None, text_mask: Tensor | None = None,
                          views: str | None = None, force_expert: int | None = None,
                          router_gamma: float | None = None) -> VisualTokens:
        """The adapter's visual tokens for a batch of sliced images (one encoder call).

        The router reads ``question_ids`` (``(b, l)``, masked by ``question_mask``) through the
        LLM's embeddings, or ``text_embeds`` / ``text_mask`` when given instead.

        Raises:
            ValueError: an input the chosen views need is missing, or shapes disagree.
            NonFiniteFeaturesError: non-finite vision features, naming the images and a view.
        """
        pixel_values, tiles, grids = self._image_inputs(images, pixel_values, tile_pixel_values,
                                                        image_grids)
        views = views or self.adapter.config.views
        dev = self.get_input_embeddings().weight.device
        needed, names = [], []
        if views != "local":
            if pixel_values is None:
                raise ValueError(f"views={views!r} needs pixel_values (b, 3, T, T), the global "
                                 "views")
            needed.append(pixel_values)
            names += [("global view", i) for i in range(pixel_values.shape[0])]
        if views != "global":
            if tiles is None or grids is None:
                raise ValueError(f"views={views!r} needs tile_pixel_values (P, 3, T, T) and "
                                 "image_grids (b, 2)")
            needed.append(tiles)
        feats = self.encode_views(torch.cat([x.to(dev) for x in needed]))
        b = len(names)
        glob = feats[:b] if views != "local" else None
        tile_feats = feats[b:] if views != "global" else None
        self._check_finite(feats, b, grids if views != "global" else None)
        if text_embeds is None and question_ids is not None:
            text_embeds = self.get_input_embeddings()(question_ids.to(dev))
            text_mask = question_mask
        sep = None
        if self.adapter.config.separator == "embedding":
            # through the embedding module, not its weight: under ZeRO-3 the weight is gathered
            # only while the module runs
            ids = torch.tensor([self.config.separator_token_id], device=dev)
            sep = self.get_input_embeddings()(ids)[0]
        return self.adapter(glob, tile_feats, grids=grids, text_embeds=text_embeds,
                            separator_embeds=sep,
                            text_mask=None if text_mask is None else text_mask.to(dev).bool(),
                            views=views, force_expert=force_expert, router_gamma=router_gamma)

    @staticmethod
    def _check_finite(feats: Tensor, num_global: int, grids: Tensor | None) -> None:
        """One reduction and one host read per batch; names the bad images and the first view."""
        bad = ~torch.isfinite(feats).flatten(1).all(1)
        if not bool(bad.any()):
            return
        # the image of every view: global views first, then each image's tiles in order
        owner = torch.arange(num_global, device=bad.device)
        if grids is not None and feats.shape[0] > num_global:
            tiles = torch.as_tensor(grids, device=bad.device).long().prod(1)
            images = torch.arange(tiles.shape[0], device=bad.device)
            owner = torch.cat([owner, torch.repeat_interleave(images, tiles)])
        images = sorted(set(owner[bad].tolist()))
        view = int(bad.nonzero()[0, 0])
        if view < num_global:
            where = f"image {view} of the batch (its global view)"
        else:
            tiles = torch.as_tensor(grids).long().prod(1).cumsum(0)
            tile = view - num_global
            image = int((tiles <= tile).sum())
            first = int(tiles[image - 1]) if image else 0
            where = f"image {image} of the batch (its tile {tile - first})"
        raise NonFiniteFeaturesError(
            f"the vision encoder's features of {where} are not finite (NaN or inf); image(s) "
            f"{images} of the batch are affected: check their pixels and the encoder's weights",
            images=images)

    def _router_text(self, input_ids, attention_mask, labels):
        """``(text_embeds, text_mask)`` for the router under ``config.router_text``, or
        ``(None, None)`` to let the question ids speak."""
        if self.config.router_text == "question":
            return None, None
        mask = input_ids != self.config.image_token_id
        if attention_mask is not None:
            mask &= attention_mask.bool()
        if labels is not None and self.config.router_text == "prompt":
            mask &= labels == -100  # the answers do not steer the router ("released": they do)
        return self.get_input_embeddings()(input_ids), mask

    # ------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                tile_pixel_values: Tensor | None = None, image_grids: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache=None, inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                question_ids: Tensor | None = None, question_mask: Tensor | None = None,
                images=None, views: str | None = None, force_expert: int | None = None,
                router_gamma: float | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, padding_side: str = "right",
                visual_tokens: VisualTokens | None = None, **kwargs) -> SliMEOutput:
        """Logits (and, with ``labels``, the loss) for prompts with one placeholder per image.

        Without image inputs this is the LLM's own forward (text only, or a generation step
        after the first). ``visual_tokens``: the batch's tokens when the caller computed them
        already (:meth:`get_visual_tokens`), so the encoder does not run again.

        Raises:
            ValueError: placeholders without images (or the other way round), or shapes that do
                not agree.
            NonFiniteFeaturesError: non-finite vision features, naming the images.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        has_images = visual_tokens is not None or images is not None or any(
            x is not None for x in (pixel_values, tile_pixel_values))
        dev = self.get_input_embeddings().weight.device
        visual = spliced = None
        if has_images:
            if input_ids is None:
                raise ValueError("image inputs need input_ids holding one image placeholder "
                                 f"(id {self.config.image_token_id}) per image")
            input_ids = input_ids.to(dev)
            am = None if attention_mask is None else attention_mask.to(dev)
            lab = None if labels is None else labels.to(dev)
            visual = visual_tokens
            if visual is None:
                text, text_mask = self._router_text(input_ids, am, lab)
                visual = self.get_visual_tokens(
                    pixel_values, tile_pixel_values, image_grids, images=images,
                    question_ids=question_ids, question_mask=question_mask, text_embeds=text,
                    text_mask=text_mask, views=views, force_expert=force_expert,
                    router_gamma=router_gamma)
            embeds = self.get_input_embeddings()(input_ids)
            spliced = splice_into_embeddings(embeds, input_ids, self.config.image_token_id,
                                             visual, labels=lab, attention_mask=am,
                                             padding_side=padding_side)
            inputs_embeds, attention_mask = spliced.inputs_embeds, spliced.attention_mask
            position_ids, labels, input_ids = spliced.position_ids, spliced.labels, None
        elif input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            found = int((input_ids == self.config.image_token_id).sum())
            if found:
                raise ValueError(f"input_ids hold {found} image placeholder(s) (id "
                                 f"{self.config.image_token_id}) but no image inputs were given "
                                 "(pixel_values / tile_pixel_values / images)")
        out = self.llm(input_ids=input_ids, inputs_embeds=inputs_embeds,
                       attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                       **kwargs)
        return self._output(out, visual, attention_mask if spliced is not None else None,
                            labels if spliced is not None else None)

    @staticmethod
    def _output(out, visual: VisualTokens | None, attention_mask, labels) -> SliMEOutput:
        lm_loss = out.loss
        aux = None if visual is None else visual.aux.aux_loss
        loss = lm_loss
        if loss is not None and aux is not None:
            loss = loss + aux.to(loss.dtype)
        fields = {}
        if visual is not None:
            a = visual.aux
            fields["visual_lengths"] = visual.lengths
            if a.num_local is not None:
                fields["local_offered"], fields["local_kept"] = a.num_local, a.num_kept
                fields["router_keep_rate"] = a.num_kept.float() / a.num_local.clamp(min=1).float()
            if a.moe is not None:
                fields["gate_mean"] = a.moe.gate_mean
        return SliMEOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux if loss is not None else None,
                           logits=out.logits, cache=getattr(out, "cache", None),
                           hidden_states=out.hidden_states, attentions=out.attentions,
                           attention_mask=attention_mask, labels=labels, **fields)

    # ----------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                 tile_pixel_values: Tensor | None = None, image_grids: Tensor | None = None,
                 attention_mask: Tensor | None = None, question_ids: Tensor | None = None,
                 question_mask: Tensor | None = None, images=None, views: str | None = None,
                 force_expert: int | None = None, router_gamma: float | None = None,
                 visual_tokens: VisualTokens | None = None, streamer=None, **kwargs):
        """:meth:`transformers.GenerationMixin.generate` for prompts with image placeholders.

        The encoder and the adapter run once; the spliced prompt goes to the LLM as
        ``inputs_embeds`` and every later step uses the KV cache. Greedy search, sampling, beam
        search, ``num_return_sequences`` and streamers work as for any causal LM. Prompts may
        be left- or right-padded (padding is dropped before splicing). Returns what
        ``GenerationMixin.generate`` returns, the sequences being the prompt ``input_ids`` as
        given followed by the new tokens.
        """
        has_images = visual_tokens is not None or images is not None or any(
            x is not None for x in (pixel_values, tile_pixel_values))
        if not has_images:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask,
                                    streamer=streamer, **kwargs)
        if input_ids is None:
            raise ValueError("generate with images needs input_ids with the image placeholders")
        dev = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(dev)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None
                          else attention_mask.to(dev))
        visual = visual_tokens
        if visual is None:
            text, text_mask = self._router_text(input_ids, attention_mask, None)
            visual = self.get_visual_tokens(
                pixel_values, tile_pixel_values, image_grids, images=images,
                question_ids=question_ids, question_mask=question_mask, text_embeds=text,
                text_mask=text_mask, views=views, force_expert=force_expert,
                router_gamma=router_gamma)
        embeds = self.get_input_embeddings()(input_ids)
        spliced = splice_into_embeddings(embeds, input_ids, self.config.image_token_id, visual,
                                         attention_mask=attention_mask, padding_side="left",
                                         drop_padding=True)
        # the spliced prompt's ids: the placeholder id at visual positions, 0 at padding (the
        # same splice applied to the ids as a width-1 float64 "embedding": exact for any id)
        ids = splice_into_embeddings(
            input_ids.to(torch.float64)[..., None], input_ids, self.config.image_token_id,
            (torch.full((visual.packed.shape[0], 1), float(self.config.image_token_id),
                        dtype=torch.float64, device=dev), visual.lengths),
            attention_mask=attention_mask, padding_side="left", drop_padding=True,
        ).inputs_embeds[..., 0].long()
        out = super().generate(input_ids=ids, inputs_embeds=spliced.inputs_embeds,
                               attention_mask=spliced.attention_mask,
                               streamer=None if streamer is None
                               else PromptStreamer(streamer, input_ids.cpu()), **kwargs)
        sequences = out if isinstance(out, Tensor) else out.sequences
        new = sequences[:, ids.shape[1]:]
        prompt = input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, new], dim=1)
        if isinstance(out, Tensor):
            return sequences
        out.sequences = sequences
        return out
