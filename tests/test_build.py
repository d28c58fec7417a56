"""recipes.build and the full model's save/load: schema checks, filled-in widths, encoders and LLMs
from folders, LoRA, gradient checkpointing, init_from, identical logits after a round trip, and an
atomic save."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipes.build import build_model  # noqa: E402
from recipes.data import LlavaJsonDataset, collate_examples, make_color_dataset  # noqa: E402
from recipes.model_folder import (  # noqa: E402
    load_model_folder,
    replace_folder,
    save_model_folder,
)
from slime_adapters import AdaptiveSlicer, AlternatingScheduler, paper_stages  # noqa: E402

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=336, patch_size=42)  # 8 x 8 = 64 patches per view
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
TINY = {
    "vision": {"type": "clip", "config": CLIP},
    "llm": {"type": "llama", "config": LLAMA},
    "tokenizer": {"type": "word"},
    "adapter": {"projector": {"num_heads": 2}, "compressor": {"num_queries": 16, "num_heads": 2},
                "router": {"gamma": 0.9, "temperature": 0.05}},
}


def tiny(**changes):
    cfg = copy.deepcopy(TINY)
    cfg.update(changes)
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from recipes.data import build_word_tokenizer

    index = make_color_dataset(tmp_path_factory.mktemp("data"), 2, seed=5)
    data = LlavaJsonDataset(index, tokenizer=build_word_tokenizer(),
                            slicer=AdaptiveSlicer(tile_size=336, max_tiles=4))
    return collate_examples([data[0], data[1]], 0)


@pytest.fixture(scope="module")
def built():
    return build(tiny())


@pytest.fixture(scope="module")
def built_lora():
    b = build(tiny(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    # LoRA's B starts at zero; random values make the round trip test see the LoRA weights
    with torch.no_grad():
        for name, p in b.model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return b


def logits(model, batch, **kw):
    model.eval()
    with torch.no_grad():
        return model(images=batch["images"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], question_ids=batch["question_ids"],
                     question_mask=batch["question_mask"], **kw).logits


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ building

def test_build_fills_in_widths_and_returns_a_json_ready_config(built):
    cfg = built.config
    proj = cfg["adapter"]["projector"]
    assert (proj["in_dim"], proj["out_dim"], proj["num_tokens"]) == (32, 64, 64)
    assert cfg["adapter"]["compressor"]["dim"] == 32
    assert cfg["adapter"]["router"]["gamma"] == 0.9
    assert cfg["drop_cls"] is True and cfg["feature_layer"] == -2 and cfg["dtype"] == "float32"
    assert cfg["llm"]["config"]["vocab_size"] == len(built.tokenizer)
    assert cfg["llm"]["config"]["eos_token_id"] == built.tokenizer.eos_token_id
    assert json.loads(json.dumps(cfg)) == cfg
    assert built.model.config.recipe_config == cfg and built.model.training
    assert built.model.config.image_token_id == built.tokenizer.convert_tokens_to_ids("<image>")
    assert built.model.adapter.config.projector.num_tokens == 64


def test_roles_without_and_with_lora(built, built_lora):
    assert list(built.roles) == ["mlp_expert", "query_expert", "gate", "compressor", "llm",
                                 "vision"]
    roles = built_lora.roles
    assert set(roles) == set(built.roles) | {"llm_lora"}
    sched = AlternatingScheduler(roles, paper_stages(roles=[r for r in roles if r != "vision"]),
                                 model=built_lora.model)
    lora = sched.parameter_names("llm_lora")
    rest = sched.parameter_names("llm")
    assert lora and all(".lora_" in n for n in lora)
    assert rest and not any("lora_" in n for n in rest)
    everything = {f"llm.{n}" for n, _ in built_lora.model.llm.named_parameters()}
    assert set(lora) | set(rest) == everything
    groups = sched.enter(len(sched.stages) - 1)  # stage III: LoRA replaces the full LLM
    trained = {id(p) for g in groups for p in g["params"]}
    named = dict(built_lora.model.named_parameters())
    assert all(id(named[n]) in trained for n in lora)
    assert not any(id(named[n]) in trained for n in rest)


def test_added_image_token_resizes_the_llm_embeddings():
    b = build(tiny(image_token="<img>"))
    tok = b.tokenizer
    img = tok.convert_tokens_to_ids("<img>")
    assert img != tok.unk_token_id and b.model.config.image_token_id == img
    assert tok("<img> red", add_special_tokens=False).input_ids[0] == img
    assert b.model.llm.get_input_embeddings().num_embeddings == len(tok)
    # an LLM built with a smaller vocabulary is resized to the tokenizer
    c = build(tiny(llm={"type": "llama", "config": {**LLAMA, "vocab_size": 10}}))
    assert c.model.llm.get_input_embeddings().num_embeddings == len(c.tokenizer)


def test_embedding_separator_adds_its_token():
    b = build(tiny(adapter={**TINY["adapter"], "separator": "embedding"}))
    comma = b.tokenizer.convert_tokens_to_ids(",")
    assert comma != b.tokenizer.unk_token_id and b.model.config.separator_token_id == comma
    assert b.model.llm.get_input_embeddings().num_embeddings == len(b.tokenizer)


def test_bfloat16_dtype():
    b = build(tiny(dtype="bfloat16"))
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch):
    plain, ckpt = build(tiny()), build(tiny(gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) is True
               for m in ckpt.model.llm.modules())
    assert any(getattr(m, "gradient_checkpointing", False) is True
               for m in ckpt.model.vision.modules())
    grads = []
    for b in (plain, ckpt):
        b.model.train()
        torch.manual_seed(1)  # the same gate and router noise in both runs
        out = b.model(images=batch["images"], input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"], labels=batch["labels"],
                      question_ids=batch["question_ids"], question_mask=batch["question_mask"])
        out.loss.backward()
        grads.append((out.loss.detach(), b.model.adapter.compressor.query.grad.clone(),
                      b.model.llm.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_encoders_from_saved_folders(tmp_path):
    import transformers as tf

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64)
    torch.manual_seed(3)
    sources = {
        "clip_vision": tf.CLIPVisionModel(tf.CLIPVisionConfig(**CLIP)),
        "clip_full": tf.CLIPModel(tf.CLIPConfig(vision_config=CLIP, text_config=text)),
        "siglip_vision": tf.SiglipVisionModel(tf.SiglipVisionConfig(**CLIP)),
        "siglip_full": tf.SiglipModel(tf.SiglipConfig(vision_config=CLIP, text_config=text)),
    }
    for name, source in sources.items():
        source.save_pretrained(tmp_path / name)
        if name == "clip_full":  # a folder with its own image processor config
            (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(
                {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
        b = build(tiny(vision={"path": str(tmp_path / name)}))
        tower = source.vision_model if "full" in name else source
        expect = weights(tower)
        got = weights(b.model.vision)
        assert set(got) == set(expect), name
        assert all(torch.equal(got[k], expect[k]) for k in got), name
        siglip = name.startswith("siglip")
        # the encoder family's normalisation reaches the config and the slicer
        from recipes.chat import slicer_for

        mean = ([0.5] * 3 if siglip else [0.1, 0.2, 0.3] if name == "clip_full"
                else pytest.approx([0.48145466, 0.4578275, 0.40821073]))
        assert b.model.config.slicer_config["mean"] == mean
        assert list(slicer_for(b.model, {"max_tiles": 2}).config.mean) == mean
        # SigLIP has no CLS token: nothing to drop, 64 tokens per view either way
        assert b.config["drop_cls"] is (not siglip)
        assert b.config["adapter"]["projector"]["num_tokens"] == 64
    # dropping a "CLS" token SigLIP does not have leaves 63 tokens, no square grid
    with pytest.raises(ValueError, match="model.adapter: .*num_tokens must be a positive perfect "
                                         "square .* got 63"):
        build_model(tiny(vision={"path": str(tmp_path / "siglip_vision")}, drop_cls=True))


def test_llm_and_tokenizer_from_a_folder(tmp_path, built):
    built.model.llm.save_pretrained(tmp_path / "llm")
    built.tokenizer.save_pretrained(tmp_path / "llm")
    b = build(tiny(llm={"path": str(tmp_path / "llm")}, tokenizer=None))
    assert b.config["tokenizer"] == {"path": str(tmp_path / "llm"), "gguf_file": None}
    assert b.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    expect, got = weights(built.model.llm), weights(b.model.llm)
    assert all(torch.equal(got[k], expect[k]) for k in expect)


# ----------------------------------------------------------------------------------- bad input

SCHEMA_ERRORS = [
    ({"typo": 1}, "model.typo: unknown key"),
    ({"vision": {"type": "clip", "typo": 1}}, "model.vision.typo: unknown key"),
    ({"vision": {"type": "clip", "path": "x"}}, "model.vision: give exactly one of 'path' and"),
    ({"vision": {"config": CLIP}}, "model.vision: give exactly one .* got neither"),
    ({"vision": {"type": "vit"}}, "model.vision.type must be one of \\['clip', 'siglip'\\]"),
    ({"vision": {"type": "clip", "config": {"hidden": 3}}},
     "model.vision.config.hidden: not a field of CLIPVisionConfig"),
    ({"vision": {"path": "x", "config": {}}}, "model.vision.config: only with model.vision.type"),
    ({"feature_layer": "-2"}, "model.feature_layer must be int"),
    ({"feature_layer": True}, "model.feature_layer must be int"),
    ({"drop_cls": "yes"}, "model.drop_cls must be bool or null"),
    ({"llm": {"type": "gpt"}}, "model.llm.type must be one of \\['llama'\\]"),
    ({"llm": {"type": "llama", "gguf_file": "a.gguf"}}, "model.llm.gguf_file: only with"),
    ({"llm": {"type": "llama", "config": {"hidden": 1}}},
     "model.llm.config.hidden: not a field of LlamaConfig"),
    ({"tokenizer": None}, "model.tokenizer is required when model.llm has no path"),
    ({"tokenizer": {"type": "bpe"}}, "model.tokenizer.type must be 'word'"),
    ({"adapter": {"projector": {"typo": 1}}}, "model.adapter.projector.typo: unknown key"),
    ({"adapter": {"router": {"gamma": "high"}}}, "model.adapter.router.gamma must be"),
    ({"adapter": {"router": {"kind": "bogus"}}}, "model.adapter.router.kind must be one of"),
    ({"adapter": {"router": {"kind": "norm_selector", "gamma": 0.9}}},
     "model.adapter.router.gamma: unknown key"),
    ({"adapter": {"compressor": {"num_queries": 2.5}}},
     "model.adapter.compressor.num_queries must be"),
    ({"adapter": {"kind": "other"}}, "model.adapter.kind must be 'slime_visual_adapter'"),
    ({"adapter": []}, "model.adapter must be a mapping"),
    ({"image_token": ""}, "model.image_token must be a non-empty token"),
    ({"separator_token": "<image>"}, "model.separator_token must differ from model.image_token"),
    ({"lora": {"typo": 1}}, "model.lora.typo: unknown key"),
    ({"lora": {"r": 0}}, "model.lora.r must be >= 1"),
    ({"lora": {"dropout": 1.5}}, "model.lora.dropout must be in \\[0, 1\\)"),
    ({"lora": {"target_modules": []}}, "model.lora.target_modules must be a non-empty list"),
    ({"gradient_checkpointing": "no"}, "model.gradient_checkpointing must be bool"),
    ({"dtype": "float8"}, "model.dtype must be one of"),
    ({"init_from": 3}, "model.init_from must be str or null"),
]


@pytest.mark.parametrize("changes,message", SCHEMA_ERRORS)
def test_schema_errors_name_the_dotted_key(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny(**changes))


BUILD_ERRORS = [
    ({"adapter": {"projector": {"in_dim": 48}}},
     "model.adapter.projector.in_dim is 48 but the vision encoder's width is 32"),
    ({"adapter": {"projector": {"out_dim": 32}}},
     "model.adapter.projector.out_dim is 32 but the LLM's embedding width is 64"),
    ({"adapter": {"projector": {"num_tokens": 65}}},
     "model.adapter.projector.num_tokens is 65 but the encoder's tokens per view is 64"),
    ({"adapter": {"compressor": {"dim": 48}}}, "model.adapter.compressor.dim is 48 but the"),
    ({"adapter": {"compressor": {"kv_dim": 48}}}, "model.adapter.compressor.kv_dim is 48"),
    ({"adapter": {"compressor": {"out_dim": 16}}}, "model.adapter.compressor.out_dim is 16"),
    ({"adapter": {"separator": "bogus"}}, "model.adapter: .*separator must be one of"),
    ({"adapter": {"router": {"gamma": 2.0}}}, "model.adapter: .*gamma"),
    ({"lora": {"target_modules": ["no_such_layer"]}}, "model.lora.target_modules: "),
]


@pytest.mark.parametrize("changes,message", BUILD_ERRORS)
def test_widths_and_values_are_checked_against_the_models(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny(**changes))


def test_missing_folders_and_foreign_models(tmp_path, built):
    missing = str(tmp_path / "nowhere")
    for changes, message in [
        ({"vision": {"path": missing}}, "model.vision.path: folder .*nowhere' does not exist"),
        ({"llm": {"path": missing}}, "model.llm.path: folder .*nowhere' does not exist"),
        ({"tokenizer": {"path": missing}}, "model.tokenizer.path: folder .* does not exist"),
        ({"init_from": missing}, "model.init_from: folder .*nowhere' does not exist"),
        ({"vision": {"path": str(tmp_path)}}, "model.vision.path: .*config.json' does not exist"),
    ]:
        with pytest.raises(FileNotFoundError, match=message):
            build_model(tiny(**changes))
    built.model.llm.save_pretrained(tmp_path / "llm")
    built.tokenizer.save_pretrained(tmp_path / "llm")
    with pytest.raises(FileNotFoundError, match="model.llm.gguf_file: .*x.gguf' does not exist"):
        build_model(tiny(llm={"path": str(tmp_path / "llm"), "gguf_file": "x.gguf"}))
    with pytest.raises(ValueError, match="model.vision.path: .* holds a 'llama' model"):
        build_model(tiny(vision={"path": str(tmp_path / "llm")}))
    state = {k: v for k, v in built.model.llm.state_dict().items() if "layers.1." not in k}
    built.model.llm.save_pretrained(tmp_path / "partial", state_dict=state)
    built.tokenizer.save_pretrained(tmp_path / "partial")
    with pytest.raises(ValueError, match="model.llm.path: .*partial' lacks weights for "
                                         "\\['model.layers.1."):
        build_model(tiny(llm={"path": str(tmp_path / "partial")}, tokenizer=None))


# ---------------------------------------------------------------------------------- save / load

def test_round_trip_gives_identical_logits(tmp_path, built, batch):
    from transformers import AutoModelForImageTextToText

    out = save_model_folder(built.model, tmp_path / "m", tokenizer=built.tokenizer,
                            extra={"template": "plain", "slicer": {"max_tiles": 4}})
    assert out == tmp_path / "m"
    assert {"config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json"} <= set(os.listdir(out))
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "slime" and conf["recipe_config"] == built.config
    assert conf["image_token_id"] == built.model.config.image_token_id
    assert conf["slicer_config"]["max_tiles"] == 4
    model, processor = load_model_folder(out)
    assert not model.training and model.config.recipe_config == built.config
    assert processor.template == "plain"
    assert processor.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert torch.equal(logits(model, batch), logits(built.model, batch))
    auto = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(logits(auto, batch), logits(built.model, batch))
    built.model.train()


def test_lora_is_saved_merged_into_a_plain_folder(tmp_path, built_lora, batch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = built_lora.model
    assert isinstance(model.llm, PeftModel)
    save_model_folder(model, tmp_path / "m", tokenizer=built_lora.tokenizer)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert not isinstance(loaded.llm, PeftModel)
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=1e-4,
                               atol=1e-5)
    # LoRA on top again for further training starts from the same function
    again = build(tiny(init_from=str(tmp_path / "m"), lora={"r": 2}))
    assert "llm_lora" in again.roles
    torch.testing.assert_close(logits(again.model, batch), logits(model, batch), rtol=1e-4,
                               atol=1e-5)
    model.train()


@pytest.mark.parametrize("which", ["plain", "lora"])
def test_save_from_a_given_state_dict(tmp_path, built, built_lora, batch, which):
    """``state_dict=`` (what ZeRO-3 gathers) is written instead of the module's own tensors: a
    model saved from a perturbed copy of its state loads as that perturbed model."""
    import copy

    model = (built if which == "plain" else built_lora).model
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith(("adapter.", "vision.", "llm.")) and p.is_floating_point():
                p.add_(0.01 * torch.randn_like(p))
    save_model_folder(model, tmp_path / "m", tokenizer=built.tokenizer,
                      state_dict=other.state_dict())
    loaded, _ = load_model_folder(tmp_path / "m")
    torch.testing.assert_close(logits(loaded, batch), logits(other, batch), rtol=1e-4,
                               atol=1e-5)
    a, b = logits(loaded, batch), logits(model, batch)
    assert a.shape != b.shape or not torch.allclose(a, b)
    model.train()


class ExplodingTokenizer:
    def convert_ids_to_tokens(self, i):
        return "<image>"

    def save_pretrained(self, directory, **kwargs):
        raise RuntimeError("disk full while saving the tokenizer")


def test_save_is_atomic(tmp_path, built, monkeypatch):
    from slime_adapters.hf import SliMEProcessor

    target = tmp_path / "m"
    save_model_folder(built.model, target, tokenizer=built.tokenizer, extra={"template": "qa"})
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk full while saving the processor")

    monkeypatch.setattr(SliMEProcessor, "save_pretrained", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_folder(built.model, target, tokenizer=built.tokenizer,
                          extra={"template": "plain"})
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind
    # a fresh target that fails is never created
    with pytest.raises(RuntimeError, match="disk full"):
        save_model_folder(built.model, tmp_path / "new", tokenizer=built.tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.undo()
    # a successful save replaces the folder whole
    save_model_folder(built.model, target)
    assert not (target / "processor_config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_replace_folder_restores_the_old_one_when_the_rename_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "m", tmp_path / ".m.tmp-x"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    real = os.replace

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename refused"):
        replace_folder(new, target)
    monkeypatch.undo()
    assert (target / "a").read_text() == "old" and not (target / "b").exists()
    assert sorted(os.listdir(tmp_path)) == [".m.tmp-x", "m"]  # the caller removes its temp
    replace_folder(new, target)
    assert (target / "b").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["m"]


def test_save_errors(tmp_path, built):
    with pytest.raises(ValueError, match="extra must be a dict"):
        save_model_folder(built.model, tmp_path / "x", extra=["a"])
    with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
        save_model_folder(built.model, tmp_path / "x", extra={"a": object()})
    assert not (tmp_path / "x").exists()


def test_init_from_loads_the_weights_and_checks_the_config(tmp_path, built, batch):
    target = save_model_folder(built.model, tmp_path / "m", tokenizer=built.tokenizer)
    again = build(tiny(init_from=str(target), gradient_checkpointing=True), seed=123)
    assert again.config["init_from"] == str(target)
    assert torch.equal(logits(again.model, batch), logits(built.model, batch))
    # LoRA may be added to a model saved without it
    with_lora = build(tiny(init_from=str(target), lora={"r": 2}))
    assert "llm_lora" in with_lora.roles
    with pytest.raises(ValueError, match="model.adapter.router.gamma: saved 0.9, cfg 0.5"):
        build_model(tiny(init_from=str(target),
                         adapter={**TINY["adapter"], "router": {"gamma": 0.5,
                                                                "temperature": 0.05}}))
    with pytest.raises(ValueError, match="model.llm.config.num_hidden_layers: saved 2, cfg 3"):
        build_model(tiny(init_from=str(target),
                         llm={"type": "llama", "config": {**LLAMA, "num_hidden_layers": 3}}))
    from slime_adapters.hf import SliMEForConditionalGeneration

    bare = SliMEForConditionalGeneration(built.model.config.__class__.from_dict(
        {**built.model.config.to_dict(), "recipe_config": None}))
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="model.init_from: .* saved without a build config"):
        build_model(tiny(init_from=str(tmp_path / "bare")))
    built.model.train()
