"""Realism from real data: every phantom image takes the label set, patient grouping, age, sex and view of a
sampled row of NIH's `Data_Entry_2017_v2020.csv` (shipped in the torchxrayvision wheel, read without importing
the package), so co-occurrence, class imbalance and the ~54% "No Finding" rate follow the real data.

Sampling is by blocks of up to `BLOCK` consecutive follow-ups of one real patient, drawn uniformly without
replacement: every real row has the same chance to be drawn (image-level statistics stay unbiased) while a
phantom still has patients with several follow-ups, which share one anatomy variant.
"""
from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.vocab import BOXED_FINDINGS, NO_FINDING, parse_labels
from pipeline.phantom.anatomy import checked, package_data

SHA256 = {
    "Data_Entry_2017_v2020.csv.gz": "9d4de640ee4f760215d8be98376b20387ca52f9c6b4d1b727cb588fb82f40b80",
}
BLOCK = 4
TEST_FRACTION = 25596 / 112120          # NIH's official test split, by patient
BOXED_FRACTION = 880 / 112120           # images with a box in BBox_List_2017.csv (all in the test split)
BOXES_PER_IMAGE = 984 / 880
BBOX_HEADER = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]   # as NIH writes it
STATS = Path(__file__).resolve().parents[1] / "data" / "nih_bbox_stats.csv"


@functools.lru_cache(maxsize=1)
def real_entries() -> tuple[list[str], pd.DataFrame]:
    """(header fields as written, rows) of the real Data_Entry file; rows keep NIH's column names."""
    name = "Data_Entry_2017_v2020.csv.gz"
    p = checked(package_data("torchxrayvision") / name, SHA256[name], "torchxrayvision")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    header = list(df.columns)
    df = df.iloc[:, :7].copy()
    df.columns = ["image", "labels", "follow_up", "patient", "age", "sex", "view"]
    df["follow_up"] = df["follow_up"].astype(int)
    df["patient"] = df["patient"].astype(int)
    return header, df


def real_box_stats() -> pd.DataFrame:
    """finding, boxes, median_w, median_h of the real BBox_List_2017.csv (1024 frame)."""
    return pd.read_csv(STATS, comment="#")


def sample_rows(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n real rows by uniform blocks of consecutive follow-ups, renamed into fresh phantom ids.

    Returns columns image (fresh `PPPPPPPP_FFF.png`), patient (fresh int), follow_up, labels, age, sex, view,
    real_image, real_patient.
    """
    _, df = real_entries()
    if n > len(df):
        raise ValueError(f"n={n} is larger than the real dataset ({len(df)} rows)")
    df = df.sort_values(["patient", "follow_up"], kind="stable").reset_index(drop=True)
    rank = df.groupby("patient").cumcount().to_numpy()
    block = df["patient"].to_numpy().astype(np.int64) * 1000 + rank // BLOCK
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    ends = np.r_[starts[1:], len(df)]
    order = rng.permutation(len(starts))
    lens = (ends - starts)[order]
    k = int(np.searchsorted(np.cumsum(lens), n)) + 1
    take = []
    for b in order[:k]:
        take.extend(range(starts[b], ends[b]))
    take = take[:n]
    rows = df.iloc[take].copy()
    rows["real_image"], rows["real_patient"] = rows["image"], rows["patient"]
    # fresh patient ids by first appearance in the draw; follow-ups renumbered in the real order
    first = {p: i + 1 for i, p in enumerate(dict.fromkeys(rows["real_patient"]))}
    rows["patient"] = rows["real_patient"].map(first)
    rows = rows.sort_values(["patient", "follow_up"], kind="stable")
    rows["follow_up"] = rows.groupby("patient").cumcount()
    rows["image"] = [f"{p:08d}_{f:03d}.png" for p, f in zip(rows["patient"], rows["follow_up"])]
    return rows.reset_index(drop=True)


def assign_split(rows: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Patient-level train/test split (NIH has train_val and test lists only) -> bool array `is_test`.

    Repairs keep it usable on small sets: both sides non-empty, and every boxed finding present in the data
    has a test image (it is moved there with its whole patient) so that the boxed subset can cover it."""
    patients = rows["patient"].to_numpy()
    uniq = np.unique(patients)
    test_p = set(uniq[rng.random(uniq.size) < TEST_FRACTION].tolist())
    if len(uniq) >= 2:
        if not test_p:
            test_p.add(int(uniq[-1]))
        if len(test_p) == len(uniq):
            test_p.discard(int(uniq[0]))
    labels = [set(parse_labels(s)) for s in rows["labels"]]
    for f in BOXED_FINDINGS:
        has = [int(p) for p, ls in zip(patients, labels) if f in ls]
        if not has or any(p in test_p for p in has):
            continue
        cands = sorted(set(has))
        if len(cands) >= 2 or len(uniq) - len(test_p) > 1:
            test_p.add(cands[int(rng.integers(len(cands)))])
    return np.isin(patients, sorted(test_p))


def boxed_subset(rows: pd.DataFrame, is_test: np.ndarray, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(image, finding) pairs for BBox_List_2017.csv: test images only, ~0.8% of images, per-class proportions
    of the real list, at least one per boxed finding that has a positive test image."""
    stats = real_box_stats().set_index("finding")
    total = BOXED_FRACTION * BOXES_PER_IMAGE * len(rows)
    labels = [set(parse_labels(s)) for s in rows["labels"]]
    out = []
    for f in BOXED_FINDINGS:
        cands = [r for r in range(len(rows)) if is_test[r] and f in labels[r]]
        if not cands:
            continue
        q = max(1, int(round(total * stats.loc[f, "boxes"] / stats["boxes"].sum())))
        pick = rng.choice(len(cands), size=min(q, len(cands)), replace=False)
        out.extend((rows["image"].iloc[cands[i]], f) for i in sorted(pick))
    return out


def label_frequencies(labels) -> dict[str, float]:
    """Fraction of images carrying each finding (and `No Finding`)."""
    sets = [parse_labels(s) for s in labels]
    n = max(len(sets), 1)
    freq = {NO_FINDING: sum(1 for s in sets if not s) / n}
    for s in sets:
        for f in s:
            freq[f] = freq.get(f, 0) + 1 / n
    return freq


def write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
