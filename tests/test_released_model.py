"""A released SliME folder end to end: ``load_released`` on a tiny released-format folder this
test writes (random weights: a CLIP tower with 576 patches, a Llama, an SPM tokenizer), against a
port of the released pipeline written here (slicing, vision tower, GatedBlock, resampler, cosine
top-p router, spatial merge, splicing, LLM); token counts and logits equal; export gives back the
original keys and tensors; the released config's settings reach the model; every error path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_templates_released import spm_llama  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from slime_adapters.checkpoint import CheckpointError  # noqa: E402
from slime_adapters.hf.released import (VISION_PREFIX, export_released_folder,  # noqa: E402
                                        load_released)

F64 = torch.float64
V, L, T, PATCH, M = 32, 48, 48, 2, 16  # vision width, LLM width, tile side, patch, queries
N = (T // PATCH) ** 2  # 576: the released GatedBlock runs its experts only at 576 tokens
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PROJ, SAMP = "model.mm_projector.", "model.sampler.post_qformer."
TOPP, TEMP = 0.6, 0.3


def _resampler(g, queries):
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.5
    out = {"query": r(queries, V), "pos_embed": r(queries, V),
           "attn.in_proj_weight": r(3 * V, V), "attn.in_proj_bias": r(3 * V),
           "attn.out_proj.weight": r(V, V), "attn.out_proj.bias": r(V)}
    for ln in ("ln_q", "ln_kv", "ln_post"):
        out[f"{ln}.weight"], out[f"{ln}.bias"] = 1 + r(V), r(V)
    return out


def write_released(folder, *, fmt="safetensors", seperator=True, **cfg_changes):
    """A released-format folder: config.json, weights in two shards (+ index), tokenizer."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tok = spm_llama(False)
    vocab = len(tok) - 1  # the tokenizer's "<image>" lies outside the released vocabulary
    vcfg = CLIPVisionConfig(hidden_size=V, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, image_size=T, patch_size=PATCH)
    tower = folder / "tower"
    CLIPVisionModel(vcfg).save_pretrained(tower)
    vision = CLIPVisionModel(vcfg)
    lcfg = LlamaConfig(vocab_size=vocab, hidden_size=L, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    llm = LlamaForCausalLM(lcfg)
    state = {VISION_PREFIX + k: v for k, v in vision.state_dict().items()}
    state |= llm.state_dict()
    proj = {"w_gate": torch.randn(V, 2, generator=g), "w_noise": torch.randn(V, 2, generator=g),
            "mean": torch.zeros(1), "std": torch.ones(1),
            "projection.0.weight": torch.randn(L, V, generator=g) * 0.2,
            "projection.0.bias": torch.randn(L, generator=g) * 0.2,
            "projection.2.weight": torch.randn(L, L, generator=g) * 0.2,
            "projection.2.bias": torch.randn(L, generator=g) * 0.2}
    state |= {PROJ + k: v for k, v in proj.items()}
    state |= {f"{PROJ}attn.{k}": v for k, v in _resampler(g, N).items()}
    state |= {SAMP + k: v for k, v in _resampler(g, M).items()}
    state = {k: v.contiguous().clone() for k, v in state.items()}
    cfg = {**lcfg.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
           "mm_vision_tower": str(tower), "mm_hidden_size": V, "mm_projector_type": "gated",
           "mm_resampler_type": "cosine", "mm_resampler_dim": M, "mm_resampler_topp": TOPP,
           "mm_resampler_temp": TEMP, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial",
           "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336]],
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
           "mm_learnable_gated": -1, "tokenizer_padding_side": "right",
           "tokenizer_model_max_length": 2048, "use_local_only": False, "use_global_only": False}
    if seperator:
        cfg["seperator"] = tok(",")["input_ids"][-1]
    cfg.update(cfg_changes)
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    names = [f"model-0000{i + 1}-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"
             for i in range(2)]
    if fmt != "safetensors":
        names = [f"pytorch_model-0000{i + 1}-of-00002.bin" for i in range(2)]
    for name, ks in zip(names, shards, strict=True):
        part = {k: state[k] for k in ks}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"weight_map": {k: names[i] for i, ks in
                                                           enumerate(shards) for k in ks}}))
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(folder)
    return state, cfg


# ------------------------------------------------------- a port of the released pipeline


def released_grid(w, h, t):
    """``select_best_resolution_uhd`` (cols, rows) for a ``t``-pixel tile."""
    scale = min(max(math.ceil(w * h / (t * t)), 2), 6) if math.ceil(w * h / (t * t)) != 1 else 2

    def factors(n):
        return [(i, n // i) for i in range(1, n + 1) if n % i == 0]
    cands = factors(scale) + factors(scale + 1) if scale <= 2 else \
        factors(scale - 1) + factors(scale) + factors(scale + 1)
    best, eff_best, waste_best = None, 0, float("inf")
    for c, r in cands:
        s = min(c * t / w, r * t / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = c * t * r * t - eff
        if eff > eff_best or (eff == eff_best and waste < waste_best):
            best, eff_best, waste_best = (c, r), eff, waste
    return best


def released_pixels(img, t):
    """``process_anyres_image``: stretched global view + black-padded tiles, normalised."""
    cols, rows = released_grid(*img.size, t)
    tw, th = cols * t, rows * t
    sw, sh = tw / img.width, th / img.height
    if sw < sh:
        nw, nh = tw, min(math.ceil(img.height * sw), th)
    else:
        nw, nh = min(math.ceil(img.width * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    views = [img.resize((t, t))] + [canvas.crop((x, y, x + t, y + t))
                                    for y in range(0, th, t) for x in range(0, tw, t)]

    def norm(v):
        a = torch.from_numpy(np.asarray(v, dtype=np.float64) / 255.0).permute(2, 0, 1)
        return (a - torch.tensor(MEAN, dtype=F64)[:, None, None]) / torch.tensor(
            STD, dtype=F64)[:, None, None]
    return torch.stack([norm(v) for v in views]), (cols, rows)


def _ln(sd, name, x):
    return F.layer_norm(x, (V,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def port_resampler(sd, x):
    """``Resampler.forward``: heads = width // 128 (at least 1), bicubic key positions."""
    mha = nn.MultiheadAttention(V, max(1, V // 128), dtype=F64)
    mha.load_state_dict({"in_proj_weight": sd["attn.in_proj_weight"],
                         "in_proj_bias": sd["attn.in_proj_bias"],
                         "out_proj.weight": sd["attn.out_proj.weight"],
                         "out_proj.bias": sd["attn.out_proj.bias"]})
    pos = sd["pos_embed"]
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(x.shape[1])
    pos_k = pos if src == tgt else F.interpolate(
        pos.reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt), mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    kv = _ln(sd, "ln_kv", x).permute(1, 0, 2)
    q = _ln(sd, "ln_q", sd["query"]).unsqueeze(1).repeat(1, x.shape[0], 1)
    out = mha(q + pos.unsqueeze(1), kv + pos_k.unsqueeze(1), kv, need_weights=False)[0]
    return _ln(sd, "ln_post", out.permute(1, 0, 2))


def port_gated(sd, x):
    """``GatedBlock.forward`` in eval: both experts only at 576 tokens, else the MLP."""
    def mlp(t):
        return F.linear(F.gelu(F.linear(t, sd["projection.0.weight"], sd["projection.0.bias"])),
                        sd["projection.2.weight"], sd["projection.2.bias"])
    if x.shape[0] != N and x.shape[1] != N:
        return mlp(x)
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    attn = {k[len("attn."):]: v for k, v in sd.items() if k.startswith("attn.")}
    experts = torch.stack([mlp(x3), mlp(port_resampler(attn, x3))], -1)
    probs = torch.softmax(x3.reshape(-1, V) @ sd["w_gate"], dim=1)
    top, idx = probs.topk(2, dim=1)
    gates = torch.zeros_like(probs).scatter(1, idx, top / (top.sum(1, keepdim=True) + 1e-6))
    out = (experts @ gates.reshape(*x3.shape[:2], 2, 1)).squeeze(-1)
    return out[0] if x.dim() == 2 else out


def port_forward(state, cfg, ids, img, pixels=None):
    """The released forward of one prompt (ids with −200 at the image) → (visual tokens, kept
    local tokens, logits); ``pixels``: the views to use instead of :func:`released_pixels`'s
    (whose float32 rounding may differ by an ulp)."""
    sd = {k: v.to(F64) for k, v in state.items()}
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(cfg["mm_vision_tower"])).to(F64)
    vision.load_state_dict({k[len(VISION_PREFIX):]: v for k, v in sd.items()
                            if k.startswith(VISION_PREFIX)})
    llm_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("mm_")})
    llm = LlamaForCausalLM(llm_cfg).to(F64).eval()
    llm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.layers",
                         "model.embed", "model.norm", "lm_head"))})
    proj = {k[len(PROJ):]: v for k, v in sd.items() if k.startswith(PROJ)}
    samp = {k[len(SAMP):]: v for k, v in sd.items() if k.startswith(SAMP)}
    ported, (cols, rows) = released_pixels(img, T)
    pixels = ported if pixels is None else pixels.to(F64)
    with torch.no_grad():
        feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[
            cfg["mm_vision_select_layer"]][:, 1:]
        glob = port_gated(proj, feats[0])
        local = port_gated(proj, port_resampler(samp, feats[1:]))
        g = math.isqrt(M)
        local = local.view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
        emb = llm.get_input_embeddings()
        ids = torch.tensor(ids)
        text = emb(ids[ids != -200])
        sim = F.cosine_similarity(local.unsqueeze(1), text.unsqueeze(0), dim=-1).sum(-1)
        probs = torch.softmax(sim / cfg["mm_resampler_temp"], dim=-1)
        sp, si = torch.sort(probs, descending=True)
        n = int((torch.cumsum(sp, 0) <= cfg["mm_resampler_topp"]).sum())
        keep = si[: n + 1] if n < si.numel() else si[:n]
        local = local[keep.sort().values]
        sep = emb(torch.tensor(cfg["seperator"]))
        visual = torch.cat([glob, sep[None], local])
        at = int((ids == -200).nonzero()[0, 0])
        seq = torch.cat([emb(ids[:at]), visual, emb(ids[at + 1:])])
        logits = llm(inputs_embeds=seq[None]).logits[0]
    return visual.shape[0], local.shape[0], logits


# -------------------------------------------------------------------------------- tests


def _images():
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((150, 70), (60, 130))]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    state, cfg = write_released(folder)
    return folder, state, cfg


PROMPTS = ["A chat between a curious user and an assistant. USER: <image>\nWhat colour is "
           "the sky? ASSISTANT: blue",
           "A chat. USER: <image>\nHow many birds? ASSISTANT: two birds"]


def test_logits_and_token_counts_equal_the_released_pipeline(released):
    folder, state, cfg = released
    model, processor = load_released(folder)
    model = model.to(F64)
    images = _images()
    batch = processor(images=images, text=PROMPTS)
    image_id = processor.image_token_id
    # the released tokeniser keeps the "<image>" text out and puts −200 in its place
    rows = [[-200 if t == image_id else t for t in r[m.bool()].tolist()]
            for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k not in ("question_ids",
                                                                   "question_mask")},
                    labels=labels)
    # the released slicing: same grids, same pixels (float32)
    tiles, views = 0, []
    for i, img in enumerate(images):
        pixels, (cols, rows_) = released_pixels(img, T)
        assert batch["image_grids"][i].tolist() == [cols, rows_]
        mine = torch.cat([batch["pixel_values"][i: i + 1],
                          batch["tile_pixel_values"][tiles: tiles + cols * rows_]]).to(F64)
        # equal up to float32 rounding (the processor computes in float32)
        torch.testing.assert_close(mine, pixels, rtol=0, atol=3e-7)
        views.append(mine)
        tiles += cols * rows_
    assert tiles == batch["tile_pixel_values"].shape[0]
    kept = []
    for i, (ids, img) in enumerate(zip(rows, images, strict=True)):
        count, local, ref = port_forward(state, cfg, ids, img, views[i])
        assert int(out.visual_lengths[i]) == count
        kept.append((local, int(out.local_offered[i])))
        valid = out.attention_mask[i].bool()
        got = out.logits[i][valid][:, : cfg["vocab_size"]]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # the router chose: some local tokens kept, not all
    assert all(1 < k < offered for k, offered in kept), kept


def test_settings_from_the_released_config(released):
    folder, _, cfg = released
    model, processor = load_released(folder)
    c = model.config
    router = model.adapter.config.router
    assert (router.gamma, router.temperature, router.text_pool, router.crossing) == (
        TOPP, TEMP, "sum", "exceed")
    assert model.adapter.config.projector.mode == "reference"
    assert model.adapter.config.compressor.mode == "reference"
    assert (c.feature_layer, c.drop_cls, c.router_text) == (-2, True, "released")
    assert c.separator_token_id == processor.tokenizer(",")["input_ids"][-1] == cfg["seperator"]
    assert c.slicer_config["policy"] == "reference"
    assert c.slicer_config["global_view"] == "resize"
    # the released router text: every token but the image placeholder, the answer included
    ids = torch.tensor([[1, c.image_token_id, 5, 6, 7, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 6, 7, -100]])
    _, mask = model._router_text(ids, am, labels)
    assert mask.tolist() == [[True, False, True, True, True, False]]


def test_separator_from_the_tokenizer_and_bin_shards(tmp_path):
    state, cfg = write_released(tmp_path, fmt="bin", seperator=False,
                                use_global_only=True, mm_learnable_gated=0)
    model, processor = load_released(tmp_path)
    tok = processor.tokenizer
    assert model.config.separator_token_id == tok(",")["input_ids"][-1]
    assert model.adapter.config.views == "global"
    assert model.adapter.projector.force_expert == 0
    out = export_released_folder(model, tmp_path / "back")
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(state)


def test_export_gives_back_the_original_keys_tensors_and_config(released, tmp_path):
    folder, state, cfg = released
    model, _ = load_released(folder)
    assert model.llm.get_input_embeddings().num_embeddings == cfg["vocab_size"] + 1
    out = export_released_folder(model, tmp_path / "back")
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(cfg))
    # and the written folder loads again (with the tokenizer of the original)
    (out / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            (out / name).write_bytes((folder / name).read_bytes())
    again, _ = load_released(out)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_generate_never_emits_the_placeholder(released):
    folder, _, _ = released
    model, processor = load_released(folder)
    batch = processor(images=_images()[:1], text=PROMPTS[0][: PROMPTS[0].index("ASSISTANT") + 10])
    gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 5
    assert not (gen[:, batch["input_ids"].shape[1]:] == processor.image_token_id).any()


@pytest.mark.parametrize("change, message", [
    ({"mm_projector_type": "mlp2x_gelu"}, "mm_projector_type='mlp2x_gelu' is not supported"),
    ({"mm_resampler_type": "qformer"}, "mm_resampler_type='qformer'"),
    ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type='flat'"),
    ({"image_aspect_ratio": "pad"}, "image_aspect_ratio='pad'"),
    ({"mm_resampler_topp": "high"}, "mm_resampler_topp must be a number"),
    ({"mm_vision_select_layer": None}, "mm_vision_select_layer must be an integer"),
    ({"use_local_only": True, "use_global_only": True}, "both true"),
    ({"mm_resampler_dim": 9}, "mm_resampler_dim=9"),
    ({"model_type": "llama"}, "not a released LLaVA"),
    ({"mm_vision_tower": "nowhere/tower"}, "neither a local folder nor a known tower"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    write_released(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_released(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_released(tmp_path / "none")
    with pytest.raises(CheckpointError, match="config.json' does not exist"):
        load_released(tmp_path)
    state, _ = write_released(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_released(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="names shards that are missing"):
        load_released(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no released SliME weights"):
        load_released(tmp_path)  # the remaining shard lacks the adapter
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_released(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no mm_vision_tower"):
        load_released(tmp_path)


def test_bin_shards_are_opened_with_weights_only(tmp_path):
    write_released(tmp_path, fmt="bin")

    class Payload:
        def __reduce__(self):
            return (print, ("never run",))
    torch.save({"model.norm.weight": Payload()}, tmp_path / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_released(tmp_path)


def test_export_refuses_a_model_not_from_a_released_folder():
    from slime_adapters.hf import SliMEConfig, SliMEForConditionalGeneration

    config = SliMEConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": 32,
                                        "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": 28,
                                        "patch_size": 14},
                         text_config={"model_type": "llama", "vocab_size": 64, "hidden_size": 48,
                                      "intermediate_size": 96, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "num_key_value_heads": 2},
                         image_token_id=63,
                         adapter_config={"compressor": {"num_queries": 4},
                                         "projector": {"num_heads": 2}})
    with pytest.raises(CheckpointError, match="no released_config"):
        export_released_folder(SliMEForConditionalGeneration(config), "unused")


def test_missing_llm_or_tower_weights_and_the_config_separator(tmp_path):
    state, _ = write_released(tmp_path, seperator=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["seperator"] = 7  # what the released training wrote wins over the tokenizer's rule
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = load_released(tmp_path)
    assert model.config.separator_token_id == 7
    for shard in tmp_path.glob("model-*.safetensors"):
        part = load_file(str(shard))
        part.pop("model.norm.weight", None)
        part = {k: v for k, v in part.items() if not k.startswith(VISION_PREFIX)}
        save_file(part, str(shard))
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no vision tower"):
        load_released(tmp_path)
    with pytest.raises(CheckpointError, match=r"the LLM: missing keys \['model.norm.weight'\]"):
        load_released(tmp_path, vision_tower=tmp_path / "tower")


def test_the_readme_section_runs(released, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    folder, state, _ = released
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run a released SliME checkpoint", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope = {"folder": str(folder), "image": _images()[0]}
    exec(compile(block, "README.md (released)", "exec"), scope)
    assert scope["out"].shape[1] == scope["inputs"]["input_ids"].shape[1] + 4
    back = load_file(str(tmp_path / "runs/released-again/model.safetensors"))
    assert sorted(back) == sorted(state)
