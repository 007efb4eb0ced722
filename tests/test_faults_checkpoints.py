"""Fault injection into checkpoints: every kind of damage is caught before anything is loaded, `--resume auto` falls
back to the newest checkpoint that passes (saying which it skipped and why) and then repeats the uninterrupted run's
losses exactly; an explicit `--resume PATH` that fails, and a run whose every checkpoint fails, end with one clear
line (exit 2); `xvlm verify RUN` finds the same damage."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from storage.errors import XvlmError
from tools.cli import main as xvlm
from train import checkpoint as ckpt
from train.config import load_config
from train.loop import train
from train.metrics import read_metrics

TINY = str(Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml")
STEPS = 6          # checkpoints at 2, 4 and 6


def config(out: Path, *overrides: str):
    return load_config(TINY, [f"out={json.dumps(str(out))}", "data.synthetic=true", f"schedule.steps={STEPS}",
                              "schedule.warmup_steps=1", "checkpoint.every=2", "checkpoint.keep=3",
                              "logging.progress=false", "logging.tensorboard=false", "data.image_text_batch_size=4",
                              "data.region_batch_size=4", "data.region_max_images=2", *overrides])


def losses(out: Path) -> list[tuple]:
    return [(e["step"], e["loss"], e["losses"]) for e in read_metrics(str(out / "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-ckpt") / "reference"
    train(config(out))
    assert [s for s, _ in ckpt.committed_checkpoints(str(out))] == [2, 4, 6]
    return out


def folder(out: Path, step: int) -> Path:
    return Path(ckpt.checkpoint_path(str(out), step))


def flip_byte(path: Path, at: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_model(out):
    flip_byte(folder(out, 6) / ckpt.MODEL_FILE)


def _model_of_another_checkpoint(out):
    shutil.copy(folder(out, 4) / ckpt.MODEL_FILE, folder(out, 6) / ckpt.MODEL_FILE)


def _marker_of_another_step(out):
    shutil.copy(folder(out, 4) / ckpt.MARKER, folder(out, 6) / ckpt.MARKER)


def _truncated_model(out):
    path = folder(out, 6) / ckpt.MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _marker_not_json(out):
    (folder(out, 6) / ckpt.MARKER).write_bytes(b"\x00garbage{")


def _flip_trainer(out):
    flip_byte(folder(out, 6) / ckpt.TRAINER_FILE, at=100_000)


def _rank_file_missing(out):
    (folder(out, 6) / ckpt.rank_file(0)).unlink()


def _longer_trainer(out):
    with open(folder(out, 6) / ckpt.TRAINER_FILE, "ab") as f:
        f.write(b"\0" * 10)


DAMAGE = {  # how checkpoint 6 is damaged -> what the skip message must say
    "flipped model byte": (_flip_model, "model.safetensors does not match the sha256"),
    "model from another checkpoint": (_model_of_another_checkpoint, "model.safetensors does not match the sha256"),
    "marker of another step": (_marker_of_another_step, "names step 4, the folder is step 6"),
    "truncated model": (_truncated_model, "model.safetensors has"),
    "marker not JSON": (_marker_not_json, "COMMITTED is not UTF-8 JSON"),
    "flipped trainer byte": (_flip_trainer, "trainer.pt does not match the sha256"),
    "rank file missing": (_rank_file_missing, "rank-00000.pt is missing"),
    "trainer longer than recorded": (_longer_trainer, "trainer.pt has"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_kind_of_damage_is_refused_before_loading(reference, tmp_path, damage):
    corrupt, message = DAMAGE[damage]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    corrupt(out)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load(str(folder(out, 6)), rank=0, world_size=1)
    problems = ckpt.check(str(folder(out, 6)))                  # what `xvlm verify RUN` reports
    assert problems and any(message in p for p in problems), problems
    ckpt.load(str(folder(out, 4)), rank=0, world_size=1)        # the older one is untouched


@pytest.mark.parametrize("damage", ["model from another checkpoint", "marker of another step"])
def test_resume_auto_skips_a_damaged_checkpoint_and_repeats_the_losses(reference, tmp_path, caplog, damage):
    corrupt, message = DAMAGE[damage]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    corrupt(out)
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        summary = train(config(out))
    skipped = [r.getMessage() for r in caplog.records if "skipping a checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "ckpt-00000006" in skipped[0] and message in skipped[0], skipped
    assert summary["start_step"] == 4 and summary["steps"] == STEPS
    assert losses(out) == losses(reference)                    # steps 5-6 redone exactly
    assert ckpt.check(str(folder(out, 6))) == []               # and checkpoint 6 written anew


def test_explicit_resume_of_a_damaged_checkpoint_is_one_clear_line(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _flip_trainer(out)
    code = xvlm(["train", "--config", TINY, "--out", str(out), "--resume", str(folder(out, 6)), "data.synthetic=true",
                 f"schedule.steps={STEPS}", "schedule.warmup_steps=1", "checkpoint.every=2", "logging.progress=false",
                 "logging.tensorboard=false", "data.image_text_batch_size=4", "data.region_batch_size=4",
                 "data.region_max_images=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--resume" in err[0] and "trainer.pt does not match the sha256" in err[0] and "--resume auto" in err[0]


def test_a_run_whose_every_checkpoint_fails_stops_with_the_reasons(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in (2, 4, 6):
        flip_byte(folder(out, step) / ckpt.MODEL_FILE)
    with pytest.raises(XvlmError, match="no checkpoint in .* passes its checks .*ckpt-00000002.*model.safetensors"):
        train(config(out))


def test_verify_run_reports_damage_and_the_checkpoint_resume_would_take(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert xvlm(["verify", str(out), "--no-progress"]) == 0
    assert "3 committed checkpoint(s), every file matches its marker" in capsys.readouterr().out
    _model_of_another_checkpoint(out)
    (folder(out, 8)).mkdir()                                    # a save that never finished
    (folder(out, 8) / ckpt.MODEL_FILE).write_bytes(b"partial")
    assert xvlm(["verify", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "ckpt-00000006: [checkpoint] model.safetensors does not match the sha256" in printed
    assert "`--resume auto` continues from ckpt-00000004" in printed and "ckpt-00000008" in printed
    assert xvlm(["verify", str(folder(out, 4)), "--no-progress"]) == 0      # one checkpoint folder


def test_a_checkpoint_from_before_the_hashes_still_resumes_with_a_warning(reference, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    marker = folder(out, 6) / ckpt.MARKER
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({"step": 6, "world_size": 1, "files": sorted(old["files"]), "format_version": 1}))
    assert xvlm(["verify", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ckpt-00000006" in printed and "nothing to verify them against" in printed
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        state = ckpt.load(str(folder(out, 6)), rank=0, world_size=1)
    assert state.step == 6 and any("not verified" in r.getMessage() for r in caplog.records)
