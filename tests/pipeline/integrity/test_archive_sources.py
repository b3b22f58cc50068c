"""Images ingested from NIH's archives are read from them again after ingest: `harvest check --repair` rebuilds
their cache rows from the members, exports write the members out (`--images link|copy`) or refuse in one line
(`--images none`, a changed archive)."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.base.home import Home
from pipeline.export import write as ex
from pipeline.images import cache
from pipeline.images.dataset import CacheDataset
from pipeline.ingest.nih import ingest_nih
from pipeline.integrity.check import check_home
from pipeline.integrity.repair import Repair
from tests.conftest import gray_image
from tests.pipeline.export.test_export import MODEL, add_mining_run
from tests.pipeline.ingest.test_nih_archives import make_archives
from warehouse import db

ROWS = [(f"{k:08d}_000.png", "Mass", k) for k in range(1, 7)]
RUN = "mine-archives"


@pytest.fixture
def home(make_nih, tmp_path):
    """A home ingested from two archives (the ingest run recorded as the flow records it), mined by one run."""
    src = make_nih(ROWS, test=[ROWS[0][0]])
    download = tmp_path / "download"
    make_archives(src, download, per_archive=3)
    home = Home(tmp_path / "home")
    ingest_nih(home, download, sizes=(32,))
    con = db.connect(home)
    con.execute("INSERT INTO runs VALUES ('ingest-1', 'ingest', ?, NULL, NULL, now(), now(), 'completed')",
                [json.dumps({"kind": "nih", "root": str(download), "sizes": [32]})])
    con.execute("INSERT INTO models VALUES (?, NULL, 'base', 'resnet18', 'bilinear', '{}', 'checkpoints/m.pt', "
                "'abc', NULL, now())", [MODEL])
    con.close()
    add_mining_run(home, RUN, [(ROWS[1][0], "Mass", 1, 10.0, 20.0, 30.0, 40.0, 0.9)], [r[0] for r in ROWS])
    return home


def test_repair_rebuilds_cache_rows_from_the_archive_members(home):
    ds = CacheDataset(home, size=32)
    before = ds.get_batch(list(range(len(ds))))["image"].numpy().copy()
    shard = cache.shard_path(home.cache, 32, int(ds.shards[4]))
    data = bytearray(shard.read_bytes())
    data[int(ds.rows[4]) * 32 * 32 + 5] ^= 0x10
    shard.write_bytes(bytes(data))
    found = [p for p in check_home(home) if p.kind == "cache"]   # (the model's checkpoint is not there: not ours)
    assert [p.path for p in found] == [shard]
    said = []
    Repair(home, say=said.append).run(found)
    assert [p for p in check_home(home) if p.kind == "cache"] == [] and "left the cache" not in said[-1], said
    ds = CacheDataset(home, size=32)
    np.testing.assert_array_equal(ds.get_batch(list(range(len(ds))))["image"].numpy(), before)


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_export_writes_the_members_out(home, tmp_path, mode):
    out = ex.export(home, RUN, "coco", tmp_path / "coco", images=mode)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["extracted"] == 6 and manifest["images"]["linked"] == 0
    src = tmp_path / "nih" / "images"
    written = {p.name: p.read_bytes() for p in (out / "images").rglob("*.png")}
    assert written == {r[0]: (src / r[0]).read_bytes() for r in ROWS}
    assert not list(tmp_path.glob(".members-*"))                          # the staging folder is gone


def test_export_refuses_none_and_a_changed_archive_in_one_line(home, tmp_path):
    with pytest.raises(ValueError) as err:
        ex.export(home, RUN, "coco", tmp_path / "none", images="none")
    assert "--images link or copy" in str(err.value) and "\n" not in str(err.value)
    src = tmp_path / "nih"
    Image.fromarray(gray_image(42)).save(src / "images" / ROWS[4][0])
    make_archives(src, tmp_path / "download", per_archive=3)
    with pytest.raises(ValueError) as err:
        ex.export(home, RUN, "coco", tmp_path / "changed", images="copy")
    assert "changed since ingestion" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "changed").exists() and not list(tmp_path.glob(".members-*"))
