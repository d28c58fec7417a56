"""SliME inside an existing LLaVA: ``from_llava`` keeps a transformers
``LlavaForConditionalGeneration``'s tower and LLM, warm-starts the MLP expert from its projector
(equal outputs), and the README's stage-II training runs on top (loss falls, only the
compressor changes); the refused LLaVA set-ups name the reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from test_templates_released import byte_bpe  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration)

from slime_adapters.hf.llava import from_llava  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_llava(tok, **changes):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=7)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_id=tok.convert_tokens_to_ids("<image>"), **changes)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_bpe(False)


def _conversations():
    g = np.random.default_rng(0)
    out = []
    for colour, rgb in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        img = np.full((28, 56, 3), rgb, dtype=np.uint8) + g.integers(0, 30, (28, 56, 3),
                                                                     dtype=np.uint8)
        out.append([{"role": "user", "content": [
                        {"type": "image", "image": Image.fromarray(img)},
                        {"type": "text", "text": "what color is the square ?"}]},
                    {"role": "assistant", "content": colour}])
    return out


def test_keeps_llava_parts_and_warm_starts_the_mlp(tok):
    llava = tiny_llava(tok)
    model = from_llava(llava)
    assert model.vision is llava.model.vision_tower
    assert model.llm.model is llava.model.language_model and model.llm.lm_head is llava.lm_head
    assert model.config.feature_layer == -2 and model.config.drop_cls
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        theirs = llava.model.get_image_features(pixel_values=pixels)
        theirs = torch.stack(list(theirs.pooler_output if hasattr(theirs, "pooler_output")
                                  else theirs))
        feats = model.encode_views(pixels)
        ours = model.adapter.projector(feats, force_expert=0).tokens
    torch.testing.assert_close(ours, theirs.reshape(ours.shape))


def test_the_readme_section_trains_stage_two(tok):
    reference = tiny_llava(tok)
    torch.manual_seed(1)
    untrained = from_llava(reference)  # the same weights the README's model starts from
    untrained = {n: p.detach().clone() for n, p in untrained.named_parameters()}
    llava = tiny_llava(tok)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Add SliME to your LLaVA", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope = {"llava": llava, "tokenizer": tok, "conversations": _conversations()}
    torch.manual_seed(1)
    exec(compile(block, "README.md (LLaVA)", "exec"), scope)
    losses, model = scope["losses"], scope["model"]
    assert losses[-1] < losses[0], losses
    compressor = {f"adapter.compressor.{n}" for n, _ in model.adapter.compressor.named_parameters()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, untrained[n])}
    assert changed and changed <= compressor, sorted(changed ^ compressor)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == compressor
    # the MLP expert is still LLaVA's projector
    proj = llava.model.multi_modal_projector
    torch.testing.assert_close(model.adapter.projector.mlp[0].weight, proj.linear_1.weight)
    torch.testing.assert_close(model.adapter.projector.mlp[2].bias, proj.linear_2.bias)


def test_refused_set_ups(tok):
    with pytest.raises(ValueError, match="several layers"):
        from_llava(tiny_llava(tok, vision_feature_layer=[-2, -1]))
    with pytest.raises(ValueError, match="uses 'relu'"):
        from_llava(tiny_llava(tok, projector_hidden_act="relu"))
    with pytest.raises(ValueError, match="needs a LlavaForConditionalGeneration"):
        from_llava(torch.nn.Linear(2, 2))
