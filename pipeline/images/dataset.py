"""Training and mining read images through the cache, as dict samples (torchxrayvision style).

The index (ids, labels, frames, cache locations, boxes: `CacheIndex`) is read from the warehouse once, in the
constructor with a short read-only connection, or handed in (a flow reads it once for all its tasks); afterwards
the dataset only reads cache shards (`pipeline.images.cache.gather`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.base.coords import image_to_input
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS, INDEX
from pipeline.images import cache
from warehouse import db

NORM_MEAN, NORM_STD = 0.449, 0.226  # gray ImageNet statistics (mean of the RGB ones), see docs/architecture.md


def normalize(images: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 `[B,1,S,S]` -> normalized float on `device`; the data path moves uint8 and converts late."""
    x = images.to(device=device, non_blocking=True).to(dtype)
    return x.mul_(1.0 / (255.0 * NORM_STD)).sub_(NORM_MEAN / NORM_STD)  # in place: one pass less


@dataclass
class CacheIndex:
    """What a `CacheDataset` reads from the warehouse, as plain arrays (picklable): its images' ids (sorted),
    frames, cache shards and rows, recorded crc32s (-1: none), labels and, `with_boxes`, truth boxes (position ->
    [(finding index, x, y, w, h)]). A flow reads it once (`read`) and hands each task its part (`subset`), so
    the tasks open no connection."""
    size: int
    image_ids: list
    frames: np.ndarray
    shards: np.ndarray
    rows: np.ndarray
    checksums: np.ndarray
    labels: np.ndarray
    with_boxes: bool = False
    boxes: dict = field(default_factory=dict)

    @classmethod
    def read(cls, con, size: int, split: str | None = None, image_ids=None, with_boxes: bool = False) -> "CacheIndex":
        """The images cached at `size` (of `split`; of `image_ids`, leaving out those not cached) on `con`."""
        where, params = ["c.size = ?"], [int(size)]
        if split is not None and split != "all":
            where.append("i.split = ?")
            params.append(split)
        if image_ids is not None:
            where.append("i.image_id IN (SELECT unnest(?))")
            params.append(sorted(set(image_ids)))
        rows = con.execute(f"""
            SELECT i.image_id, i.width, i.height, c.shard, c.row, coalesce(CAST(k.crc32 AS BIGINT), -1)
            FROM images i JOIN cache_entries c ON c.source_sha256 = i.source_sha256
            LEFT JOIN cache_checksums k ON k.source_sha256 = c.source_sha256 AND k.size = c.size
            WHERE {' AND '.join(where)} ORDER BY i.image_id""", params).fetchall()
        ids = [r[0] for r in rows]
        pos = {iid: k for k, iid in enumerate(ids)}
        labels = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
        # only these images: a mining shard's index must not read the whole table
        for iid, finding in con.execute("SELECT image_id, finding FROM labels WHERE image_id IN "
                                        "(SELECT unnest(?))", [ids]).fetchall():
            labels[pos[iid], INDEX[finding]] = 1.0
        boxes: dict[int, list] = defaultdict(list)
        if with_boxes:
            for iid, finding, x, y, w, h in con.execute(
                    "SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE image_id IN (SELECT unnest(?)) "
                    "ORDER BY ALL", [ids]).fetchall():
                boxes[pos[iid]].append((INDEX[finding], x, y, w, h))
        return cls(int(size), ids, np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2),
                   np.array([r[3] for r in rows], dtype=np.int64), np.array([r[4] for r in rows], dtype=np.int64),
                   np.array([r[5] for r in rows], dtype=np.int64), labels, with_boxes, dict(boxes))

    def subset(self, image_ids, strict: bool = True) -> "CacheIndex":
        """The index of `image_ids` (in this index's order); `strict`: a KeyError names those it lacks."""
        wanted = set(image_ids)
        keep = [k for k, iid in enumerate(self.image_ids) if iid in wanted]
        missing = wanted - {self.image_ids[k] for k in keep}
        if strict and missing:
            raise KeyError(f"{len(missing)} image(s) not in the {self.size}px cache, e.g. {sorted(missing)[:3]}")
        new = {old: k for k, old in enumerate(keep)}
        idx = np.array(keep, dtype=np.int64)
        return CacheIndex(self.size, [self.image_ids[k] for k in keep], self.frames[idx], self.shards[idx],
                          self.rows[idx], self.checksums[idx], self.labels[idx], self.with_boxes,
                          {new[k]: b for k, b in self.boxes.items() if k in new})


class CacheDataset(torch.utils.data.Dataset):
    def __init__(self, home, size: int = 256, split: str | None = None, image_ids=None, with_boxes: bool = False,
                 index: CacheIndex | None = None, con=None):
        """The images cached at `size` (of `split`, or `image_ids`: a KeyError names those not cached). Their
        `index` is read on `con`, else on a short read-only connection of its own, unless given (then `size` and
        `split` are its own)."""
        self.home = home if isinstance(home, Home) else Home.resolve(home)
        if index is None:
            with db.reading(self.home, con) as con:
                index = CacheIndex.read(con, size, split, image_ids, with_boxes)
        elif with_boxes and not index.with_boxes:
            raise ValueError("with_boxes needs an index read with_boxes")
        if image_ids is not None:
            index = index.subset(image_ids)
        self.index, self.size, self.with_boxes = index, index.size, index.with_boxes
        self.image_ids, self.frames, self.labels = index.image_ids, index.frames, index.labels
        self.shards, self.rows, self.checksums, self.boxes = index.shards, index.rows, index.checksums, index.boxes

    def __len__(self) -> int:
        return len(self.image_ids)

    def _boxes(self, i: int):
        items = self.boxes.get(i, [])
        xywh = image_to_input([b[1:] for b in items], self.frames[i], self.size).astype(np.float32)
        return torch.from_numpy(xywh.reshape(-1, 4)), torch.tensor([b[0] for b in items], dtype=torch.int64)

    def __getitem__(self, i: int) -> dict:
        return self._unbatch(self.get_batch([i]), 0)

    def get_batch(self, indices, out: torch.Tensor | None = None, verify: bool = False) -> dict:
        """Stacked samples for `indices`, read straight from the cache shards; the images into
        `out` (uint8 `[B,1,S,S]`, e.g. page-locked memory for a fast copy to a GPU) when given. `verify`: each
        image against its recorded crc32 (`cache.DamagedCache` names the first that differs)."""
        idx = np.asarray(indices, dtype=np.int64)
        images = cache.gather(self.home.cache, self.size, self.shards[idx], self.rows[idx],
                              out=None if out is None else out.numpy()[:, 0])
        if verify:
            self._verify(idx, images)
        batch = {
            "image": out if out is not None else torch.from_numpy(images).unsqueeze(1),
            "labels": torch.from_numpy(self.labels[idx]),
            "image_id": [self.image_ids[i] for i in idx],
            "frame": torch.from_numpy(self.frames[idx]),
        }
        if self.with_boxes:
            pairs = [self._boxes(int(i)) for i in idx]
            batch["boxes"] = [p[0] for p in pairs]
            batch["box_findings"] = [p[1] for p in pairs]
        return batch

    def _verify(self, idx: np.ndarray, images: np.ndarray) -> None:
        for k, i in enumerate(idx):
            if self.checksums[i] >= 0 and cache.checksum(images[k]) != self.checksums[i]:
                path = cache.shard_path(self.home.cache, self.size, int(self.shards[i]))
                raise cache.DamagedCache(f"cached image {self.image_ids[i]} ({path}, row {self.rows[i]}) does not "
                                         "match its recorded crc32; run `harvest check --repair`")

    @staticmethod
    def _unbatch(batch: dict, k: int) -> dict:
        return {key: (val[k]) for key, val in batch.items()}
