"""open_clip ViTs as SliME's vision encoder (``make test-openclip``; its own venv, since open_clip
needs torchvision, which does not import beside the default venv's CPU torch): the hidden state of
the chosen layer against a port of the ViT written here and against open_clip's own
``forward_intermediates``, one training step of encoder + adapter, save and load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip needs torchvision, which does not import beside the default "
    "venv's CPU torch: run `make test-openclip` (its own venv)")

from slime_adapters import SliMEVisualAdapter  # noqa: E402
from slime_adapters.adapter_config import SliMEVisualAdapterConfig  # noqa: E402
from slime_adapters.checkpoint import load_module, save_module  # noqa: E402
from slime_adapters.integrations.open_clip import OpenCLIPVisionEncoder  # noqa: E402

CFG = {"image_size": 28, "patch_size": 7, "width": 32, "layers": 3, "head_width": 16}
L = 48


def port(visual, pixels, blocks):
    """The ViT by hand: patches, CLS, positions, ln_pre, ``blocks`` pre-norm blocks."""
    x = F.conv2d(pixels, visual.conv1.weight, stride=CFG["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = visual.ln_pre(x + visual.positional_embedding)
    for blk in visual.transformer.resblocks[:blocks]:
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False)[0]
        x = x + blk.mlp(blk.ln_2(x))
    return x


def test_features_of_the_chosen_layer():
    torch.manual_seed(0)
    enc = OpenCLIPVisionEncoder(CFG).eval()
    px = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        out = enc(px)
        assert out.shape == (3, 16, 32) and enc.tokens_per_view == 16
        torch.testing.assert_close(out, port(enc.visual, px, 2)[:, 1:])
        if hasattr(enc.visual, "forward_intermediates"):
            inter = enc.visual.forward_intermediates(px, indices=[1], output_fmt="NLC",
                                                     intermediates_only=True)
            inter = inter["image_intermediates"] if isinstance(inter, dict) else inter
            torch.testing.assert_close(out, inter[0])
        last = OpenCLIPVisionEncoder(CFG, feature_layer=-1, drop_cls=False)
        last.load_state_dict(enc.state_dict())
        assert last(px).shape == (3, 17, 32)
        torch.testing.assert_close(last(px), port(enc.visual, px, 3))


def test_one_training_step_then_save_and_load(tmp_path):
    torch.manual_seed(0)
    enc = OpenCLIPVisionEncoder(CFG)
    cfg = SliMEVisualAdapterConfig.paper(
        projector={"in_dim": 32, "out_dim": L, "num_tokens": enc.tokens_per_view, "num_heads": 2},
        compressor={"dim": 32, "num_queries": 4, "num_heads": 2})
    adapter = SliMEVisualAdapter.from_config(cfg)
    glob, tiles = torch.randn(2, 3, 28, 28), torch.randn(5, 3, 28, 28)
    grids = torch.tensor([[2, 1], [1, 3]])
    text, target = torch.randn(2, 4, L), torch.randn(L)

    def loss_of(enc, adapter):
        feats = enc(torch.cat([glob, tiles]))
        vis = adapter(feats[:2], feats[2:], grids=grids, text_embeds=text)
        return (vis.packed - target).square().mean() + vis.aux.aux_loss

    params = list(enc.parameters()) + list(adapter.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = loss_of(enc, adapter)
    loss.backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, params, strict=True)]
    assert any(moved[: len(list(enc.parameters()))]) and any(moved[len(list(enc.parameters())):])
    enc.eval(), adapter.eval()
    enc.save(tmp_path / "enc")
    save_module(adapter, tmp_path / "adapter")
    enc2, adapter2 = OpenCLIPVisionEncoder.load(tmp_path / "enc"), load_module(tmp_path / "adapter")
    adapter2.eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(enc2, adapter2), loss_of(enc, adapter), rtol=0, atol=0)


def test_named_config_and_errors(tmp_path):
    enc = OpenCLIPVisionEncoder.from_model_name("ViT-B-16", width=64, layers=2, image_size=32,
                                                patch_size=16)
    assert enc.hidden_size == 64 and enc.tokens_per_view == 4
    with pytest.raises(ValueError, match="no model config 'nope'"):
        OpenCLIPVisionEncoder.from_model_name("nope")
    with pytest.raises(ValueError, match=r"unknown vision_cfg key\(s\) \['depth'\]"):
        OpenCLIPVisionEncoder({**CFG, "depth": 2})
    with pytest.raises(ValueError, match=r"lacks \['layers'\]"):
        OpenCLIPVisionEncoder({k: v for k, v in CFG.items() if k != "layers"})
    with pytest.raises(ValueError, match="feature_layer 4 does not exist"):
        OpenCLIPVisionEncoder(CFG, feature_layer=4)
    with pytest.raises(ValueError, match="pixels must be"):
        OpenCLIPVisionEncoder(CFG)(torch.randn(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="open_clip_encoder.json"):
        OpenCLIPVisionEncoder.load(tmp_path)
    OpenCLIPVisionEncoder(CFG).save(tmp_path / "a")
    other = dict(CFG, width=48)
    OpenCLIPVisionEncoder(other).save(tmp_path / "b")
    (tmp_path / "a" / "open_clip_encoder.safetensors").write_bytes(
        (tmp_path / "b" / "open_clip_encoder.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit the encoder"):
        OpenCLIPVisionEncoder.load(tmp_path / "a")
