"""Per-class AUROC on the validation split (the classification metric of ChestX-ray14).

`auroc` is the rank (Mann-Whitney U) formula with tie-averaged ranks, O(n log n) per class:
    AUC = (sum of positives' ranks - P(P+1)/2) / (P N)
`auroc_reference` is the slow, obviously correct pairwise version, kept for the test that holds them equal:
    AUC = mean over (positive, negative) pairs of [s_p > s_n] + 0.5 [s_p == s_n].
A class without positives or without negatives has no AUROC (NaN).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores, labels `[n, C]` -> AUROC `[C]` (NaN where a class lacks positives or negatives)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        pos = labels[:, c]
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = rankdata(scores[:, c])            # average ranks for ties
            out[c] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def auroc_reference(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pairwise AUROC, O(P N) per class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        sp, sn = scores[labels[:, c], c], scores[~labels[:, c], c]
        if len(sp) and len(sn):
            diff = sp[:, None] - sn[None, :]
            out[c] = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    return out


def summarize(per_class: np.ndarray, loss: float) -> dict:
    """JSON-able metrics: val loss, per-class AUROC by finding name, means over all and over boxed findings."""
    named = {f: (None if np.isnan(v) else round(float(v), 5)) for f, v in zip(FINDINGS, per_class)}
    boxed = [named[f] for f in BOXED_FINDINGS if named[f] is not None]
    every = [v for v in named.values() if v is not None]
    return {
        "val_loss": round(float(loss), 6),
        "auroc": named,
        "auroc_mean": round(float(np.mean(every)), 5) if every else None,
        "auroc_boxed_mean": round(float(np.mean(boxed)), 5) if boxed else None,
    }
