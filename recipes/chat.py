"""Answer a question about an image with a saved SliME model.

::

    python -m recipes.chat --model DIR --image PATH --question "what color is the square ?"
        [--max-new-tokens N] [--template NAME] [--router-gamma G] [--device cpu] [--verbose]

prints the answer on stdout (``--verbose`` adds, on stderr, the visual-token count and the share of
local tokens the router kept). ``DIR`` is a saved model folder (a training run's ``final/``,
written by :func:`recipes.model_folder.save_model_folder`: a standard Hugging Face folder). The chat
template is ``--template``, else the one saved with the model's processor, else ``qa``; the slicer
is the saved one (``config.slicer_config``), its tile size the encoder's image size. A missing or damaged model folder (any file it must hold missing, truncated or
invalid), a missing or unreadable image or an unknown template prints one line on stderr and exits
with status 2.

For programmatic use: :func:`answer` returns the answer as a string, :func:`respond` returns it
with the token ids and the visual-token counts.

Shapes: one image and one question at a time; ``(1, t)`` prompt ids, ``(1, n_new)`` new ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.model_folder import load_model_folder
from recipes.templates import IMAGE_TOKEN, ChatTemplate, get_template
from slime_adapters import AdaptiveSlicer, SlicedImage, SlicerConfig, collate

__all__ = ["ChatAnswer", "answer", "generation_inputs", "load_chat_model", "main", "respond",
           "slicer_for"]


@dataclasses.dataclass(frozen=True)
class ChatAnswer:
    """One answer and how it was produced."""

    text: str  # the answer, decoded without special tokens, stripped
    token_ids: list[int]  # the generated ids up to (without) the first stop token
    generated_ids: list[int]  # every generated id, the stop token included
    visual_tokens: int  # visual tokens the LLM saw (global + separator + kept local)
    local_offered: int | None  # local tokens offered to the router (None: global view only)
    local_kept: int | None  # local tokens the router kept

    @property
    def router_keep_rate(self) -> float | None:
        """``local_kept / local_offered`` (``None`` without local tokens)."""
        if not self.local_offered:
            return None
        return self.local_kept / self.local_offered


def slicer_for(model, saved: Mapping[str, Any] | None = None) -> AdaptiveSlicer:
    """The slicer of a model: its config's ``slicer_config`` (the encoder's tile size, mean and
    std) with the keywords of ``saved`` (e.g. a training configuration's ``data.slicer``) over it.

    Raises:
        ValueError: ``saved`` is not a mapping, or holds keywords the slicer refuses.
    """
    if saved is not None and not isinstance(saved, Mapping):
        raise ValueError(f"the saved slicer must be a dict of AdaptiveSlicer keywords, got "
                         f"{type(saved).__name__}")
    kwargs = {**(getattr(model.config, "slicer_config", None) or {}), **(saved or {})}
    unknown = sorted(set(kwargs) - set(SlicerConfig.__dataclass_fields__) - {"kind"})
    if unknown:
        raise ValueError(f"the saved slicer keywords {sorted(kwargs)} do not fit AdaptiveSlicer: "
                         f"unknown {unknown}")
    try:
        return AdaptiveSlicer.from_config(SlicerConfig.from_dict(kwargs))
    except TypeError as exc:  # an unknown keyword
        raise ValueError(f"the saved slicer keywords {sorted(kwargs)} do not fit AdaptiveSlicer: "
                         f"{exc}") from exc


def _conversation(question: str) -> list[dict[str, str]]:
    value = question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
    return [{"from": "human", "value": value}]


@torch.no_grad()
def respond(model, tokenizer, image: Any, question: str, *,
            template: str | ChatTemplate = "qa", slicer: AdaptiveSlicer | None = None,
            max_new_tokens: int = 32, router_gamma: float | None = None,
            views: str | None = None, force_expert: int | None = None) -> ChatAnswer:
    """Answer ``question`` about ``image`` with greedy decoding.

    Args:
        model: a SliME model (put in eval mode here).
        tokenizer: its tokenizer.
        image: anything :class:`~slime_adapters.AdaptiveSlicer` takes (a path, PIL image, bytes,
            uint8 tensor) or an already sliced :class:`~slime_adapters.SlicedImage`.
        question: the question; ``<image>`` is put before it unless it holds the placeholder.
        template: a template name (:func:`recipes.templates.get_template`) or template.
        slicer: default :func:`slicer_for` ``(model)``.
        max_new_tokens: at most this many tokens are generated.
        router_gamma: overrides the router's γ.
        views, force_expert: override the adapter's (a model saved after stage I was trained on
            global views only; :func:`stage_settings` gives what the saved stage used).

    Returns:
        :class:`ChatAnswer`.

    Raises:
        ValueError: ``max_new_tokens`` < 1, a prompt whose text, visual tokens and
            ``max_new_tokens`` exceed the LLM's ``max_position_embeddings``, an image the slicer
            refuses
            (:class:`~slime_adapters.SlicingError`), or a prompt the template refuses
            (:class:`recipes.templates.TemplateError`, an unknown template name included).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    template = get_template(template) if isinstance(template, str) else template
    ids, question_ids, question_mask = generation_inputs(
        template, tokenizer, _conversation(question), image_token_of(model, tokenizer))
    sliced = image if isinstance(image, SlicedImage) else (slicer or slicer_for(model))(image)
    model.eval()
    images = collate([sliced])
    visual = model.get_visual_tokens(images=images, question_ids=question_ids,
                                     question_mask=question_mask, router_gamma=router_gamma,
                                     views=views, force_expert=force_expert)
    _check_length(model, ids[0].tolist(), int(visual.lengths[0]), max_new_tokens)
    stops = template.stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         visual_tokens=visual, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stops, pad_token_id=pad)
    generated = new[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    kept = generated[:cut]
    aux = visual.aux
    return ChatAnswer(
        text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
        token_ids=kept, generated_ids=generated, visual_tokens=int(visual.lengths[0]),
        local_offered=None if aux.num_local is None else int(aux.num_local[0]),
        local_kept=None if aux.num_kept is None else int(aux.num_kept[0]))


def _check_length(model, ids: list[int], visual: int, new: int) -> None:
    """Refuse a prompt whose text, visual tokens and answer exceed the LLM's positions."""
    limit = getattr(getattr(model.llm, "config", None), "max_position_embeddings", None)
    text = sum(t != model.config.image_token_id for t in ids)
    if isinstance(limit, int) and text + visual + new > limit:
        raise ValueError(f"the prompt needs {text} text + {visual} visual tokens + "
                         f"{new} new tokens = {text + visual + new}, more than the LLM's {limit} "
                         f"positions (max_position_embeddings); shorten the question, lower "
                         f"--max-new-tokens or use fewer tiles")


def generation_inputs(template: ChatTemplate, tokenizer, conversation: Sequence[Mapping[str, str]],
                      image_token: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt ids ``(1, t)`` of ``conversation`` (ending with the human turn to answer) and the
    router's question ids and mask ``(1, l)``: the template's ``question_ids``, the same text
    training gives the router (:mod:`recipes.templates`).

    Raises:
        TemplateError: the template refuses the conversation.
    """
    enc = template.encode(tokenizer, conversation, for_generation=True, image_token=image_token)
    # a question with no text (the template took it all) routes as "no text": keep everything
    q = enc.question_ids or [tokenizer.pad_token_id or 0]
    return (torch.tensor([enc.input_ids]), torch.tensor([q]),
            torch.tensor([[bool(enc.question_ids)] * len(q)]))


def answer(model, tokenizer, image: Any, question: str, **kwargs) -> str:
    """:func:`respond`'s answer text (same arguments and errors)."""
    return respond(model, tokenizer, image, question, **kwargs).text


def image_token_of(model, tokenizer) -> str:
    """The token string of the model's image placeholder (``config.image_token_id``)."""
    return tokenizer.convert_ids_to_tokens(model.config.image_token_id)


def stage_settings(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``views``, ``router_gamma`` and ``force_expert`` of the stage a saved model was trained in
    (``extra["stage"]``, from the config's ``training_stage``; ``None`` for what it left unset)."""
    stage = extra.get("stage") if isinstance(extra, Mapping) else None
    stage = stage if isinstance(stage, Mapping) else {}
    return {k: stage.get(k) for k in ("views", "router_gamma", "force_expert")}


def load_chat_model(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Load a saved model for chatting.

    Returns:
        ``(model, tokenizer, extra)``: the model in eval mode on ``device``, its tokenizer and
        what the folder says about its training: ``template`` (the processor's chat format),
        ``slicer`` (the slicer keywords) and ``stage`` (the training stage, or None).

    Raises:
        FileNotFoundError: the folder or a file it must hold is missing.
        ValueError: a damaged file (named), or a model saved without its processor.
    """
    model, processor = load_model_folder(directory)
    if processor is None:
        raise ValueError(f"{str(directory)!r} was saved without a processor (tokenizer); chat "
                         "needs one")
    extra = {"template": processor.template, "slicer": model.config.slicer_config,
             "stage": model.config.training_stage}
    return model.to(device).eval(), processor.tokenizer, extra


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slime-chat",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder (training's final/)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--template", default=None,
                        help="chat template (default: the one saved with the model, else plain)")
    parser.add_argument("--router-gamma", type=float, default=None,
                        help="the router's γ in (0, 1] (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the visual-token count and the router's keep rate")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.router_gamma is not None and not 0 < args.router_gamma <= 1:
        parser.error(f"--router-gamma must be in (0, 1], got {args.router_gamma}")

    def fail(message: str) -> int:
        print(f"chat: error: {message}", file=sys.stderr)
        return 2

    if not Path(args.model).is_dir():
        return fail(f"model folder {args.model!r} does not exist")
    if not Path(args.image).is_file():
        return fail(f"image {args.image!r} does not exist")
    try:
        model, tokenizer, extra = load_chat_model(args.model, device=args.device)
        template = get_template(args.template or extra.get("template") or "qa")
        template.encode(tokenizer, _conversation(args.question), for_generation=True,
                        image_token=image_token_of(model, tokenizer))
        template.stop_token_ids(tokenizer)  # a template whose stop text the tokenizer lacks
        sliced = slicer_for(model, extra.get("slicer"))(args.image)
    except (FileNotFoundError, ValueError) as exc:  # SlicingError and TemplateError included
        return fail(str(exc))
    settings = stage_settings(extra)  # the trained stage's views and routing, unless overridden
    if args.router_gamma is not None:
        settings["router_gamma"] = args.router_gamma
    try:
        result = respond(model, tokenizer, sliced, args.question, template=template,
                         max_new_tokens=args.max_new_tokens, **settings)
    except ValueError as exc:  # a prompt longer than the LLM's positions
        return fail(str(exc))
    print(result.text)
    if args.verbose:
        rate = result.router_keep_rate
        local = ("global view only" if result.local_offered is None else
                 f"router kept {result.local_kept} of {result.local_offered} local tokens "
                 f"({100 * rate:.1f}%)" if rate is not None else "no local tokens")
        print(f"visual tokens: {result.visual_tokens}; {local}; template {template.name}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
