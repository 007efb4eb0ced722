"""Held-out check against the official X-VLM code itself: its models, built with random weights, saved as official
checkpoints, imported with `xvlm import-xvlm`, give the same outputs as ours; our export loads into its XVLM with
strict=True and gives our outputs. Max abs difference <= 1e-4 (fp32, CPU) on every output.

Runs only when XVLM_OFFICIAL_REPO names the official repository (a checkout, or a git directory to `git archive`);
its models/xbert.py needs transformers 4.x: put one first with XVLM_OFFICIAL_PYTHONPATH (e.g. the CI's low-end folder,
`pip install --target /tmp/xvlm-lowend --no-deps "transformers==4.45.*" "tokenizers==0.20.*"
"huggingface_hub==0.25.*" "timm==1.0.9"`). XVLM_OFFICIAL_SIZES (default "tiny,base") chooses the sizes;
XVLM_OFFICIAL_REPORT a JSON file for the measured differences (docs/fidelity.md quotes them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from model.concept import concept_embeds, whole_image_atts
from model.io import load_model, save_model
from model.losses import box_losses, itc_loss
from model.xvlm import XVLM
from tools.cli import main as xvlm

OFFICIAL = os.environ.get("XVLM_OFFICIAL_REPO")
pytestmark = [pytest.mark.skipif(not OFFICIAL, reason="XVLM_OFFICIAL_REPO (the official X-VLM code) is not set"),
              pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SIZES = os.environ.get("XVLM_OFFICIAL_SIZES", "tiny,base").split(",")
TOLERANCE = 1e-4
MEASURED: dict[str, dict[str, float]] = {}


def _official_tree(tmp: Path) -> Path:
    repo = Path(OFFICIAL)
    if (repo / "models" / "xvlm.py").is_file():
        return repo
    tree = tmp / "official"                      # a bare git directory: take the files the models need
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "models", "configs", "utils"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _reference(*args: str) -> None:
    """Run tests/official_xvlm_reference.py in the official environment."""
    path = [os.environ["XVLM_OFFICIAL_TREE"], os.environ.get("XVLM_OFFICIAL_PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "official_xvlm_reference.py"), *args], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def official_dirs():
    with tempfile.TemporaryDirectory(prefix="xvlm-official-") as tmp:
        os.environ["XVLM_OFFICIAL_TREE"] = str(_official_tree(Path(tmp)))
        dirs = {}
        for size in SIZES:
            dirs[size] = Path(tmp) / size
            _reference("build", "--size", size, "--out", str(dirs[size]))
        yield dirs
    report = os.environ.get("XVLM_OFFICIAL_REPORT")
    if report:
        Path(report).write_text(json.dumps(MEASURED, indent=2) + "\n")


@torch.no_grad()
def ours(model: XVLM, x: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Our model's outputs under the names tests/official_xvlm_reference.py gives the official ones."""
    model.eval()
    idx, ids, atts = x["image_idx"], x["text_ids"], x["text_atts"]
    vision = model.vision(x["image"])
    rows = vision[idx]
    text = model.text(ids, atts)
    fused = model.fuse_cls(rows, whole_image_atts(rows), text, atts)
    concept, concept_atts = concept_embeds(vision, idx, x["patch_mask"])
    out = {"vision": vision, "text": text, "fused_cls": fused, "concept": concept}
    if kind in ("pretrain", "retrieval"):
        image_feat, text_feat = model.itc.vision_feat(vision[:, 0]), model.itc.text_feat(text[:, 0])
        temp = model.itc.temperature()
        concept_fused = model.fuse_cls(concept, concept_atts, text, atts)
        out.update(image_feat=image_feat, text_feat=text_feat, temp=temp, sim=image_feat @ text_feat.t() / temp,
                   itc=itc_loss(image_feat, text_feat[:2], temp), itm=model.itm_head(fused),
                   concept_feat=model.itc.vision_feat(concept[:, 0]), concept_fused_cls=concept_fused,
                   concept_itm=model.itm_head(concept_fused))
    if kind == "pretrain":
        hidden = model.fusion(model.text(x["text_ids_masked"], atts), atts, rows, whole_image_atts(rows))
        at = hidden.gather(1, x["masked_pos"][..., None].expand(-1, -1, hidden.shape[-1]))
        out["mlm"] = model.mlm_head(at)
    if kind in ("pretrain", "grounding"):
        boxes = model.predict_boxes(rows, text, atts)
        out["boxes"] = boxes
        out["bbox"], out["giou"] = box_losses(boxes, x["target_bbox"], ~x["is_image"].bool())
    return out


def _compare(label: str, official: dict[str, torch.Tensor], mine: dict[str, torch.Tensor]) -> None:
    assert sorted(official) == sorted(mine), (sorted(official), sorted(mine))
    diffs = {name: float((official[name] - mine[name].float()).abs().max()) for name in official}
    MEASURED[label] = diffs
    print(label, json.dumps(diffs))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{label}: {worst} differs by {diffs[worst]:.3g}: {diffs}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "grounding"])
def test_imported_official_checkpoint_gives_the_official_outputs(official_dirs, tmp_path, size, kind):
    work = official_dirs[size]
    args = ["import-xvlm", str(work / f"{kind}.pth"), "--out", str(tmp_path / "imported")]
    assert xvlm(args + ([] if kind == "pretrain" else ["--new-heads"])) == 0
    report = json.loads((tmp_path / "imported" / "import.json").read_text())
    assert report["kind"] == ("pretrain" if kind == "pretrain" else "finetune")
    model = load_model(str(tmp_path / "imported" / "model.safetensors"))
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    official = torch.load(work / f"outputs-{kind}.pth", weights_only=True)
    _compare(f"import {size} {kind}", official, ours(model, inputs, kind))


@pytest.mark.parametrize("size", SIZES)
def test_exported_model_loads_strictly_into_the_official_xvlm_with_our_outputs(official_dirs, tmp_path, size):
    """A model of ours (the imported official one with every weight moved again, so nothing is left of the file it
    came from) is exported; the official pretraining XVLM loads it with strict=True and computes our outputs."""
    work = official_dirs[size]
    assert xvlm(["import-xvlm", str(work / "pretrain.pth"), "--out", str(tmp_path / "imported")]) == 0
    model = load_model(str(tmp_path / "imported" / "model.safetensors"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.itc.temp.fill_(0.09)
    save_model(model, str(tmp_path / "moved" / "model.safetensors"))
    assert xvlm(["export-xvlm", str(tmp_path / "moved"), "--out", str(tmp_path / "exported.pth")]) == 0
    _reference("load", str(tmp_path / "exported.pth"), "--size", size, "--work", str(work))
    official = torch.load(work / "outputs-loaded.pth", weights_only=True)
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    _compare(f"export {size}", official, ours(model, inputs, "pretrain"))
