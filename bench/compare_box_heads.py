"""The paper's box head vs our soft-argmax and dense heads through the whole quickstart pipeline (sample scenes ->
shards -> trainer -> held-out evaluation), at equal steps: grounding and retrieval curves (PNG + JSON).

    python bench/compare_box_heads.py --out xvlm-quickstart            # the quickstart's budget, every head
    python bench/compare_box_heads.py --out /tmp/heads --steps 200 --eval-points 8

Runs that already exist in OUT (e.g. from `xvlm quickstart --compare-heads`) are reused, not retrained.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.config import BOX_HEADS
from tools import quickstart

HEADS = BOX_HEADS                      # "xvlm" (the paper's) is the baseline of the printed ratios


def curves(result: dict) -> dict[str, list]:
    """step -> held-out metrics along training, plus the final evaluation."""
    points = [(e["step"], e["eval"]) for e in result["curve"] if e.get("eval")]
    out = {"step": [s for s, _ in points]}
    for key in ("grounding_acc", "grounding_miou", "i2t_r1", "t2i_r1"):
        out[key] = [m.get(key) for _, m in points]
    return out


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for head, result in results.items():
        c = curves(result)
        style = "--" if head == "xvlm" else "-"
        axes[0].plot(c["step"], c["grounding_acc"], style, marker="o", ms=3, label=f"{head}: acc@0.5")
        axes[0].plot(c["step"], c["grounding_miou"], style, marker=".", ms=3, alpha=0.6, label=f"{head}: mean IoU")
        axes[1].plot(c["step"], c["i2t_r1"], style, marker="o", ms=3, label=f"{head}: i2t R@1")
    const = next(iter(results.values()))["metrics"].get("grounding_acc_constant_box")
    if const is not None:
        axes[0].axhline(const, color="grey", lw=0.8, ls=":", label="constant box")
    axes[0].set_title("grounding on 200 held-out scenes")
    axes[1].set_title("image->text retrieval on 200 held-out scenes")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=quickstart.DEFAULT_OUT, help="quickstart output folder (shared data)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per head (default: the config's)")
    parser.add_argument("--eval-points", type=int, default=quickstart.EVAL_POINTS,
                        help="held-out evaluations along each run")
    parser.add_argument("--images", type=int, default=quickstart.DEFAULT_IMAGES, help="training pictures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quickstart.EVAL_POINTS = args.eval_points
    layout = quickstart.Layout(Path(args.out).resolve())
    quickstart.make_sample_data(layout, args.images, quickstart.VAL_IMAGES, seed=0)
    quickstart.build_shards(layout)
    results = {head: quickstart.train_and_evaluate(layout, head, args.steps, smoke=False) for head in HEADS}
    png = layout.report / "box_heads.png"
    plot(results, png)
    numbers = {head: {"steps": r["steps"], "train_wall_s": r["train_wall_s"], "final": r["metrics"],
                      "curve": curves(r)} for head, r in results.items()}
    (layout.report / "box_heads.json").write_text(json.dumps(numbers, indent=2) + "\n")
    ours = [head for head in HEADS if head != "xvlm"]
    print(f"\n{'step':>6} | {'xvlm acc@0.5':>12} | " + " | ".join(f"{h + ' acc@0.5':>18} | ratio" for h in ours))
    base = numbers["xvlm"]["curve"]
    for i, step in enumerate(base["step"]):
        cells = []
        for head in ours:
            curve = numbers[head]["curve"]
            if i < len(curve["step"]):
                a, b = base["grounding_acc"][i], curve["grounding_acc"][i]
                cells.append(f"{b:>18.3f} | {f'{b / a:.2f}x' if a else 'inf':>5}")
        print(f"{step:>6} | {base['grounding_acc'][i]:>12.3f} | " + " | ".join(cells))
    for head in HEADS:
        final = numbers[head]["final"]
        print(f"final {head:>10}: grounding acc@0.5 {final.get('grounding_acc', 0):.3f}, mean IoU "
              f"{final.get('grounding_miou', 0):.3f}, i2t R@1 {final.get('i2t_r1', 0):.3f} "
              f"({numbers[head]['steps']} steps, {numbers[head]['train_wall_s'] / 60:.1f} min)")
    print(f"wrote {png} and {layout.report / 'box_heads.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
