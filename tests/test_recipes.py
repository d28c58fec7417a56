"""Recipes: generated data, prompt encoding, the full model over inputs_embeds, the demo job."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from recipes.data import (  # noqa: E402
    COLORS,
    LlavaJsonDataset,
    build_word_tokenizer,
    collate_examples,
    make_color_dataset,
)
from recipes.demo import build_model, main, roles_of  # noqa: E402
from slime_adapters import AdaptiveSlicer, load_module  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    index = make_color_dataset(tmp_path_factory.mktemp("data"), 6, seed=3)
    return LlavaJsonDataset(index, tokenizer=tokenizer, slicer=AdaptiveSlicer(max_tiles=4))


def test_generated_dataset_is_llava_format(dataset):
    rec = dataset.records[0]
    assert rec["conversations"][0]["from"] == "human"
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][1]["value"] in COLORS
    assert (dataset.root / rec["image"]).is_file()


def test_collate_packs_tiles_and_pads_text(dataset, tokenizer):
    items = [dataset[i] for i in range(3)]
    batch = collate_examples(items, tokenizer.pad_token_id)
    assert batch["images"].tiles.shape[0] == sum(it.image.num_tiles for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, it in enumerate(items):
        n = len(it.input_ids)
        assert torch.equal(batch["input_ids"][i, :n], it.input_ids)
        assert batch["attention_mask"][i].sum() == n


def test_dataset_errors(tmp_path, tokenizer):
    slicer = AdaptiveSlicer()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlavaJsonDataset(tmp_path / "none.json", tokenizer=tokenizer, slicer=slicer)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlavaJsonDataset(bad, tokenizer=tokenizer, slicer=slicer)
    bad.write_text(json.dumps({"image": "x.png"}))
    with pytest.raises(ValueError, match="must hold a JSON list of records"):
        LlavaJsonDataset(bad, tokenizer=tokenizer, slicer=slicer)
    # checked at open, before any image is read: one error for all the bad records
    bad.write_text(json.dumps([{"image": "x.png", "conversations": []},
                               {"id": "b", "image": ["x.png"], "conversations": []},
                               {"id": "c", "image": "x.png"}]))
    with pytest.raises(ValueError, match=(
            r"3 of 3 records in '.*bad.json' do not fit the 'qa' template; the first 3: "
            r"record 0 \(id None\): conversations must be a non-empty list of turns; "
            r"record 1 \(id 'b'\): 'image' must be a string path, got list; "
            r"record 2 \(id 'c'\): conversations must be")):
        LlavaJsonDataset(bad, tokenizer=tokenizer, slicer=slicer)
    bad.write_text(json.dumps([{"conversations": []}]))
    with pytest.warns(UserWarning, match="1 of 1 records .* no 'image'"), \
            pytest.raises(ValueError, match="holds no record with an image"):
        LlavaJsonDataset(bad, tokenizer=tokenizer, slicer=slicer)


def test_full_model_forward_backward_and_generate(dataset, tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer)
    batch = collate_examples([dataset[i] for i in range(2)], tokenizer.pad_token_id)
    out = model(images=batch["images"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], labels=batch["labels"],
                question_ids=batch["question_ids"], question_mask=batch["question_mask"])
    assert torch.isfinite(out.loss)
    # the spliced sequence is the text plus every image's visual tokens (one placeholder each)
    assert out.logits.shape[1] == out.attention_mask.shape[1] == (
        batch["input_ids"].shape[1] + int(out.visual_lengths.max()) - 1)
    out.loss.backward()
    assert model.adapter.compressor.query.grad is not None
    assert model.llm.get_input_embeddings().weight.grad is not None
    prompt = batch["input_ids"].clone()
    keep = batch["labels"] == -100
    new = model.generate(images=batch["images"], input_ids=torch.where(keep, prompt, 0),
                         attention_mask=keep.long(), question_ids=batch["question_ids"],
                         question_mask=batch["question_mask"], max_new_tokens=2,
                         min_new_tokens=2)
    assert new.shape == (2, prompt.shape[1] + 2)  # the prompt as given, then the new tokens


def test_roles_cover_the_model_without_overlap_in_vision(tokenizer):
    model = build_model(tokenizer)
    roles = roles_of(model)
    assert set(roles) == {"mlp_expert", "query_expert", "gate", "compressor", "llm", "vision"}


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    report = main(["--out", str(tmp_path), "--train", "8", "--eval", "4", "--steps", "2", "2", "2",
                   "--batch-size", "4", "--no-check-loss"])
    assert [s["stage"] for s in report["stages"]] == ["I", "II", "III"]
    assert [s["views"] for s in report["stages"]] == ["global", "local", "both"]
    # stage II trains only the local path: far fewer parameters than stage III
    assert report["stages"][1]["trainable_parameters"] < report["stages"][2]["trainable_parameters"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["eval"]["both"]["visual_tokens_per_image"] > saved["eval"]["global"][
        "visual_tokens_per_image"]
    adapter = load_module(tmp_path / "adapter")
    assert adapter.config.compressor.num_queries == 16


def test_embedding_separator_uses_the_llm_embedding(dataset, tokenizer):
    import dataclasses

    from slime_adapters import SliMEVisualAdapter
    from slime_adapters.hf import SliMEConfig, SliMEForConditionalGeneration

    base = build_model(tokenizer)
    cfg = dataclasses.replace(base.adapter.config, separator="embedding")
    adapter = SliMEVisualAdapter.from_config(cfg)
    comma = tokenizer.convert_tokens_to_ids("?")
    conf = base.config.to_dict()
    conf["adapter_config"] = {**conf["adapter_config"], "separator": "embedding"}
    with pytest.raises(ValueError, match="separator_token_id is required"):
        SliMEConfig.from_dict(conf)
    model = SliMEForConditionalGeneration(
        SliMEConfig.from_dict({**conf, "separator_token_id": comma}), vision=base.vision,
        adapter=adapter, llm=base.llm).eval()
    batch = collate_examples([dataset[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        visual = model.get_visual_tokens(images=batch["images"],
                                         question_ids=batch["question_ids"],
                                         question_mask=batch["question_mask"])
    n_global = visual.num_global
    torch.testing.assert_close(visual.packed[n_global],
                               base.llm.get_input_embeddings().weight[comma])
