"""`xvlm finetune` end to end on the sample downstream sets: retrieval and grounding locally (per-epoch val scores,
test scores), from S3 with kill -9 and `--resume auto` (bit-identical to an uninterrupted run), the batch stream's
exact resume, lr x2 for the parameters the checkpoint lacks, and bad configs (exit 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import storage
from model.config import preset
from model.io import save_model
from model.xvlm import build_model
from tools.cli import main
from train import checkpoint as ckpt
from train.config import load_config
from train.metrics import METRICS_FILE, local_metrics_dir, read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
RETRIEVAL = CONFIGS / "finetune_retrieval_coco.yaml"
GROUNDING = CONFIGS / "finetune_grounding_refcoco+.yaml"
COMPARED = ("step", "loss", "losses", "lr", "grad_norm")
TIMEOUT = 300


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, str]:
    """The downstream sample sets, their tokenizer, and two tiny 'pretrained' models (xvlm and dense box heads)."""
    from sampledata import downstream
    from sampledata.sample_data import write_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    downstream.write_all(root / "downstream", seed=3)
    write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    for head in ("xvlm", "dense"):
        save_model(build_model(preset("tiny", vocab_size=160, box_head=head)), str(root / f"init-{head}.safetensors"))
    return {"root": str(root), "data": str(root / "downstream"), "tokenizer": str(root / "tokenizer"),
            "init": str(root / "init-xvlm.safetensors"), "init_dense": str(root / "init-dense.safetensors")}


def data_overrides(task: str, data: str, tokenizer: str, *, val: bool = True, test: bool = True) -> list[str]:
    """The sample sets in place of the shipped configs' paths; the tiny model stays at 64 px (no window)."""
    if task == "retrieval":
        files = {"train": "coco_train.json", "val": "coco_val.json", "test": "coco_test.json"}
    else:
        files = {"train": "refcoco+_train.json", "val": "refcoco+_val.json", "test": "refcoco+_test.json"}
    out = [f"finetune.train_file=[{storage.join(data, files['train'])}]",
           f"finetune.val_file={storage.join(data, files['val']) if val else ''}",
           f"finetune.test_file=[{storage.join(data, files['test']) if test else ''}]",
           f"finetune.image_root={storage.join(data, 'images')}", f"finetune.tokenizer={tokenizer}",
           "model.vision_kwargs={}", "model.image_res=64", "finetune.k_test=8", "logging.progress=false",
           "logging.tensorboard=false"]
    if task == "grounding":
        out.append(f"finetune.refcoco_data={storage.join(data, 'refcoco+')}")
    if not test:
        out[2] = "finetune.test_file=[]"
    return out


def run_cli(*args: str) -> int:
    return main(["--log-level", "WARNING", *args])


# ---------------------------------------------------------------------------------------------- end to end, local


@pytest.mark.parametrize("task", ["retrieval", "grounding"])
def test_finetune_end_to_end_locally(sample, tmp_path, task):
    out = tmp_path / "run"
    config = RETRIEVAL if task == "retrieval" else GROUNDING
    summary = tmp_path / "summary.json"
    rc = run_cli("finetune", task, "--config", str(config), "--init", sample["init"], "--out", str(out),
                 "--summary-json", str(summary), *data_overrides(task, sample["data"], sample["tokenizer"]),
                 "finetune.epochs=2", "finetune.batch_size=32")
    assert rc == 0
    result = json.loads(summary.read_text())
    steps_per_epoch = {"retrieval": 300 // 32, "grounding": None}[task]
    saved = load_config(str(out / "config.yaml"))
    assert saved.finetune.task == task and saved.finetune.init == sample["init"]
    assert saved.schedule.steps == result["steps"] and saved.schedule.warmup_steps == int(0.1 * result["steps"])
    if steps_per_epoch:
        assert result["steps"] == 2 * steps_per_epoch
    metrics = read_metrics(str(out / METRICS_FILE))
    kind = "image_text" if task == "retrieval" else "region"
    losses = ("itc", "itm") if task == "retrieval" else ("bbox", "giou")
    assert set(metrics[0]["losses"]) == {f"{kind}/{name}" for name in losses}
    evaluated = [m for m in metrics if "eval" in m]
    assert [m["step"] for m in evaluated] == [saved.schedule.steps // 2, saved.schedule.steps]   # after each epoch
    expected = {"txt_r1", "img_r1", "r_mean"} if task == "retrieval" else {"val_acc"}
    assert set(evaluated[-1]["eval"]) == expected
    test = json.loads((out / "finetune_results.json").read_text())["test"]
    assert len(test) == 1
    scores = next(iter(test.values()))
    if task == "retrieval":
        assert scores["images"] == 30 and scores["texts"] == 150 and 0 <= scores["txt_r1"] <= 100
    else:
        assert scores["refs"] > 0 and set(scores["splits"]) <= {"testA", "testB"}


# ---------------------------------------------------------------------------------------------- S3, kill -9, resume


def launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "tools.cli", "--log-level", "WARNING", "finetune", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=proc_env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-4000:]


def upload(local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(prefix, path.relative_to(local).as_posix()), path.read_bytes())


@pytest.mark.slow
@pytest.mark.s3
def test_grounding_from_s3_resumes_exactly_after_kill_9(sample, s3_prefix):
    """Annotations, images, the initial model and the run folder on S3; a run killed -9 after its first checkpoint
    and resumed with --resume auto logs the uninterrupted run's losses and ends with the same weights."""
    data = storage.join(s3_prefix, "downstream")
    upload(Path(sample["data"]), data)
    init = storage.join(s3_prefix, "init.safetensors")
    storage.write_bytes(init, Path(sample["init_dense"]).read_bytes())
    common = ["--config", str(GROUNDING), "--init", init,
              *data_overrides("grounding", data, sample["tokenizer"], val=False, test=False),
              "finetune.epochs=1", "finetune.batch_size=24", "checkpoint.every=3", "checkpoint.keep=2",
              "model.box_head=dense"]
    reference = storage.join(s3_prefix, "reference")
    finish(launch(["grounding", "--out", reference, *common]))
    out = storage.join(s3_prefix, "killed")
    proc = launch(["grounding", "--out", out, *common])
    deadline = time.time() + TIMEOUT
    while not ckpt.committed_checkpoints(out) or _logged(out) < 4:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    summary = Path(local_metrics_dir(out)) / "resumed.json"
    finish(launch(["grounding", "--out", out, "--resume", "auto", "--summary-json", str(summary), *common]))
    resumed = json.loads(summary.read_text())
    assert 0 < resumed["start_step"] < resumed["steps"]          # it resumed from a checkpoint inside the epoch
    got, want = read_metrics(storage.join(out, METRICS_FILE)), read_metrics(storage.join(reference, METRICS_FILE))
    assert [{k: e.get(k) for k in COMPARED} for e in got] == [{k: e.get(k) for k in COMPARED} for e in want]
    last = ckpt.committed_checkpoints(out)[-1][1]
    assert ckpt.committed_checkpoints(reference)[-1][0] == ckpt.committed_checkpoints(out)[-1][0]
    ours = storage.read_bytes(storage.join(last, ckpt.MODEL_FILE))
    theirs = storage.read_bytes(storage.join(ckpt.committed_checkpoints(reference)[-1][1], ckpt.MODEL_FILE))
    assert ours == theirs


def _logged(out: str) -> int:
    path = os.path.join(local_metrics_dir(out), METRICS_FILE)
    entries = read_metrics(path) if os.path.exists(path) else []
    return entries[-1]["step"] if entries else 0


# ---------------------------------------------------------------------------------------------- parts


def test_batch_stream_resumes_where_it_stopped_and_splits_ranks(sample):
    from shards.downstream import read_retrieval_train
    from shards.downstream_batches import BatchOptions, DownstreamBatches

    entries = read_retrieval_train(storage.join(sample["data"], "coco_train.json"))
    options = BatchOptions(image_res=32, grid=4, batch_size=40, tokenizer=sample["tokenizer"], seed=5)
    root = storage.join(sample["data"], "images")
    whole = DownstreamBatches("retrieval", entries, root, options)
    assert whole.steps_per_epoch == 7
    from train.loop import endless

    stream = endless(whole)            # the trainer's epoch after epoch
    first = [next(stream) for _ in range(3)]
    state = whole.state_dict()
    rest = [next(stream) for _ in range(6)]          # 4 more of epoch 0, then 2 of epoch 1
    again = DownstreamBatches("retrieval", entries, root, options)
    again.load_state_dict(state)
    resumed = endless(again)
    for want in rest:
        got = next(resumed)
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["text_ids"], want["text_ids"])
        assert torch.equal(got["image_ids"], want["image_ids"])
    assert not torch.equal(first[0]["image"], rest[4]["image"])       # epochs are shuffled differently
    ranks = [DownstreamBatches("retrieval", entries, root, options, rank=r, world_size=2) for r in (0, 1)]
    orders = [set(r.epoch_order(0).tolist()) for r in ranks]
    assert not orders[0] & orders[1] and ranks[0].steps_per_epoch == 3
    with pytest.raises(Exception, match="world size"):
        ranks[0].load_state_dict(state)


def test_parameters_the_checkpoint_lacks_train_at_twice_the_lr(sample):
    """X-VLM's lr_mult 2 goes to init_params, the parameters not loaded from the checkpoint (a full checkpoint: none,
    as in its fine-tuning models; a box head the checkpoint lacks: that head)."""
    from train.config import OptimSection
    from train.initial_model import initial_model
    from train.optim import build_optimizer

    model, new, notes = initial_model(sample["init"], {"image_res": 96})
    assert new == set() and notes == ["pos_embed: 1 tensor(s) (1, 65, 64) -> (1, 145, 64)"]
    groups = build_optimizer(model, OptimSection(lr=3e-5), new).param_groups
    assert {g["lr"] for g in groups} == {3e-5}
    model, new, _ = initial_model(sample["init"], {"box_head": "dense"})
    assert new and all(name.startswith("box_head.") for name in new)
    groups = build_optimizer(model, OptimSection(lr=3e-5, new_param_lr_mult=2.0), new).param_groups
    by_lr: dict[float, int] = {}
    for group in groups:
        by_lr[group["lr"]] = by_lr.get(group["lr"], 0) + sum(p.numel() for p in group["params"])
    named = dict(model.named_parameters())
    assert by_lr[6e-5] == sum(named[n].numel() for n in new)
    assert by_lr[3e-5] == sum(p.numel() for p in model.parameters()) - by_lr[6e-5]


@pytest.mark.parametrize("bad, message", [
    (["finetune.epochs=0"], "finetune.epochs=0"),
    (["loss.mlm=1"], "loss.mlm"),
    (["finetune.batch_size=1"], "finetune.batch_size"),
    (["finetune.nonsense=1"], "unknown config key finetune.nonsense"),
    (["finetune.train_file=[/nonexistent/coco_train.json]"], "does not exist"),
    (["model.not_a_field=3"], "not_a_field"),
    (["finetune.max_tokens=65"], "64 text positions"),
    (["compile=true"], "fine-tuning runs eagerly"),
])
def test_bad_configs_exit_2_with_one_line(sample, tmp_path, capsys, bad, message):
    rc = run_cli("finetune", "retrieval", "--config", str(RETRIEVAL), "--init", sample["init"], "--out",
                 str(tmp_path / "run"), *data_overrides("retrieval", sample["data"], sample["tokenizer"]), *bad)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_init_exits_2(sample, tmp_path, capsys):
    rc = run_cli("finetune", "grounding", "--config", str(GROUNDING), "--init", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "run"), *data_overrides("grounding", sample["data"], sample["tokenizer"]))
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_ray_workers_need_shared_finetune_paths(sample, tmp_path):
    """`xvlm submit` / ray-train runs fine-tuning configs too; their files must be where every node sees them."""
    from storage.errors import XvlmError
    from train.ray_train import check_shared_paths

    overrides = data_overrides("retrieval", sample["data"], sample["tokenizer"])
    cfg = load_config(str(RETRIEVAL), [*overrides, f"out={tmp_path}", f"finetune.init={sample['init']}",
                                       "finetune.task=retrieval"])
    check_shared_paths(cfg)
    cfg.finetune.image_root = "downstream/images"
    with pytest.raises(XvlmError, match="finetune.image_root"):
        check_shared_paths(cfg)


def test_grounding_view_keeps_the_box_on_its_object(sample, tmp_path):
    """The training view (crop that keeps the box, mirror, resize, RandAugment): the target box is where the object
    landed in the pixels, for many draws."""
    import numpy as np
    from PIL import Image

    from shards.downstream import GroundingRef
    from shards.downstream_batches import BatchOptions, DownstreamBatches

    pixels = np.zeros((120, 200, 3), np.uint8)
    pixels[30:70, 120:170] = 255                                  # the object: x 120..170, y 30..70
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    ref = GroundingRef("scene.png", "the white box", 1, (120.0, 30.0, 50.0, 40.0), "train", 200, 120)
    res = 64
    stream = DownstreamBatches("grounding", [ref, ref], str(tmp_path),
                               BatchOptions(image_res=res, grid=8, batch_size=2, tokenizer=sample["tokenizer"]))
    flips = 0
    for epoch in range(12):
        batch = stream.build_batch([0, 1], epoch)
        for row in range(2):
            image = batch["image"][row].mean(0)
            ys, xs = torch.nonzero(image > image.mean(), as_tuple=True)
            found = torch.tensor([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2,
                                  xs.max() - xs.min() + 1, ys.max() - ys.min() + 1], dtype=torch.float32) / res
            assert torch.allclose(batch["target_bbox"][row], found, atol=2.5 / res), (epoch, row)
            flips += int(batch["target_bbox"][row][0] < 0.5)
    assert flips > 0       # some views were mirrored (the object sits right of centre)
