"""The ``slime`` model for lmms-eval: a saved SliME folder answering lmms-eval's requests.

::

    lmms_eval --model slime --model_args pretrained=DIR,router_gamma=0.8,views=both,\\
        attn_implementation=sdpa,batch_size=8 --tasks TASK

``model_args``: ``pretrained`` (a saved model folder, :func:`recipes.model_folder.load_model_folder`),
``router_gamma`` (γ in (0, 1]), ``views`` (``global`` / ``local`` / ``both``),
``attn_implementation`` (``eager``, ``sdpa``, ...), ``batch_size``, ``device`` (default ``cpu``),
``dtype`` (``float32``, ``bfloat16``, ...), ``template`` (a chat format name; default the saved
one), ``max_new_tokens`` (when the task gives none; default 16). Unset settings are the saved
training stage's, as for ``slime-chat`` and ``slime-eval``.

:class:`SliMEChat` is lmms-eval's "chat" model (what ``--model slime`` gives): ``generate_until``
on the task's messages, batched. :class:`SliMESimple` (``--force_simple``) answers the "simple"
protocol: ``generate_until`` on the task's text and visuals, and ``loglikelihood`` (the
multiple-choice tasks' requests), one request per forward pass. Both decode greedily through
:func:`recipes.eval.answer_prompts`, the code behind ``slime-eval``, with images sliced by the
model's :class:`~slime_adapters.hf.SliMEImageProcessor` settings.

Not supported, each raising a clear error: sampling and beam search (lmms-eval's scores are
greedy), requests with no image or several images (the SliME prompt holds one image, whose
router reads that prompt's question), system prompts (the chat formats write their own),
multi-round generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recipes.chat import generation_inputs, image_token_of, slicer_for, stage_settings
from recipes.eval import answer_prompts
from recipes.model_folder import load_model_folder
from recipes.templates import IMAGE_TOKEN, get_template
from slime_adapters.slicing import collate

try:
    from lmms_eval.api.model import lmms as _LMMS
    from lmms_eval.utils import simple_parse_args_string
except ImportError:  # the module stays importable without the eval extra
    _LMMS = None

__all__ = ["SliMEChat", "SliMESimple"]

_GREEDY = {"temperature": (0, 0.0, None), "do_sample": (False, None), "num_beams": (1, None)}


class _Missing:
    """Stands in for lmms-eval's base class when lmms-eval is not installed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("the slime lmms-eval model needs lmms-eval: pip install "
                          "\"slime-adapters[eval]\"")


def _greedy(gen_kwargs: dict[str, Any]) -> None:
    for key, allowed in _GREEDY.items():
        if gen_kwargs.get(key) not in allowed:
            raise NotImplementedError(f"the slime model decodes greedily; the task asks for "
                                      f"{key}={gen_kwargs[key]!r}")


def _cut(text: str, until: Any) -> str:
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _one_image(visuals: Sequence[Any], where: str):
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) != 1:
        raise NotImplementedError(f"{where}: the slime model takes one image per request, got "
                                  f"{len(visuals)}")
    return visuals[0]


class SliMESimple(_LMMS or _Missing):
    """lmms-eval's simple protocol (``generate_until`` and ``loglikelihood``) over a saved
    folder; see the module docstring for ``model_args``."""

    is_simple = True

    def __init__(self, pretrained: str, router_gamma: float | None = None,
                 views: str | None = None, attn_implementation: str | None = None,
                 batch_size: int | str = 1, device: str | None = None, dtype: str | None = None,
                 template: str | None = None, max_new_tokens: int = 16, **unused: Any) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"slime: unknown model_args {sorted(unused)}")
        kwargs = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, str(dtype))
        model, processor = load_model_folder(pretrained, **kwargs)
        if processor is None:
            raise ValueError(f"slime: {pretrained!r} was saved without a processor")
        self._device = torch.device(device or "cpu")
        self.model = model.to(self._device).eval()
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.template = get_template(template or processor.template or "qa")
        self.slicer = slicer_for(model)
        settings = stage_settings({"stage": model.config.training_stage})
        if router_gamma is not None:
            if not 0 < float(router_gamma) <= 1:
                raise ValueError(f"slime: router_gamma must be in (0, 1], got {router_gamma}")
            settings["router_gamma"] = float(router_gamma)
        if views is not None:
            if views not in ("global", "local", "both"):
                raise ValueError(f"slime: views must be global, local or both, got {views!r}")
            settings["views"] = views
        self.settings = settings
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"slime: batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that ``model_args`` win over the command line's defaults
        (``batch_size=8`` in ``model_args`` with the default ``--batch_size 1``)."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------------------- generation
    def _answer(self, texts: list[str], images: list[Any], gen_kwargs: dict[str, Any]
                ) -> list[str]:
        _greedy(gen_kwargs)
        new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        got = answer_prompts(self.model, self.tokenizer, texts, images, template=self.template,
                             slicer=self.slicer, max_new_tokens=new, **self.settings)
        return [_cut(g["prediction"], gen_kwargs.get("until")) for g in got]

    def _generate(self, items: list[tuple[str, Any, dict[str, Any]]]) -> list[str]:
        """``(text, image, gen_kwargs)`` per request → answers, batched among requests with the
        same generation settings, in the requests' order."""
        from tqdm import tqdm

        out: list[str | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (_, _, gen) in enumerate(items):
            groups.setdefault(repr(sorted(gen.items())), []).append(i)
        bar = tqdm(total=len(items), desc="slime", disable=self.rank != 0)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                answers = self._answer([items[i][0] for i in part], [items[i][1] for i in part],
                                       items[part[0]][2])
                for i, a in zip(part, answers):
                    out[i] = a
                bar.update(len(part))
        bar.close()
        return out

    def generate_until(self, requests) -> list[str]:
        items = []
        for req in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            image = _one_image(doc_to_visual(doc), f"{task} doc {doc_id}")
            items.append((ctx.replace(IMAGE_TOKEN, "").strip(), image, dict(gen_kwargs)))
        return self._generate(items)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the slime model answers single-round requests only")

    # -------------------------------------------------------------------------- likelihood
    @torch.no_grad()
    def _logprob(self, text: str, image: Any, continuation: str) -> tuple[float, bool]:
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{text}"}]
        ids, qids, qmask = generation_inputs(self.template, self.tokenizer, conv,
                                             image_token_of(self.model, self.tokenizer))
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"loglikelihood: the continuation {continuation!r} has no tokens")
        full = torch.cat([ids, torch.tensor([cont])], dim=1)
        labels = torch.full_like(full, -100)
        labels[0, ids.shape[1]:] = torch.tensor(cont)
        # the visual tokens as generation makes them (the router reads the question ids)
        visual = self.model.get_visual_tokens(images=collate([self.slicer(image)]),
                                              question_ids=qids, question_mask=qmask,
                                              **self.settings)
        out = self.model(input_ids=full.to(self._device), attention_mask=torch.ones_like(full),
                         labels=labels.to(self._device), visual_tokens=visual)
        logits, spliced = out.logits[0, :-1].float(), out.labels[0, 1:]
        where = spliced != -100
        logp = torch.log_softmax(logits[where], dim=-1)
        target = spliced[where]
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ctx, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):  # output_type loglikelihood: the target of the doc
                continuation = continuation(doc)
            image = _one_image(doc_to_visual(doc), f"{task} doc {doc_id}")
            out.append(self._logprob(ctx.replace(IMAGE_TOKEN, "").strip(), image,
                                     str(continuation)))
        return out


class SliMEChat(SliMESimple):
    """lmms-eval's chat protocol: ``generate_until`` on the task's messages (one user turn: one
    image and its text)."""

    is_simple = False

    def generate_until(self, requests) -> list[str]:
        items = []
        for req in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            messages = doc_to_messages(self.task_dict[task][split][doc_id])
            where = f"{task} doc {doc_id}"
            roles = [m.get("role") for m in messages]
            if roles != ["user"]:
                raise NotImplementedError(f"{where}: the slime model answers one user turn "
                                          f"(no system prompt, no history), got roles {roles}")
            content = messages[0].get("content")
            content = [{"type": "text", "text": content}] if isinstance(content, str) else content
            images = [c.get("url", c.get("image")) for c in content if c.get("type") == "image"]
            text = "\n".join(c["text"] for c in content if c.get("type") == "text")
            items.append((text.replace(IMAGE_TOKEN, "").strip(), _one_image(images, where),
                          dict(gen_kwargs)))
        return self._generate(items)
