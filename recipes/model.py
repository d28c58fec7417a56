"""The full SliME model: a Hugging Face vision encoder, the SliME adapter and a causal LLM.

The LLM is used unchanged through ``inputs_embeds``: image placeholders in the prompt are replaced
by the adapter's visual tokens (:func:`slime_adapters.splice.splice_into_embeddings`); nothing of
the LLM is patched. The vision encoder runs once per batch on every view (global views and tiles
together) and its layer ``feature_layer`` (−2 by default, as LLaVA) without the CLS token feeds the
adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slime_adapters.adapter import SliMEVisualAdapter, VisualTokens
from slime_adapters.slicing import SlicedBatch
from slime_adapters.splice import SplicedInputs, splice_into_embeddings


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
    """

    def __init__(self, *, vision: nn.Module, adapter: SliMEVisualAdapter, llm: nn.Module,
                 image_token_id: int, feature_layer: int = -2, drop_cls: bool = True,
                 separator_token_id: int | None = None) -> None:
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
        glob = feats[:b] if views != "local" else None
        tiles = feats[b if views != "local" else 0:] if views != "global" else None
        text = None
        if question_ids is not None:
            text = self.llm.get_input_embeddings()(question_ids.to(dev))
        sep = None
        if self.adapter.config.separator == "embedding":
            sep = self.llm.get_input_embeddings().weight[self.separator_token_id]
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
                 max_new_tokens: int = 8, **kwargs) -> Tensor:
        """Greedy (or ``kwargs``-configured) generation from prompts that end where the answer
        starts (right-padded, as collated); returns only the new token ids."""
        dev = next(self.adapter.parameters()).device
        visual = self.visual_tokens(images, question_ids=question_ids, question_mask=question_mask,
                                    views=views, router_gamma=router_gamma)
        input_ids = input_ids.to(dev)
        embeds = self.llm.get_input_embeddings()(input_ids)
        spliced = splice_into_embeddings(embeds, input_ids, self.image_token_id, visual,
                                         attention_mask=attention_mask.to(dev), padding_side="left",
                                         drop_padding=True)
        kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=spliced.inputs_embeds,
                                 attention_mask=spliced.attention_mask,
                                 max_new_tokens=max_new_tokens, **kwargs)
