"""What :class:`~slime_adapters.hf.SliMEForConditionalGeneration` returns, and the streamer
wrapper its ``generate`` uses.

Shapes: ``b`` prompts, ``t'`` tokens of the spliced sequence (see :mod:`.modeling_slime`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from transformers.utils import ModelOutput

__all__ = ["PromptStreamer", "SliMEOutput"]


@dataclass
class SliMEOutput(ModelOutput):
    """What :meth:`SliMEForConditionalGeneration.forward` returns (subscriptable by name, as
    every ``ModelOutput``; ``None`` fields are left out of ``to_tuple()``).

    loss: LM loss plus the adapter's auxiliary (load-balancing) loss, when ``labels`` are given.
    lm_loss, aux_loss: the two parts.
    logits: ``(b, t', vocab)`` over the spliced sequence.
    cache: the KV cache (transformers 5 names ``past_key_values`` ``cache``).
    hidden_states, attentions: the LLM's, when asked for.
    attention_mask: ``(b, t')`` the spliced sequence's mask (what the logits line up with).
    labels: ``(b, t')`` the spliced labels (``-100`` at visual tokens and padding).
    visual_lengths: ``(b,)`` visual tokens each image put into the sequence.
    local_offered, local_kept: ``(b,)`` local tokens offered to / kept by the router.
    router_keep_rate: ``(b,)`` ``local_kept / local_offered`` (float32).
    gate_mean: ``(2,)`` mean MoE gate per expert (MLP, query expert) over the batch.
    """

    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    logits: Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    attention_mask: Tensor | None = None
    labels: Tensor | None = None
    visual_lengths: Tensor | None = None
    local_offered: Tensor | None = None
    local_kept: Tensor | None = None
    router_keep_rate: Tensor | None = None
    gate_mean: Tensor | None = None


class PromptStreamer:
    """Hands a streamer the prompt as the caller gave it (placeholders, not the spliced ids)."""

    def __init__(self, streamer, prompt: Tensor) -> None:
        self.streamer, self.prompt, self.first = streamer, prompt, True

    def put(self, value: Tensor) -> None:
        if self.first:
            self.first = False
            value = self.prompt
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()
