"""Damaged model folders: every file a folder must hold is checked before anything is built, and
chat reports each damage as one line with exit status 2 (no traceback, no model built)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from recipes.build import build_model  # noqa: E402
from recipes.chat import main as chat  # noqa: E402
from recipes.data import make_color_dataset  # noqa: E402
from recipes.model_folder import check_model_folder, save_model_folder  # noqa: E402

from tests.test_chat import TINY  # noqa: E402  # the tiny model every recipe test builds


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    built = build_model(TINY)
    save_model_folder(built.model, root / "good", tokenizer=built.tokenizer,
                      extra={"template": "qa", "slicer": {"max_tiles": 2}})
    make_color_dataset(root / "data", 1, seed=3)
    return root / "good", root / "data" / "img_00000.png"


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _write_config(folder, data):
    (folder / "config.json").write_text(json.dumps(data))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def _drop_text_config(folder):
    data = _config(folder)
    del data["text_config"]
    _write_config(folder, data)


def _drop_vision_config(folder):
    data = _config(folder)
    del data["vision_config"]
    _write_config(folder, data)


def _set(key, value):
    def change(folder):
        data = _config(folder)
        data[key] = value
        _write_config(folder, data)
    return change


def _llm_class(folder):
    data = _config(folder)
    data["text_config"]["model_type"] = "clip_vision_model"  # not a causal LM
    _write_config(folder, data)


def _drop_weights(prefix):
    def change(folder):
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if not k.startswith(prefix)},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return change


def _int_weights(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    key = next(k for k in state if k.startswith("adapter."))
    state[key] = state[key].to(torch.int32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


DAMAGE = [
    ("no config.json", lambda f: (f / "config.json").unlink(), "config.json' does not exist"),
    ("config.json not UTF-8", lambda f: (f / "config.json").write_bytes(b"\xff\xfe{\x00"),
     "config.json' is not UTF-8"),
    ("config.json truncated", lambda f: _truncate(f / "config.json", 40),
     "config.json' is not valid JSON"),
    ("no text_config", _drop_text_config, "text_config is missing"),
    ("no vision_config", _drop_vision_config, "vision_config is missing"),
    ("not a SliME config", _set("model_type", "llava"), "model_type is 'llava', not a SliME"),
    ("image_token_id 10**6", _set("image_token_id", 10**6), "image_token_id 1000000 is outside"),
    ("image_token_id -1", _set("image_token_id", -1), "image_token_id -1 is outside"),
    ("feature_layer 99", _set("feature_layer", 99), "feature_layer 99 does not exist"),
    ("drop_cls false", _set("drop_cls", False),
     "projector.num_tokens is 64 but the encoder's tokens per view .* is 65"),
    ("separator bogus", _set("adapter_config", {"separator": "bogus"}), "separator"),
    ("router gamma 5", _set("adapter_config", {"router": {"gamma": 5}}), "gamma"),
    ("a text config of no causal LM", _llm_class, "no causal LM class"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), "holds no weights"),
    ("weights truncated", lambda f: _truncate(f / "model.safetensors", -100),
     "model.safetensors' is truncated"),
    ("weights cut in the header", lambda f: _truncate(f / "model.safetensors", 20),
     "model.safetensors' is truncated"),
    ("vision weights missing", _drop_weights("vision."),
     "weight files lack 39 .* vision.embeddings"),
    ("llm weights missing", _drop_weights("llm.model.layers.1."),
     "weight files lack .* llm.model.layers.1"),
    ("int32 weights", _int_weights, "is I32, not a floating-point dtype"),
    ("no tokenizer.json", lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json' is missing"),
    ("tokenizer.json truncated", lambda f: _truncate(f / "tokenizer.json", 30),
     "tokenizer.json' is not valid JSON"),
    ("processor_config.json not UTF-8",
     lambda f: (f / "processor_config.json").write_bytes(b"\x80\x81"),
     "processor_config.json' is not UTF-8"),
]


@pytest.mark.parametrize("name,damage,message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_folder_fails_before_anything_is_built(good, tmp_path, monkeypatch, capsys,
                                                         name, damage, message):
    from slime_adapters.hf import SliMEForConditionalGeneration

    folder = tmp_path / "m"
    shutil.copytree(good[0], folder)
    damage(folder)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        check_model_folder(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded from a damaged folder")

    monkeypatch.setattr(SliMEForConditionalGeneration, "from_pretrained", refuse)
    assert chat(["--model", str(folder), "--image", str(good[1]), "--question", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("chat: error: "), err
    assert "Traceback" not in err


def test_the_good_folder_passes_and_init_from_names_the_damage(good, tmp_path):
    config = check_model_folder(good[0])
    assert config.model_type == "slime" and config.slicer_config["max_tiles"] == 2
    folder = tmp_path / "m"
    shutil.copytree(good[0], folder)
    _drop_text_config(folder)
    with pytest.raises(ValueError, match="model.init_from: .*text_config is missing"):
        build_model({**TINY, "init_from": str(folder)})


def test_chat_refuses_a_template_the_tokenizer_cannot_stop(good, capsys):
    """``plain`` ends answers with a newline, which the word tokenizer has no token for: one
    line and status 2 at chat, not a traceback from generation."""
    code = chat(["--model", str(good[0]), "--image", str(good[1]), "--question", "what ?",
                 "--template", "plain"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "template 'plain' ends answers with '\\n'" in err, err


def test_sharded_weights_are_checked_shard_by_shard(good, tmp_path):
    from transformers import AutoModelForImageTextToText

    from recipes.model_folder import load_model_folder

    model, processor = load_model_folder(good[0])
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    processor.save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    check_model_folder(folder)
    batch = processor.apply_chat_template(
        [{"from": "human", "value": "<image>\nwhat color is the square ?"}], images=[good[1]])
    with torch.no_grad():
        assert torch.equal(AutoModelForImageTextToText.from_pretrained(folder)(**batch).logits,
                           model(**batch).logits)
    _truncate(shards[1], -10)
    with pytest.raises(ValueError, match=f"{shards[1].name}' is truncated"):
        check_model_folder(folder)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[1].name}' is missing"):
        check_model_folder(folder)
