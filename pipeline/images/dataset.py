"""Training and mining read images through the cache, as dict samples (torchxrayvision style).

The index (ids, labels, frames, cache locations, boxes) is read from the warehouse once, in the constructor,
with a short read-only connection; afterwards the dataset only reads cache shards (`pipeline.images.cache.gather`).
"""
from __future__ import annotations

from collections import defaultdict

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


class CacheDataset(torch.utils.data.Dataset):
    def __init__(self, home, size: int = 256, split: str | None = None, image_ids=None, with_boxes: bool = False):
        self.home = home if isinstance(home, Home) else Home.resolve(home)
        self.size = int(size)
        self.with_boxes = with_boxes
        con = db.connect(self.home, read_only=True)
        try:
            where, params = ["c.size = ?"], [self.size]
            if split is not None and split != "all":
                where.append("i.split = ?")
                params.append(split)
            rows = con.execute(f"""
                SELECT i.image_id, i.width, i.height, c.shard, c.row, coalesce(CAST(k.crc32 AS BIGINT), -1)
                FROM images i JOIN cache_entries c ON c.source_sha256 = i.source_sha256
                LEFT JOIN cache_checksums k ON k.source_sha256 = c.source_sha256 AND k.size = c.size
                WHERE {' AND '.join(where)} ORDER BY i.image_id""", params).fetchall()
            if image_ids is not None:
                wanted = set(image_ids)
                rows = [r for r in rows if r[0] in wanted]
                missing = wanted - {r[0] for r in rows}
                if missing:
                    raise KeyError(f"{len(missing)} image(s) not in the {self.size}px cache, e.g. {sorted(missing)[:3]}")
            self.image_ids = [r[0] for r in rows]
            self.frames = np.array([(r[1], r[2]) for r in rows], dtype=np.float64).reshape(-1, 2)
            self.shards = np.array([r[3] for r in rows], dtype=np.int64)
            self.rows = np.array([r[4] for r in rows], dtype=np.int64)
            self.checksums = np.array([r[5] for r in rows], dtype=np.int64)   # -1: none recorded
            pos = {iid: k for k, iid in enumerate(self.image_ids)}
            self.labels = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
            # only this dataset's images: a mining shard must not read the whole table
            for iid, finding in con.execute("SELECT image_id, finding FROM labels WHERE image_id IN "
                                            "(SELECT unnest(?))", [self.image_ids]).fetchall():
                self.labels[pos[iid], INDEX[finding]] = 1.0
            self.boxes: dict[int, list] = defaultdict(list)
            if with_boxes:
                for iid, finding, x, y, w, h in con.execute(
                        "SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE image_id IN (SELECT unnest(?)) "
                        "ORDER BY ALL", [self.image_ids]).fetchall():
                    self.boxes[pos[iid]].append((INDEX[finding], x, y, w, h))
        finally:
            con.close()

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
