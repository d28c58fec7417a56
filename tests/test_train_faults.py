"""recipes/train.py under faults: a pickle planted in any file a resume reads never runs, `--resume
never` into a used folder loses nothing, a killed run's leftovers are tidied or restored, files
honour the umask, a rerun killed before its report reports real losses, over-long samples are cut
without touching visual tokens, bad images can be skipped, and chat refuses an over-long prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

import torch  # noqa: E402

from recipes.train import main  # noqa: E402
from tests.test_faults import payload_bytes  # noqa: E402
from tests.test_train import TINY, _sets, _weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp: Path, out: Path, **extra: str) -> list[str]:
    return ["--config", str(TINY / "stage1.yaml"), *_sets(tmp, "unused", **extra),
            "--set", f"training.output_dir={out}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step stage-I run (checkpoints at steps 2 and 4) and its arguments."""
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    main(_args(tmp, out))
    return tmp, out


def _crashed_copy(run, dest: Path) -> Path:
    """A copy of the run as if killed after the step-2 checkpoint."""
    tmp, out = run
    shutil.copytree(out, dest)
    shutil.rmtree(dest / "final")
    shutil.rmtree(dest / "checkpoints" / "step-0000004")
    (dest / "checkpoints" / "latest").write_text("step-0000002")
    (dest / "report.json").unlink()
    return dest


def test_a_resume_runs_no_code_from_any_file_it_reads(run, tmp_path):
    """Each file a resume reads, replaced by a pickle payload (was: rng-rank0.pt ran it and the
    run finished silently)."""
    tmp, _ = run
    marker = tmp_path / "ran"
    template = _crashed_copy(run, tmp_path / "template")
    files = ["checkpoints/latest", "checkpoints/step-0000002/trainer_state.json",
             "checkpoints/step-0000002/state.pt", "checkpoints/step-0000002/rng-rank0.pt",
             "log.jsonl", "config.yaml", "../data/data.json", "../data/img_00000.png"]
    assert all((template / f).is_file() for f in files[:6])
    outcomes = {}
    for k, name in enumerate(files):
        out = tmp_path / f"try-{k}"
        shutil.copytree(template, out)
        # the data lies in the run's shared folder (its path is part of the fingerprint)
        target = (out / name) if not name.startswith("../") else tmp / name.removeprefix("../")
        kept = target.read_bytes()
        target.write_bytes(payload_bytes(marker))
        try:
            main(_args(tmp, out))
            outcomes[name] = "ran"
        except Exception as exc:  # noqa: BLE001 - the messages are checked below
            outcomes[name] = f"{type(exc).__name__}: {exc}"
        finally:
            if name.startswith("../"):
                target.write_bytes(kept)
        assert not marker.exists(), f"the payload planted in {name} ran"
    assert all(o.startswith(("TrainConfigError", "ValueError", "SlicingError", "ran"))
               for o in outcomes.values()), "\n".join(f"{k}: {v[:150]}" for k, v in outcomes.items())
    assert outcomes["log.jsonl"] == "ran"  # a damaged log loses its rows, not the run
    assert "latest is damaged" in outcomes["checkpoints/latest"]
    assert "torch.load(weights_only=True)" in outcomes["checkpoints/step-0000002/rng-rank0.pt"]
    assert "torch.load(weights_only=True)" in outcomes["checkpoints/step-0000002/state.pt"]
    assert "trainer_state.json' is damaged" in outcomes[
        "checkpoints/step-0000002/trainer_state.json"]
    # a finished run reads its report: planted there, the rerun writes a new one
    done = tmp_path / "done"
    shutil.copytree(run[1], done)
    (done / "report.json").write_bytes(payload_bytes(marker))
    with pytest.raises(ValueError):
        main(_args(tmp, done))
    assert not marker.exists()


@pytest.mark.slow
def test_a_deepspeed_resume_runs_no_pickled_code(run, tmp_path):
    """DeepSpeed unpickles its own files with weights_only=False: every one is inspected first,
    and a planted object outside what DeepSpeed writes is refused by name."""
    pytest.importorskip("deepspeed")
    tmp, _ = run
    out = tmp_path / "ds"
    args = _args(tmp, out, **{"training.deepspeed": "zero2", "training.max_steps": "2",
                              "training.save_every": "1"})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def launch():
        return subprocess.run([sys.executable, str(ROOT / "tests" / "_train_worker.py"), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    first = launch()
    assert first.returncode == 0, first.stderr[-3000:]
    step1 = out / "checkpoints" / "step-0000001"
    pickles = sorted(p.name for p in step1.glob("*.pt"))
    assert len(pickles) >= 3  # model states, optimizer states, rng
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-0000002")
    (out / "checkpoints" / "latest").write_text("step-0000001")
    (out / "report.json").unlink()
    saved = tmp_path / "step1"
    shutil.copytree(step1, saved)
    marker = tmp_path / "ran"
    for name in pickles:
        shutil.rmtree(step1)
        shutil.copytree(saved, step1)
        (step1 / name).write_bytes(payload_bytes(marker))
        proc = launch()
        assert not marker.exists(), f"the payload planted in {name} ran"
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert name in proc.stderr and ("would run code" in proc.stderr
                                        or "weights_only=True" in proc.stderr)
    shutil.rmtree(step1)
    shutil.copytree(saved, step1)
    resumed = launch()  # the untouched checkpoint still resumes
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]


def test_resume_never_into_a_used_folder_sets_the_old_run_aside(run, tmp_path):
    """Was: the old run's higher-numbered checkpoints survived pruning, each new checkpoint was
    deleted as soon as written while ``latest`` named it, and the restart failed."""
    tmp, src = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    old_final = _weights(out / "final")
    args = _args(tmp, out, **{"training.max_steps": "2", "training.save_every": "1"})
    report = main([*args, "--resume", "never"])
    assert report["resumed_from"] == 0 and report["steps"] == 2
    aside = out / "previous-1"
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "latest", "step-0000002", "step-0000004"]
    old = _weights(aside / "final")
    assert all(torch.equal(old[k], old_final[k]) for k in old_final)
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == "step-0000002" and (out / "checkpoints" / latest).is_dir()
    again = main(args)  # auto: the new run is complete
    assert again == json.loads((out / "report.json").read_text())


def test_pruning_never_deletes_what_latest_names(tmp_path):
    from recipes.train_engines import prune_checkpoints

    for step in (1, 2, 3, 6, 8):
        (tmp_path / f"step-{step:07d}").mkdir()
    prune_checkpoints(tmp_path, 3, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-0000002", "step-0000003", "step-0000006", "step-0000008"]
    prune_checkpoints(tmp_path, 2, keep_last=1)
    assert (tmp_path / "step-0000002").is_dir()


def test_a_killed_runs_leftovers_are_tidied_and_a_final_in_replacement_restored(run, tmp_path):
    tmp, src = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    reference = _weights(out / "final")
    # killed inside replace_folder: the old final moved aside, the new one not yet in place
    (out / ".final.old-1a2b3c4d").mkdir()
    os.replace(out / "final", out / ".final.old-1a2b3c4d" / "previous")
    (out / ".final.tmp-5e6f7a8b" / "llm").mkdir(parents=True)
    (out / ".final.tmp-5e6f7a8b" / "llm" / ".model.safetensors.x1y2.tmp").write_bytes(b"0" * 4096)
    (out / ".report.json.ab12cd.tmp").write_text("{")
    (out / "checkpoints" / ".latest.zz99.tmp").write_text("step")
    (out / "checkpoints" / "step-0000003.partial").mkdir()
    # killed while re-saving step 4: the complete one moved aside, the new one not yet in place
    os.replace(out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000004.replaced")
    (out / "checkpoints" / "step-0000002.replaced").mkdir()  # a stale copy beside a whole one
    (out / "notes.txt").write_text("mine")
    report = main(_args(tmp, out))
    assert report == json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.yaml", "final", "log.jsonl", "notes.txt", "report.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step-0000002", "step-0000004"]
    assert (out / "checkpoints" / "step-0000004" / "state.pt").is_file()
    restored = _weights(out / "final")
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[k], reference[k]) for k in reference)


def test_files_honour_the_umask(run, tmp_path):
    tmp, _ = run
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        main(_args(tmp, out, **{"training.max_steps": "1"}))
    finally:
        os.umask(old)
    for name in ("config.yaml", "report.json", "log.jsonl", "final/config.json",
                 "final/model.safetensors", "final/processor_config.json",
                 "checkpoints/latest", "checkpoints/step-0000001/trainer_state.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_a_rerun_killed_before_its_report_reports_the_losses_and_flags_a_rise(run, tmp_path,
                                                                           capsys):
    """Killed between the final checkpoint and report.json: the rerun makes no step; its report
    takes the stage's losses from log.jsonl (was: null), and a loss that rose is flagged."""
    tmp, src = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    (out / "report.json").unlink()
    report = main(_args(tmp, out))
    assert report["loss_first"] == rows[0]["loss"] and report["loss_last"] == rows[-1]["loss"]
    assert report["resumed_from"] == 4 and report["loss_rose"] == (rows[-1]["loss"]
                                                                   > rows[0]["loss"])
    printed = capsys.readouterr()
    assert f"loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}" in printed.out
    # a stage whose loss rose says so
    rows[-1]["loss"] = rows[0]["loss"] + 1.0
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "report.json").unlink()
    report = main(_args(tmp, out))
    assert report["loss_rose"] is True
    assert "the loss of stage I rose" in capsys.readouterr().err


def test_over_long_samples_are_cut_with_one_warning_and_counted(run, tmp_path, capsys):
    """A 600-word answer with an LLM of 512 positions (was: trained at full length)."""
    tmp, _ = run
    data = tmp_path / "data"
    shutil.copytree(tmp / "data", data)
    records = json.loads((data / "data.json").read_text())
    for k in (0, 1):
        records[k]["conversations"][1]["value"] = " ".join(["red"] * 600)
    (data / "data.json").write_text(json.dumps(records))
    report = main(_args(tmp, tmp_path / "o", **{"data.train": str(data / "data.json"),
                                                "data.generate": "", "training.max_steps": "4"}))
    assert report["truncated_samples"] == 2
    err = capsys.readouterr()
    assert err.err.count("samples longer than 512 tokens") == 1
    assert "2 sample(s) were cut to 512 tokens" in err.out


def test_bad_images_are_listed_at_open_or_skipped_with_a_count(run, tmp_path, capsys):
    tmp, _ = run
    data = tmp_path / "data"
    shutil.copytree(tmp / "data", data)
    (data / "img_00002.png").unlink()
    (data / "img_00005.png").write_bytes(b"not an image")
    base = _args(tmp, tmp_path / "o", **{"data.train": str(data / "data.json"),
                                         "data.generate": "", "training.max_steps": "1"})
    with pytest.raises(ValueError, match=r"2 of 16 images .* record 2 .* record 5"):
        main([*base, "--set", "data.check_images=true"])
    # from the command line: one line, exit status 2
    proc = subprocess.run([sys.executable, "-m", "recipes.train", *base,
                           "--set", "data.check_images=true"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("train: 2 of 16 images")
    with pytest.warns(UserWarning, match="2 of 16 records"):
        report = main([*base, "--set", "data.skip_bad_images=true"])
    assert report["steps"] == 1
    assert "skipped 2 record(s) with a bad image" in capsys.readouterr().out


def test_chat_refuses_a_prompt_longer_than_the_llm(run, capsys):
    from recipes.chat import main as chat

    tmp, out = run
    base = ["--model", str(out / "final"), "--image", str(tmp / "data" / "img_00000.png"),
            "--question", "what color is the square ?"]
    assert chat([*base, "--max-new-tokens", "600"]) == 2
    err = capsys.readouterr().err
    assert "more than the LLM's 512 positions" in err and err.startswith("chat: error:")
    assert chat([*base, "--max-new-tokens", "2"]) == 0


def test_checkpoints_written_before_the_new_data_keys_still_resume():
    """The fingerprint leaves out data keys added later while at their default (a checkpoint
    written without them would read as another configuration); check_images never counts."""
    from recipes.train_config import load_config
    from recipes.train_runtime import config_differences, config_fingerprint

    stage1 = TINY / "stage1.yaml"
    old = config_fingerprint(load_config(stage1))
    for key in ("check_images", "skip_bad_images", "max_length"):
        assert key not in old["data"]
    assert config_differences(old, config_fingerprint(load_config(
        stage1, ["data.check_images=true"]))) == []
    assert config_differences(old, config_fingerprint(load_config(
        stage1, ["data.skip_bad_images=true"]))) == ["data.skip_bad_images"]


def test_non_finite_vision_features_stop_the_run_naming_the_records(run, tmp_path):
    """An encoder whose weights hold a NaN (a damaged save): the first forward stops, naming the
    batch's records, before a NaN loss or update."""
    from safetensors.torch import load_file, save_file

    tmp, src = run
    folder = tmp_path / "init"
    shutil.copytree(src / "final", folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("patch_embedding.weight"))
    state[name][0, 0, 0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match=r"the vision features of record \d+ \(id "
                                                 r"'color-\d+'\), record \d+ .* are not finite"):
        main(["--config", str(TINY / "stage2.yaml"), *_sets(tmp, "unused", **{
            "model.init_from": str(folder), "training.max_steps": "1"}),
            "--set", f"training.output_dir={tmp_path / 'o'}"])
    assert not (tmp_path / "o" / "final").exists()
