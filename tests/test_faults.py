"""Faults and hostile input outside the training loop: no file is ever unpickled with code
execution, module saves are atomic as a pair and honour the umask, non-finite vision features are
refused and never steer the router, image orientation and modes read consistently, errors stay
within the library's types, data sets check their images, and the package's public surface."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slime_adapters
from slime_adapters import AdaptiveSlicer, CheckpointError, SlicingError, load_module, save_module

ROOT = Path(__file__).resolve().parents[1]


# ---- a pickle payload that leaves a marker file when it runs -------------------------------------
class Payload:
    """Unpickling this creates ``marker`` (stands in for any code a planted file could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def payload_bytes(marker: Path) -> bytes:
    """A torch zip file holding the payload (what ``torch.load(weights_only=False)`` runs)."""
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)
    return buf.getvalue()


def test_the_payload_is_live(tmp_path):
    """The payload does run under an unrestricted unpickler, so the tests below can fail."""
    marker = tmp_path / "ran"
    (tmp_path / "p.pt").write_bytes(payload_bytes(marker))
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def _plant_everywhere(folder: Path, load, marker: Path, *, extra_names=()) -> list[str]:
    """For every file under ``folder`` (one at a time): replace it by the payload, call
    ``load(copy)``, and check the marker never appears. ``extra_names``: ``(relative path,
    replaces)`` pairs planted instead of ``replaces`` (a ``pytorch_model.bin`` a loader could fall
    back to). Returns the files tried."""
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    tries = [(f, f) for f in files] + [(Path(a), Path(b)) for a, b in extra_names]
    done = []
    for planted, replaced in tries:
        copy = marker.parent / f"copy-{len(done)}"
        shutil.copytree(folder, copy)
        (copy / replaced).unlink(missing_ok=True)
        (copy / planted).write_bytes(payload_bytes(marker))
        try:
            load(copy)
        except Exception:  # noqa: BLE001 - refusing is fine; running the payload is not
            pass
        assert not marker.exists(), f"planted {planted} ran"
        shutil.rmtree(copy)
        done.append(str(planted))
    return done


def _tiny_model(root: Path):
    from tests.test_chat import TINY
    from recipes.build import build_model
    from recipes.model_folder import save_model_folder

    torch.manual_seed(0)
    built = build_model({**TINY, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}})
    save_model_folder(built.model, root / "model", tokenizer=built.tokenizer,
                      extra={"template": "qa"})
    return root / "model"


def test_no_file_of_a_model_folder_runs_code(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from recipes.model_folder import load_model_folder

    folder = _tiny_model(tmp_path)
    marker = tmp_path / "ran"
    tried = _plant_everywhere(folder, load_model_folder, marker, extra_names=[
        ("pytorch_model.bin", "model.safetensors"),
        ("model.bin", "model.safetensors"),
    ])
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "pytorch_model.bin"} <= set(tried)
    assert len(tried) >= 8


def _adapter():
    from slime_adapters import NoisyMoEProjector

    torch.manual_seed(0)
    return NoisyMoEProjector(in_dim=8, out_dim=12, num_tokens=4, num_heads=2)


def test_no_file_of_the_checkpoint_loaders_runs_code(tmp_path):
    from slime_adapters import import_released, save_released

    marker = tmp_path / "ran"
    save_module(_adapter(), tmp_path / "module")
    assert _plant_everywhere(tmp_path / "module", load_module, marker) == [
        "config.json", "model.safetensors"]
    torch.manual_seed(0)
    from slime_adapters import SliMEVisualAdapter, SliMEVisualAdapterConfig
    from slime_adapters.compressor import QueryCompressorConfig
    from slime_adapters.projector import NoisyMoEProjectorConfig

    adapter = SliMEVisualAdapter.from_config(SliMEVisualAdapterConfig(
        projector=NoisyMoEProjectorConfig(in_dim=16, out_dim=24, num_tokens=4, num_heads=2),
        compressor=QueryCompressorConfig(dim=16, num_queries=4, num_heads=2),
        separator="none", local_mlp="shared"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a paper-mode adapter in the released layout
        save_released(adapter, tmp_path / "released")
    tried = _plant_everywhere(tmp_path / "released", import_released, marker)
    assert {"mm_projector.bin", "sampler.bin"} <= set(tried)


# ---- D4 / D13 / D12: save_module --------------------------------------------------------------
def test_a_save_killed_between_the_two_files_leaves_the_old_pair_loadable(tmp_path, monkeypatch):
    """The pair is renamed into place as a folder: a crash after the weights are written but
    before the config leaves the previous save whole (was: new weights + old config, "config is
    of kind ... expected ...")."""
    from slime_adapters import QueryCompressor

    old = _adapter()
    save_module(old, tmp_path / "ck")
    import slime_adapters.checkpoint.modules as ckpt

    from slime_adapters.config import atomic_write_bytes as real

    calls = []

    def dies_on_the_second_file(path, data):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(path, data.encode() if isinstance(data, str) else data)

    # whichever writer the module uses for each of the two files
    monkeypatch.setattr(ckpt, "atomic_write_bytes", dies_on_the_second_file)
    monkeypatch.setattr(ckpt, "atomic_write_text", dies_on_the_second_file, raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_module(QueryCompressor(dim=8, num_queries=4, num_heads=2), tmp_path / "ck")
    monkeypatch.undo()
    back = load_module(tmp_path / "ck")
    assert type(back) is type(old)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(),
                                                 back.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left


def test_a_killed_rename_is_undone_and_stale_temporaries_are_cleaned(tmp_path):
    m = _adapter()
    save_module(m, tmp_path / "ck")
    # as if killed between moving the old pair aside and renaming the new one in
    os.replace(tmp_path / "ck", tmp_path / ".ck.saving-1234abcd-old")
    (tmp_path / ".ck.saving-9999").mkdir()
    (tmp_path / ".ck.saving-9999" / "model.safetensors").write_bytes(b"x" * 100)
    save_module(m, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    load_module(tmp_path / "ck")


def test_save_module_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds other entries \['notes.txt'\]"):
        save_module(_adapter(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_atomic_writes_honour_the_umask(tmp_path):
    from slime_adapters.config import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        save_module(_adapter(), tmp_path / "ck")
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


# ---- D10: errors within the library's types ------------------------------------------------------
def test_a_text_file_named_bin_is_a_checkpoint_error(tmp_path):
    from slime_adapters import import_released

    (tmp_path / "mm_projector.bin").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable torch weights file"):
        import_released(tmp_path / "mm_projector.bin")


def test_a_non_utf8_config_is_a_checkpoint_error(tmp_path):
    save_module(_adapter(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_bytes(b'{"kind": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"is not valid JSON \(UTF-8\)"):
        load_module(tmp_path / "ck")
    from slime_adapters import ConfigError
    from slime_adapters.projector import NoisyMoEProjectorConfig

    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        NoisyMoEProjectorConfig.from_json(tmp_path / "ck" / "config.json")


def test_integer_weights_are_named(tmp_path):
    from safetensors.torch import save_file

    m = _adapter()
    save_module(m, tmp_path / "ck")
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    state["w_gate"] = state["w_gate"].to(torch.int32)
    meta = {"format": "pt", "slime_adapters_config": (tmp_path / "ck" / "config.json").read_text()}
    save_file(state, str(tmp_path / "ck" / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"dtype mismatches .*w_gate: checkpoint int32 vs "
                                              r"module float32"):
        load_module(tmp_path / "ck")


def test_half_input_to_a_float32_module_names_module_and_dtypes():
    from slime_adapters import QueryCompressor

    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="NoisyMoEProjector: x is torch.bfloat16 but the "
                                         "module's weights are torch.float32"):
        _adapter()(x)
    with pytest.raises(ValueError, match="QueryCompressor: x is torch.bfloat16"):
        QueryCompressor(dim=8, num_queries=4, num_heads=2)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast it runs
        assert _adapter()(x).tokens.shape == (2, 4, 12)


# ---- D5: non-finite features ---------------------------------------------------------------------
def test_a_nan_score_is_never_kept_and_leaves_the_others_selection_alone():
    from slime_adapters import CosineTokenRouter

    router = CosineTokenRouter(gamma=0.8, temperature=0.05, noise_std=0.0).eval()
    torch.manual_seed(0)
    scores = torch.rand(2, 32) * 0.2
    clean = router.route_scores(scores.clone())
    for bad in (float("nan"), float("inf"), -float("inf")):
        hit = scores.clone()
        hit[0, 5] = bad
        out = router.route_scores(hit)
        assert not out.keep_mask[0, 5] and torch.isfinite(out.scores).all()
        # the other tokens are chosen exactly as if token 5 were masked
        masked = torch.ones(2, 32, dtype=torch.bool)
        masked[0, 5] = False
        ref = router.route_scores(scores.clone(), image_mask=masked)
        assert torch.equal(out.keep_mask, ref.keep_mask) and torch.equal(out.num_kept,
                                                                         ref.num_kept)
        assert torch.equal(out.keep_mask[1], clean.keep_mask[1])
        assert int(out.num_kept[0]) > 1


def test_the_model_refuses_non_finite_vision_features_naming_the_image(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_chat import TINY
    from recipes.build import build_model
    from slime_adapters import collate
    from slime_adapters.hf import NonFiniteFeaturesError

    torch.manual_seed(0)
    model = build_model(TINY).model.eval()
    slicer = AdaptiveSlicer(max_tiles=4)
    imgs = [slicer(Image.new("RGB", (672, 336), (90, 20, 200))) for _ in range(3)]
    batch = collate(imgs)
    batch.tiles[2 + 1] = float("nan")  # a tile of image 1 (each image has 2 tiles)
    with pytest.raises(NonFiniteFeaturesError, match=r"image\(s\) \[1\] of the batch") as info:
        model.get_visual_tokens(images=batch, views="both", router_gamma=1.0)
    assert info.value.images == [1]
    batch = collate(imgs)
    batch.global_views[2, 0, 0, 0] = float("inf")
    batch.tiles[0] = float("nan")  # image 0's first tile too: both images are named
    with pytest.raises(NonFiniteFeaturesError, match=r"\[0, 2\]") as info:
        model.get_visual_tokens(images=batch, views="both", router_gamma=1.0)
    assert info.value.images == [0, 2]
    assert model.get_visual_tokens(images=collate(imgs), views="both",
                                   router_gamma=1.0).lengths.shape == (3,)


# ---- D8 / D9: orientation and modes ------------------------------------------------------------
def _png_with_late_exif(orientation: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1009, 300), (10, 200, 30)).save(buf, "PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]  # after the pixel data, before IEND


def test_plan_and_slice_read_a_late_png_exif_the_same_way():
    data = _png_with_late_exif(6)
    slicer = AdaptiveSlicer(max_tiles=6)
    plan = slicer.plan_image(data)
    sliced = slicer(data)
    assert sliced.plan == plan
    assert slicer.num_visual_tokens(data) == \
        slime_adapters.visual_token_count(sliced.plan)


def test_mode_i_reads_by_value_range_and_mode_f_nan_is_refused():
    slicer = AdaptiveSlicer(max_tiles=1)
    eight = slicer(Image.new("I", (40, 30), 200))
    sixteen = slicer(Image.new("I", (40, 30), 257 * 200))
    assert torch.equal(eight.global_view, sixteen.global_view)
    ref = slicer(Image.new("L", (40, 30), 200))
    assert torch.equal(eight.global_view, ref.global_view)
    with pytest.raises(SlicingError, match="mode I samples span -5…200"):
        img = Image.fromarray(np.array([[-5] * 40] * 29 + [[200] * 40], dtype=np.int32), "I")
        slicer(img)
    arr = np.full((30, 40), 100.0, dtype=np.float32)
    arr[3, 4] = np.nan
    with pytest.raises(SlicingError, match="mode F holds NaN or infinite samples"):
        slicer(Image.fromarray(arr, "F"))


# ---- data sets: checking and skipping bad images ---------------------------------------------
@pytest.fixture()
def bad_data(tmp_path):
    pytest.importorskip("transformers")
    from recipes.data import make_color_dataset

    index = make_color_dataset(tmp_path / "d", 6, seed=0, square=56, clutter=1)
    (tmp_path / "d" / "img_00001.png").unlink()
    (tmp_path / "d" / "img_00003.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return index


def test_check_images_lists_every_bad_record_at_open(bad_data):
    from recipes.data import LlavaJsonDataset, build_word_tokenizer

    tok = build_word_tokenizer()
    with pytest.raises(ValueError, match=r"2 of 6 images .* record 1 \(id 'color-1'\): image "
                                         r".*no such file; record 3 \(id 'color-3'\)"):
        LlavaJsonDataset(bad_data, tokenizer=tok, slicer=AdaptiveSlicer(), check_images=True)
    with pytest.warns(UserWarning, match="2 of 6 records .* skipped for a missing or unreadable"):
        ds = LlavaJsonDataset(bad_data, tokenizer=tok, slicer=AdaptiveSlicer(),
                              skip_bad_images=True)
    assert len(ds) == 4 and ds.skipped_bad_images == 2 and ds.positions == [0, 2, 4, 5]
    assert [ds[i].record for i in range(4)][1] == "record 2 (id 'color-2')"


def test_long_samples_lose_text_never_visual_tokens(tmp_path):
    pytest.importorskip("transformers")
    import functools

    from recipes.data import LlavaJsonDataset, build_word_tokenizer, make_color_dataset
    from recipes.templates import IGNORE_INDEX

    index = make_color_dataset(tmp_path / "d", 2, seed=0, square=56, clutter=1)
    records = json.loads(index.read_text())
    records[0]["conversations"][1]["value"] = " ".join(["red"] * 300)
    index.write_text(json.dumps(records))
    tok = build_word_tokenizer()
    budget = functools.partial(slime_adapters.visual_token_count, global_tokens=64,
                               num_queries=16)
    ds = LlavaJsonDataset(index, tokenizer=tok, slicer=AdaptiveSlicer(max_tiles=6),
                          max_length=256, visual_tokens=budget)
    ex, short = ds[0], ds[1]
    visual = budget(ex.image.plan)
    assert ex.truncated > 0 and len(ex.input_ids) - 1 + visual == 256
    assert (ex.labels != IGNORE_INDEX).any() and int((ex.input_ids == tok.convert_tokens_to_ids(
        "<image>")).sum()) == 1
    assert short.truncated == 0
    answer_at = int((ex.labels != IGNORE_INDEX).nonzero()[0])
    for limit, why in ((visual, "part of the image"), (visual - 1 + answer_at, "no answer token")):
        tight = LlavaJsonDataset(index, tokenizer=tok, slicer=AdaptiveSlicer(max_tiles=6),
                                 max_length=limit, visual_tokens=budget)
        with pytest.raises(ValueError, match=rf"record 0 \(id 'color-0'\): \d+ text \+ {visual} "
                                             rf"visual tokens = \d+ exceed the LLM's {limit} "
                                             rf"positions, and cutting .* leave {why}"):
            tight[0]
    fits = LlavaJsonDataset(index, tokenizer=tok, slicer=AdaptiveSlicer(max_tiles=6),
                            max_length=visual + answer_at, visual_tokens=budget)[0]
    assert len(fits.input_ids) == answer_at + 1 and fits.labels[-1] != IGNORE_INDEX


# ---- smaller frictions -----------------------------------------------------------------------
def test_the_package_lists_only_its_public_names():
    names = set(dir(slime_adapters))
    assert not names & {"Any", "annotations", "importlib", "_importlib"}
    assert set(slime_adapters.__all__) <= names
    from slime_adapters.ops import attention

    assert callable(attention)  # the README names it as the function
    readme = (ROOT / "README.md").read_text()
    assert "the function `slime_adapters.ops.attention`" in readme


def test_make_bench_writes_into_an_ignored_folder():
    out = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True)
    line = next(x for x in out.stdout.splitlines() if "benchmarks.run_all" in x)
    folder = line.split("--out", 1)[1].split()[0]
    probe = f"{folder}/bench_x.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"


def test_training_on_a_cpu_names_deepspeeds_accelerator():
    """The training entry point sets DS_ACCELERATOR on a machine without CUDA, so DeepSpeed's
    "unable to detect it" warning does not print on every stage."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import os, recipes.train as t\n"
            "try:\n    t.main(['--config', 'missing.yaml'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('DS_ACCELERATOR'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == ("cpu" if not torch.cuda.is_available()
                                                   else "None"), proc.stderr[-2000:]
