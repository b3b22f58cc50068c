"""Image ingestion from an NIH-layout folder: cache, dataset, bad input, incremental and kill-and-rerun."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.images.cache import resize
from pipeline.images.dataset import CacheDataset
from pipeline.ingest.nih import ingest_nih
from tests.conftest import gray_image
from tests.pipeline.ingest.test_nih_archives import make_archives
from warehouse import db

GOOD = [("00000001_000.png", "Cardiomegaly", 1), ("00000001_001.png", "No Finding", 1),
        ("00000002_000.png", "Mass|Nodule", 2), ("00000003_000.png", "Infiltration", 3)]


def rejects(home):
    con = db.connect(home, read_only=True)
    try:
        return {(p, r) for p, r in con.execute("SELECT path, reason FROM rejects").fetchall()}
    finally:
        con.close()


def test_good_images_cached_and_served(make_nih, tmp_path):
    root = make_nih(GOOD, boxes=[("00000002_000.png", "Mass", 10, 20, 30, 40)], size=128, test=["00000002_000.png"])
    home = tmp_path / "home"
    summary = ingest_nih(home, root, sizes=(64, 32))
    assert summary == {"images": 4, "decoded": 4, "skipped_cached": 0, "rejects": 0, "broken_sources": 0, "boxes": 1}
    ds = CacheDataset(home, size=64, with_boxes=True)
    assert ds.image_ids == sorted(g[0] for g in GOOD)
    k = ds.image_ids.index("00000002_000.png")
    sample = ds[k]
    assert sample["image"].shape == (1, 64, 64) and sample["image"].dtype.is_floating_point is False
    np.testing.assert_array_equal(sample["image"][0].numpy(), resize(gray_image(2, 128), 64))
    assert sample["image"][0, 2, 2] > 200  # the top-left marker stays top-left
    assert sample["labels"].tolist()[4:6] == [1.0, 1.0]  # Mass, Nodule
    np.testing.assert_allclose(sample["boxes"].numpy(), [[5, 10, 15, 20]])  # 128 -> 64 frame
    assert CacheDataset(home, size=64, split="test").image_ids == ["00000002_000.png"]
    batch = CacheDataset(home, size=32).get_batch([3, 0])
    assert batch["image"].shape == (2, 1, 32, 32) and batch["image_id"][1] == "00000001_000.png"


def test_rerun_touches_only_new_or_changed(make_nih, tmp_path):
    root = make_nih(GOOD)
    home = tmp_path / "home"
    ingest_nih(home, root, sizes=(32,))
    again = ingest_nih(home, root, sizes=(32,))
    assert again["decoded"] == 0 and again["skipped_cached"] == 4
    Image.fromarray(gray_image(99, 128)).save(root / "images" / "00000003_000.png")
    changed = ingest_nih(home, root, sizes=(32,))
    assert changed["decoded"] == 1
    con = db.connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 4
    assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 4
    con.close()
    ds = CacheDataset(home, size=32)
    np.testing.assert_array_equal(ds[ds.image_ids.index("00000003_000.png")]["image"][0].numpy(),
                                  resize(gray_image(99, 128), 32))


def test_bad_input_is_rejected_and_the_rest_goes_on(make_nih, tmp_path):
    rows = GOOD + [("zero_000.png", "Mass", 7), ("trunc_000.png", "Mass", 8), ("text_000.png", "Mass", 9),
                   ("rgb_000.png", "Effusion", 10), ("rgba_000.png", "Effusion", 11), ("deep_000.png", "Edema", 12),
                   ("missing_000.png", "Mass", 13), ("weird_000.png", "Lung Cancer", 14),
                   ("../escape.png", "Mass", 15), ("bilevel_000.png", "Mass", 16)]
    boxes = [("00000002_000.png", "Mass", 10, 20, 30, 40),
             ("00000002_000.png", "Nodule", 100, 100, 60, 10),      # outside the 128 px image
             ("00000001_000.png", "Tumour", 1, 1, 5, 5),            # unknown finding
             ("00000001_000.png", "Effusion", 1, 1, 5, 5),          # not among the image's labels
             ("nowhere_000.png", "Mass", 1, 1, 5, 5)]               # image not ingested
    root = make_nih(rows, boxes)
    img = root / "images"
    (img / "zero_000.png").write_bytes(b"")
    (img / "trunc_000.png").write_bytes((img / "00000001_000.png").read_bytes()[:300])
    (img / "text_000.png").write_text("not an image at all")
    Image.fromarray(np.stack([gray_image(1)] * 3, -1)).save(img / "rgb_000.png")
    Image.fromarray(np.dstack([gray_image(2)] * 3 + [np.full((128, 128), 255, np.uint8)])).save(img / "rgba_000.png")
    Image.fromarray((gray_image(3).astype(np.uint16) * 16)).save(img / "deep_000.png")  # 12-bit data in 16
    Image.fromarray(gray_image(4) > 128).save(img / "bilevel_000.png")
    home = tmp_path / "home"
    summary = ingest_nih(home, root, sizes=(32,))
    got = rejects(home)
    assert got == {("images/zero_000.png", "empty_file"), ("images/trunc_000.png", "unreadable_image"),
                   ("images/text_000.png", "unreadable_image"), ("images/missing_000.png", "missing_image"),
                   ("Data_Entry_2017_v2020.csv:weird_000.png", "unknown_finding"),
                   ("Data_Entry_2017_v2020.csv:../escape.png", "path_escape"),
                   ("images/bilevel_000.png", "bad_mode"),
                   ("BBox_List_2017.csv:3:00000002_000.png", "box_outside_image"),
                   ("BBox_List_2017.csv:4:00000001_000.png", "unknown_finding"),
                   ("BBox_List_2017.csv:5:00000001_000.png", "box_finding_not_labeled"),
                   ("BBox_List_2017.csv:6:nowhere_000.png", "box_image_unknown")}
    assert summary["images"] == 7 and summary["boxes"] == 1 and summary["rejects"] == len(got)
    ds = CacheDataset(home, size=32)
    assert set(ds.image_ids) == {g[0] for g in GOOD} | {"rgb_000.png", "rgba_000.png", "deep_000.png"}
    deep = ds[ds.image_ids.index("deep_000.png")]["image"][0].numpy().astype(int)
    ref = resize(gray_image(3), 32).astype(int)   # min-max stretch of 16-bit data ~ the 8-bit original
    assert np.corrcoef(deep.ravel(), ref.ravel())[0, 1] > 0.99
    # a rerun adds no duplicate rejects and no duplicate rows
    ingest_nih(home, root, sizes=(32,))
    con = db.connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == len(got)
    assert con.execute("SELECT count(*) FROM gt_boxes").fetchone()[0] == 1
    con.close()


def _snapshot(home):
    con = db.connect(home, read_only=True)
    try:
        return {t: sorted(con.execute(sql).fetchall()) for t, sql in [
            ("images", "SELECT * EXCLUDE (ingested_at) FROM images"), ("labels", "SELECT * FROM labels"),
            ("gt_boxes", "SELECT * FROM gt_boxes"), ("cache", "SELECT source_sha256, size FROM cache_entries")]}
    finally:
        con.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["folder", "archives"])
def test_kill_and_rerun_loses_and_duplicates_nothing(make_nih, tmp_path, layout):
    rows = [(f"{k:08d}_000.png", "Mass" if k % 3 else "No Finding", k) for k in range(1, 701)]
    root = make_nih(rows, size=256)
    if layout == "archives":   # NIH's download: the chunks come from a stream of members
        root = make_archives(root, tmp_path / "download", per_archive=300)[0].parent
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    ingest_nih(clean, root, sizes=(32,), workers=1)
    code = f"from pipeline.ingest.nih import ingest_nih; ingest_nih({str(killed)!r}, {str(root)!r}, sizes=(32,), workers=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    shard1 = killed / "cache" / "size=32" / "shard-000001.u8"  # written only after chunk 0 is committed
    deadline = time.time() + 120
    while not shard1.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shard1.exists(), "the first chunk should have been committed before the kill"
    partial = _snapshot(killed)
    assert 0 < len(partial["cache"]) < 700, "kill should land mid-run"
    summary = ingest_nih(killed, root, sizes=(32,), workers=1)
    assert summary["skipped_cached"] >= len(partial["cache"]) - 256  # committed chunks are not decoded again
    assert _snapshot(killed) == _snapshot(clean)


def test_a_source_that_turns_bad_after_ingest_keeps_its_image_and_is_reported(make_nih, tmp_path, caplog):
    root = make_nih(GOOD)
    home = tmp_path / "home"
    ingest_nih(home, root, sizes=(32,))
    before = _snapshot(home)
    img = root / "images"
    (img / "00000001_000.png").write_bytes((img / "00000001_000.png").read_bytes()[:300])   # truncated
    (img / "00000002_000.png").unlink()                                                       # gone
    con = db.connect(home)   # what the former rule left: a reject beside the image
    con.execute("INSERT INTO rejects VALUES ('ingest.nih', ?, 'images/00000001_000.png', 'unreadable_image', '', "
                "now())", [str(root)])
    con.close()
    summary = ingest_nih(home, root, sizes=(32,))
    assert (summary["broken_sources"], summary["rejects"], summary["skipped_cached"]) == (2, 0, 2)
    assert _snapshot(home) == before and rejects(home) == set()
    said = [r.getMessage() for r in caplog.records if "ingested before" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in said) == ["images/00000001_000.png", "images/00000002_000.png"]
    assert "now unreadable_image" in said[0] and "keep the version ingested" in said[0]
    Image.fromarray(gray_image(77, 128)).save(img / "00000002_000.png")  # a new file where the old one was
    assert ingest_nih(home, root, sizes=(32,))["decoded"] == 1
    assert rejects(home) == set()


def test_each_cached_row_has_its_crc32_and_mining_reads_verify_it(make_nih, tmp_path):
    from pipeline.images import cache

    root = make_nih(GOOD)
    home = tmp_path / "home"
    ingest_nih(home, root, sizes=(32, 16))
    con = db.connect(home, read_only=True)
    rows = con.execute("""SELECT c.size, c.shard, c.row, k.crc32 FROM cache_entries c
                          LEFT JOIN cache_checksums k USING (source_sha256, size) ORDER BY ALL""").fetchall()
    con.close()
    assert len(rows) == 8 and all(crc is not None for *_, crc in rows)
    for size, shard, row, crc in rows:
        image = cache.gather(home / "cache", size, np.array([shard]), np.array([row]))[0]
        assert cache.checksum(image) == crc
    ds = CacheDataset(home, size=32)
    path = home / "cache" / "size=32" / f"shard-{ds.shards[2]:06d}.u8"
    data = bytearray(path.read_bytes())
    data[ds.rows[2] * 32 * 32 + 100] ^= 0x04                       # one bit of the third image
    path.write_bytes(bytes(data))
    ds = CacheDataset(home, size=32)                                # a new descriptor for the rewritten file
    ds.get_batch([0, 1, 3], verify=True)                            # the others verify
    assert ds.get_batch([2])["image"].shape == (1, 1, 32, 32)       # training reads do not verify
    with pytest.raises(cache.DamagedCache) as err:
        ds.get_batch([1, 2], verify=True)
    assert str(err.value) == (f"cached image {ds.image_ids[2]} ({path}, row {ds.rows[2]}) does not match its "
                              "recorded crc32; run `harvest check --repair`")
