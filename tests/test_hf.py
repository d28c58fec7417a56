"""slime_adapters.hf: the config's checks, the model's forward / generate (KV cache, greedy,
beam, sampling, streamer), the Auto round trip, the processor, gradient checkpointing, attention
implementations, the NaN policy and the import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    TextStreamer,
)

from recipes.data import build_word_tokenizer, make_color_dataset  # noqa: E402
from slime_adapters.hf import (  # noqa: E402
    SliMEConfig,
    SliMEForConditionalGeneration,
    SliMEImageProcessor,
    SliMEOutput,
    SliMEProcessor,
)

CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, image_size=336, patch_size=42)
QUESTION = "what color is the square ?"


def tiny_config(tok, **changes) -> SliMEConfig:
    kw = dict(
        vision_config=dict(CLIP),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        adapter_config={"projector": {"num_heads": 2},
                        "compressor": {"num_queries": 16, "num_heads": 2},
                        "router": {"gamma": 0.9, "temperature": 0.05}},
        slicer_config={"max_tiles": 4})
    kw.update(changes)
    return SliMEConfig(**kw)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    model = SliMEForConditionalGeneration(tiny_config(tok)).eval()
    proc = SliMEProcessor(image_processor=SliMEImageProcessor(**model.config.slicer_config),
                          tokenizer=tok, template="qa")
    index = make_color_dataset(root / "data", 3, seed=4)
    images = [str(index.parent / r["image"]) for r in json.loads(index.read_text())]
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    return model, proc, images, root / "model"


def conv(image, answer=None):
    turns = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("changes,message", [
    ({"image_token_id": 10**6}, "image_token_id 1000000 is outside the LLM's vocabulary"),
    ({"image_token_id": -1}, "image_token_id -1 is outside"),
    ({"image_token_id": True}, "image_token_id must be an integer"),
    ({"feature_layer": 99}, "feature_layer 99 does not exist: the clip encoder has 2 layers"),
    ({"drop_cls": "no"}, "drop_cls must be true, false or null"),
    ({"vision_config": {**CLIP, "model_type": "siglip_vision_model"}, "drop_cls": True},
     "drop_cls is true but the siglip encoder has no CLS token"),
    ({"router_text": "answer"}, "router_text must be one of"),
    ({"adapter_config": {"projector": {"in_dim": 48}}},
     "adapter_config.projector.in_dim is 48 but the vision encoder's width is 32"),
    ({"adapter_config": {"projector": {"num_tokens": 65}}}, "projector.num_tokens is 65"),
    ({"adapter_config": {"separator": "bogus"}}, "adapter_config: .*separator"),
    ({"adapter_config": {"separator": "embedding"}}, "separator_token_id is required"),
    ({"slicer_config": {"tile": 3}}, "slicer_config: unknown key"),
    ({"slicer_config": {"tile_size": 224}}, "slicer_config.tile_size 224 differs"),
    ({"vision_config": {**CLIP, "model_type": "vit"}}, "not a supported encoder"),
])
def test_config_refuses_bad_values_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(build_word_tokenizer(), **changes)


def test_config_fills_in_the_adapter_and_round_trips_json():
    tok = build_word_tokenizer()
    c = tiny_config(tok)
    proj = c.adapter_config["projector"]
    assert (proj["in_dim"], proj["out_dim"], proj["num_tokens"]) == (32, 64, 64)
    assert c.drop_cls is True and c.tokens_per_view == 64
    assert c.slicer_config["tile_size"] == 336 and c.slicer_config["max_tiles"] == 4
    assert c.slicer_config["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    back = SliMEConfig.from_dict(json.loads(c.to_json_string()))
    assert back.to_dict() == c.to_dict()
    siglip = tiny_config(tok, vision_config={**CLIP, "model_type": "siglip_vision_model"})
    assert siglip.drop_cls is False and siglip.slicer_config["mean"] == [0.5, 0.5, 0.5]
    assert isinstance(AutoConfig.for_model("slime"), SliMEConfig)


# ------------------------------------------------------------------------------ forward

def test_forward_returns_a_model_output_with_the_visual_statistics(parts):
    model, proc, images, _ = parts
    batch = proc.apply_chat_template([conv(images[0], "red"), conv(images[1], "blue")])
    assert set(batch) == {"input_ids", "attention_mask", "question_ids", "question_mask",
                          "labels", "pixel_values", "tile_pixel_values", "image_grids"}
    out = model(**batch)
    assert isinstance(out, SliMEOutput)
    assert out["loss"] is out.loss and out.to_tuple()[0] is out.loss
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.logits.shape[:2] == out.attention_mask.shape == out.labels.shape
    tiles = batch["image_grids"].prod(1)
    assert torch.equal(out.local_offered, tiles * 16)
    assert (out.local_kept <= out.local_offered).all() and (out.local_kept >= 1).all()
    torch.testing.assert_close(out.router_keep_rate, out.local_kept / out.local_offered)
    assert torch.equal(out.visual_lengths, 64 + 1 + out.local_kept)
    assert out.gate_mean.shape == (2,)
    # the labels survive the splice: the answers' ids, nothing at visual tokens
    kept = out.labels[out.labels != -100]
    assert kept.tolist() == batch["labels"][batch["labels"] != -100].tolist()


def test_text_only_and_placeholder_errors(parts):
    model, proc, _, _ = parts
    ids = torch.tensor([[2, 5, 7, 8]])
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert out.visual_lengths is None
    with pytest.raises(ValueError, match="hold 1 image placeholder.* but no image inputs"):
        model(input_ids=torch.tensor([[2, model.config.image_token_id, 7]]))
    with pytest.raises(ValueError, match="needs pixel_values"):
        model.get_visual_tokens(None, None, None)


def test_non_finite_vision_features_name_the_image(parts):
    model, proc, images, _ = parts
    batch = proc(images=images[:2], text=[f"USER: <image> {QUESTION}"] * 2)
    tiles = batch["tile_pixel_values"].clone()
    first = int(batch["image_grids"][0].prod())
    tiles[first + 1] = float("nan")  # the second tile of image 1
    with pytest.raises(FloatingPointError, match="image 1 of the batch \\(its tile 1\\)"):
        model(**{**batch, "tile_pixel_values": tiles})
    views = batch["pixel_values"].clone()
    views[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="image 0 of the batch \\(its global view\\)"):
        model(**{**batch, "pixel_values": views})


# ----------------------------------------------------------------------------- generate

def test_greedy_generate_with_the_cache_equals_full_forward_passes(parts):
    model, proc, images, _ = parts
    inputs = proc.apply_chat_template(conv(images[0]))
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    t = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :t], inputs["input_ids"])
    ids = inputs["input_ids"]
    for _ in range(5):  # the oracle: no cache, the whole prompt every step
        with torch.no_grad():
            logits = model(**{**inputs, "input_ids": ids,
                              "attention_mask": torch.ones_like(ids)}).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_batched_left_and_right_padded_prompts_generate_like_single_ones(parts):
    model, proc, images, _ = parts
    singles = [model.generate(**proc.apply_chat_template(conv(im)), max_new_tokens=3,
                              do_sample=False, min_new_tokens=3)[:, -3:] for im in images[:2]]
    for side in ("right", "left"):
        proc.tokenizer.padding_side = side
        batch = proc.apply_chat_template([conv(images[0]), [
            {"from": "human", "value": f"<image>\nwhich color does the small square have ?"}]],
            images=[images[1]])
        proc.tokenizer.padding_side = "right"
        single2 = model.generate(**proc.apply_chat_template([
            {"from": "human", "value": "<image>\nwhich color does the small square have ?"}],
            images=[images[1]]), max_new_tokens=3, do_sample=False, min_new_tokens=3)[:, -3:]
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert torch.equal(out[0, -3:], singles[0][0]) and torch.equal(out[1, -3:], single2[0])


def test_beam_search_sampling_and_streamer(parts, capsys):
    model, proc, images, _ = parts
    inputs = proc.apply_chat_template(conv(images[0]))
    t = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                           do_sample=False)
    assert beams.shape[0] == 2 and torch.equal(beams[:, :t], inputs["input_ids"].repeat(2, 1))
    torch.manual_seed(5)
    a = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(5)
    b = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert torch.equal(a, b)
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         streamer=TextStreamer(proc.tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.split() == proc.tokenizer.decode(out[0, t:]).split()
    dict_out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_scores=True)
    assert torch.equal(dict_out.sequences, out) and len(dict_out.scores) == 4


# ------------------------------------------------------------------------------ round trip

def test_auto_classes_load_the_saved_folder_with_equal_logits_and_generations(parts):
    model, proc, images, folder = parts
    names = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json",
            "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "slime"
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    causal = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(causal) is SliMEForConditionalGeneration
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, SliMEProcessor) and processor.template == "qa"
    assert isinstance(AutoImageProcessor.from_pretrained(folder), SliMEImageProcessor)
    inputs = processor.apply_chat_template(conv(images[2]))
    same = proc.apply_chat_template(conv(images[2]))
    assert all(torch.equal(inputs[k], same[k]) for k in same)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    for kw in ({"do_sample": False}, {"num_beams": 2, "do_sample": False}):
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=6, **kw),
                           model.generate(**inputs, max_new_tokens=6, **kw))


def test_attn_implementation_reaches_the_encoder_and_the_llm(parts):
    model, proc, images, folder = parts
    eager = SliMEForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    assert eager.llm.config._attn_implementation == "eager"
    assert eager.vision.config._attn_implementation == "eager"
    sdpa = SliMEForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    assert sdpa.llm.config._attn_implementation == "sdpa"
    inputs = proc.apply_chat_template(conv(images[0]))
    with torch.no_grad():
        a, b = eager.eval()(**inputs), sdpa.eval()(**inputs)
    valid = a.attention_mask.bool()
    torch.testing.assert_close(a.logits[valid], b.logits[valid], rtol=1e-4, atol=1e-5)
    assert SliMEForConditionalGeneration._supports_sdpa
    assert {"SliMEVisualAdapter", "LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(
        model._no_split_modules)


def test_gradient_checkpointing_keeps_loss_and_gradients(parts):
    model, proc, images, folder = parts
    batch = proc.apply_chat_template([conv(images[0], "red"), conv(images[1], "blue")])
    results = []
    for ckpt in (False, True):
        m = SliMEForConditionalGeneration.from_pretrained(folder).train()
        if ckpt:
            m.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(x, "gradient_checkpointing", False) for x in m.llm.modules())
            assert any(getattr(x, "gradient_checkpointing", False) for x in m.vision.modules())
        torch.manual_seed(1)
        out = m(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), m.adapter.compressor.query.grad.clone(),
                        m.llm.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- processor

def test_processor_call_and_chat_template(parts, tmp_path):
    model, proc, images, _ = parts
    tok = proc.tokenizer
    text = proc.apply_chat_template(conv(images[0]), tokenize=False)
    assert text == f"USER: <image>\n{QUESTION} ASSISTANT:"
    llava = proc.apply_chat_template([{"from": "human", "value": f"<image>\n{QUESTION}"}],
                                     images=[images[0]])
    hf = proc.apply_chat_template(conv(images[0]))
    assert all(torch.equal(llava[k], hf[k]) for k in hf) and "labels" not in hf
    assert tok.decode(hf["question_ids"][0]) == QUESTION
    train = proc.apply_chat_template(conv(images[0], "red"))
    assert tok.convert_ids_to_tokens(train["labels"][0][train["labels"][0] != -100]) == [
        "red", "</s>"]
    called = proc(images=images[0], text=f"USER: <image> {QUESTION} ASSISTANT:")
    assert called["input_ids"][0].tolist() == hf["input_ids"][0].tolist()
    for bad, message in (
            (dict(images=images[:2], text="<image> one"), "holds 1 image placeholder.* 2 image"),
            (dict(images=None, text="<image> one"), "holds 1 image placeholder.* 0 image"),
            (dict(images=images[0]), "needs text")):
        with pytest.raises(ValueError, match=message):
            proc(**bad)
    with pytest.raises(ValueError, match="system messages are not supported"):
        proc.apply_chat_template([{"role": "system", "content": "x"}, *conv(images[0])])
    with pytest.raises(ValueError, match="ends with an answer"):
        proc.apply_chat_template(conv(images[0], "red"), add_generation_prompt=True)


def test_image_processor_takes_the_encoders_normalisation(tmp_path):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    clip = CLIPVisionConfig(image_size=224, patch_size=32)
    ip = SliMEImageProcessor.for_encoder(clip)
    assert ip.tile_size == 224 and ip.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert SliMEImageProcessor.for_encoder(SiglipVisionConfig()).std == [0.5, 0.5, 0.5]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    own = SliMEImageProcessor.for_encoder(clip, tmp_path, max_tiles=2)
    assert own.mean == [0.1, 0.2, 0.3] and own.std == [0.4, 0.5, 0.6] and own.max_tiles == 2
    out = own(torch.zeros(3, 100, 300, dtype=torch.uint8))
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert out["tile_pixel_values"].shape[0] == int(out["image_grids"].prod())
    # (0/255 - 0.1) / 0.4 on the first channel of a black image that fills its tile
    black = own(torch.zeros(3, 224, 224, dtype=torch.uint8))["tile_pixel_values"]
    torch.testing.assert_close(black[:, 0].unique(), torch.tensor([-0.25]))
    with pytest.raises(ValueError, match="SliMEImageProcessor"):
        SliMEImageProcessor(tile_sise=3)


def test_import_slime_adapters_needs_only_the_core():
    code = ("import sys, slime_adapters; slime_adapters.AdaptiveSlicer; "
            "bad = [m for m in ('transformers', 'slime_adapters.hf', 'peft', 'recipes') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_router_text_rules(parts):
    """``question``: the processor's question ids steer the router; ``prompt``: every text token
    of the prompt does (the answers excluded), with no question ids needed."""
    model, proc, images, folder = parts
    inputs = proc.apply_chat_template(conv(images[0]))
    no_question = {k: v for k, v in inputs.items() if not k.startswith("question")}
    with pytest.raises(ValueError, match="needs text_embeds"):
        model(**no_question)
    prompt = SliMEForConditionalGeneration.from_pretrained(folder, router_text="prompt").eval()
    assert prompt.config.router_text == "prompt"
    ids = inputs["input_ids"]
    mask = ids != model.config.image_token_id
    with torch.no_grad():
        got = prompt(**no_question)
        want = model.get_visual_tokens(
            inputs["pixel_values"], inputs["tile_pixel_values"], inputs["image_grids"],
            text_embeds=model.get_input_embeddings()(ids), text_mask=mask)
        by_question = model(**inputs)
    assert torch.equal(got.local_kept, want.aux.num_kept)
    assert torch.equal(got.visual_lengths, want.lengths)
    assert by_question.local_kept is not None
