"""The box rule's candidates of #19 item 2, on the validation split only: mining input size x AM steps T.

For each (input size, T) the model's validation images (held out by training, by patient) go through the model
once; the best threshold triple for all findings is chosen there (`pipeline.evaluation.tune`), beside it the
per-finding rule of `harvest tune --per-finding` (chosen and scored on the same images: in-sample), and the
diagnosis of the fused map H_f (pointing, contrast, share >= 0.5; `pipeline.evaluation.diagnose`) is taken on
the same images. `--data-home` takes the validation images from another home (a larger phantom of a seed no
evaluation uses) and the model from `--home`. T=1 boxes the plain CAM H_1 (no eq. 8 fusion), T=3 the fused H_f: the spread of eq. 8. No
evaluation box is looked at. Sizes other than the training size need their cache:
`harvest ingest nih --root PHANTOM --sizes 384,512`.

    python bench/box_rule.py --home H [--model latest] [--sizes 256,384,512] [--steps 1,3] [--data-home D]
    python bench/box_rule.py --quick     # a 40-image phantom at 64/96 px, a tiny model (< 1 min)

Last line: `box rule best/default val acc@0.3 ratio: X` (validation mean Acc@0.3 of the best (size, T) over
that of the training size with T=3).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.base.vocab import BOXED_FINDINGS  # noqa: E402
from pipeline.config.mining import MiningConfig  # noqa: E402
from pipeline.evaluation.tune import CANDIDATES, tune  # noqa: E402

QUICK_CANDIDATES = ((0.9, 0.8, 0.7), (0.7, 0.5, 0.3), (0.5, 0.35, 0.2))


def quick_home(root: Path) -> tuple[Path, list[int]]:
    from pipeline.ingest.nih import ingest_nih
    from pipeline.phantom import generate
    from tests.conftest import register_tiny_model
    generate(root / "phantom", n=40, seed=5, size=128, workers=1, progress=False)
    ingest_nih(root / "home", root / "phantom", sizes=(64, 96))
    register_tiny_model(root / "home", "tiny", input_size=64, config={"data": {"input_size": 64, "val_fraction": 0.3}})
    return root / "home", [64, 96]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--model", default="latest")
    ap.add_argument("--sizes", default="256,384,512")
    ap.add_argument("--steps", default="1,3")
    ap.add_argument("--data-home", default=None, help="the validation images' home (default: --home)")
    ap.add_argument("--out", default=None, help="write box_rule.csv (validation Acc) and diagnosis.csv here")
    ap.add_argument("--quick", action="store_true", help="a tiny phantom home in a temporary folder")
    args = ap.parse_args()
    import pandas as pd

    from pipeline.evaluation.diagnose import diagnose
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="bench-box-rule-")
        home, sizes = quick_home(Path(tmp.name))
        model, steps, candidates = "tiny", [1, 3], QUICK_CANDIDATES
    else:
        home, model, candidates = args.home, args.model, CANDIDATES
        sizes, steps = [int(s) for s in args.sizes.split(",")], [int(t) for t in args.steps.split(",")]
    accs, diags = [], []
    for size in sizes:
        for t in steps:
            t0 = time.perf_counter()
            base = MiningConfig(input_size=size, steps=t)
            best, _, own, compare = tune(home, model, candidates, base=base, data=args.data_home)
            compare = compare[compare["finding"].isin(BOXED_FINDINGS)]
            accs.append(compare.assign(size=size, T=t, thresholds=str(tuple(best)), own_thresholds=compare[
                "finding"].map(lambda f: str(tuple(own[f])) if f in own else ""))[
                ["size", "T", "thresholds", "finding", "n_gt", "one_rule", "own_thresholds", "per_finding"]].rename(
                columns={"one_rule": "val_acc", "per_finding": "val_acc_own"}))
            d = diagnose(home, model, steps=t, size=size, last_only=True, data=args.data_home)
            diags.append(d[(d["map"] == "fused") & d["finding"].isin(BOXED_FINDINGS)].assign(size=size, T=t))
            print(f"size {size}, T={t}: best {tuple(best)}, val Acc@0.3 mean {accs[-1]['val_acc'].mean():.3f}; "
                  f"with a rule of its own for each finding {accs[-1]['val_acc_own'].mean():.3f} (in-sample) "
                  f"({time.perf_counter() - t0:.0f} s); own rules: {own or 'none'}", flush=True)
    acc, diag = pd.concat(accs), pd.concat(diags)
    wide = acc.pivot_table(index=["size", "T", "thresholds"], columns="finding", values="val_acc").round(3)
    wide["mean"] = wide.mean(axis=1).round(3)
    print("\nvalidation Acc@0.3 (all/iou on truth) per finding, best triple for all findings:")
    print(wide.to_string())
    print("\ndiagnosis of H_f on the validation images (pointing / contrast / share >= 0.5):")
    print(diag.pivot_table(index=["size", "T"], columns="finding",
                           values=["pointing", "contrast", "share_ge_0.5"]).round(2).T.to_string())
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        acc.to_csv(Path(args.out) / "box_rule.csv", index=False)
        diag.to_csv(Path(args.out) / "diagnosis.csv", index=False)
    means = wide["mean"]
    default = means.xs((sizes[0], 3), level=("size", "T")).iloc[0]
    print(f"box rule best/default val acc@0.3 ratio: {means.max() / default if default else float('nan'):.2f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
