"""Exports that do not leak and that travel: every format splits the images as the mining model's training did (the
YOLO `val` is the validation split, never the evaluation split `test`), and paths are relative to the export, so a
copy loads where it lands after the home, the sources and the original export are gone."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import yaml

from pipeline.config.train import DataConfig, TrainConfig
from pipeline.export import write as ex
from pipeline.export.common import ImageFiles
from tests.pipeline.export.test_export import BOXES, DICOM_ID, IMAGES, PHI, RUN, coco_split, exported, make_home
from warehouse.db import connect

HELD_OUT = "00000001_000.png"   # the one train patient held out with seed 2, val_fraction 0.2 (hash 0.086)
TRAIN = {"00000003_000.png", DICOM_ID + ".png"}


def with_training_config(home, cfg: TrainConfig):
    """The mining model's `models.config`, as training stores it (`TrainConfig.to_dict()`)."""
    con = connect(home)
    con.execute("UPDATE models SET config = ?", [json.dumps(cfg.to_dict())])
    con.close()
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return with_training_config(make_home(tmp_path_factory.mktemp("travel") / "home"),
                                TrainConfig(seed=2, data=DataConfig(val_fraction=0.2)))


def test_every_format_splits_as_training_did(home, tmp_path):
    out = {fmt: ex.export(home, RUN, fmt, tmp_path / fmt, ranks=None) for fmt in ("yolo", "coco", "nih-csv", "cvat")}
    data = yaml.safe_load((out["yolo"] / "data.yaml").read_text())
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    assert {p.name for p in (out["yolo"] / "images" / "val").iterdir()} == {HELD_OUT}
    assert {p.name for p in (out["yolo"] / "images" / "train").iterdir()} == TRAIN
    assert [im["file_name"] for im in coco_split(out["coco"], "val").dataset["images"]] == [HELD_OUT]
    assert HELD_OUT in (out["nih-csv"] / "train_val_list.txt").read_text().split()   # NIH's layout has no val
    assert (out["nih-csv"] / "test_list.txt").read_text().split() == ["00000002_001.png"]
    assert [im.get("name") for im in ET.parse(out["cvat"] / "val" / "annotations.xml").getroot().iter("image")] \
        == [HELD_OUT]
    manifest = json.loads((out["coco"] / "manifest.json").read_text())
    assert "seed 2, val_fraction 0.2, model m-stage2-0001" in manifest["splits"]["val"]
    assert manifest["counts"]["splits"]["val"] == {"images": 1, "boxes": 3}


def test_a_run_without_train_images_is_not_a_yolo_dataset(tmp_path):
    test_only = [i for i in IMAGES if i[3] == "test"]
    home = make_home(tmp_path / "home", images=test_only, boxes=[b for b in BOXES if b[0] == test_only[0][0]])
    with pytest.raises(ValueError, match="mined no train image .only test.*mine the train split"):
        ex.export(home, RUN, "yolo", tmp_path / "yolo")
    assert not (tmp_path / "yolo").exists()


def test_the_held_out_patients_are_those_of_training(tmp_path):
    """The export's val is `pipeline.training.stages.split_ids`' val on the same home: 24 images of 12 patients."""
    from pipeline.training.stages import split_ids

    images = [(f"{k:08d}_{j:03d}.png", 64, 64, "test" if k % 4 == 0 else "train", [])
              for k in range(12) for j in (0, 1)]
    home = make_home(tmp_path / "home", images, boxes=[(images[1][0], "Mass", 1, 2.0, 3.0, 10.0, 12.0, 0.5)])
    cfg = TrainConfig(seed=7, data=DataConfig(input_size=64, val_fraction=0.35))
    with_training_config(home, cfg)
    con = connect(home)
    con.execute("UPDATE images SET patient_id = split_part(image_id, '_', 1)")   # two images per patient
    con.execute("INSERT INTO cache_entries SELECT source_sha256, 64, 0, row_number() OVER () FROM images")
    con.close()
    want = split_ids(home, cfg)
    out = ex.export(home, RUN, "coco", tmp_path / "coco", images="none")
    got = {s: sorted(os.path.basename(im["file_name"]) for im in coco_split(out, s).dataset["images"])
           for s in ("train", "val", "test")}
    assert got["val"] == want["val"] and 0 < len(want["val"]) < 16
    assert got["train"] == want["train"]
    assert all(i.split("_")[0] not in {v.split("_")[0] for v in got["val"]} for i in got["train"])


def test_a_copied_export_loads_where_it_lands(tmp_path):
    """Each format exported under a/, copied to b/, then a/ (home, sources, export) deleted: no file names a/, and
    each format's reader loads the copy (pycocotools and torchvision, the YOLO and NIH layouts, Label Studio tasks
    with their image files, CVAT's XML) with the boxes exported."""
    home = make_home(tmp_path / "a" / "home")
    for fmt in ex.FORMATS:
        ex.export(home, RUN, fmt, tmp_path / "a" / "exports" / fmt, ranks=None)
    shutil.copytree(tmp_path / "a" / "exports", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    boxes = [dict(zip(("image_id", "finding", "rank", "x", "y", "w", "h", "score"), b)) for b in exported(None)]
    for fmt, module in ex.FORMATS.items():
        copy = tmp_path / "b" / fmt
        for p in copy.rglob("*"):
            if p.is_file() and p.suffix != ".png":
                assert str(tmp_path / "a").encode() not in p.read_bytes() and PHI.encode() not in p.read_bytes(), p
        extra = {"boxes": boxes} if fmt in ("labelstudio", "cvat") else {}
        module.verify(copy, ImageFiles("link", {}), **extra)


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                    reason="ultralytics is not installed (`make test` installs it, Makefile TEST_READERS)")
def test_ultralytics_reads_a_copied_export_with_its_val_split(home, tmp_path):
    """Ultralytics' own `check_det_dataset`, offline, in a process of its own (importing ultralytics sets process-wide
    options), started in another folder, on a copy of the export whose original is gone."""
    ex.export(home, RUN, "yolo", tmp_path / "yolo")
    copy = shutil.copytree(tmp_path / "yolo", tmp_path / "elsewhere" / "yolo")
    shutil.rmtree(tmp_path / "yolo")
    code = """if True:
        import json, sys
        from pathlib import Path
        from ultralytics.data.utils import check_det_dataset, img2label_paths
        data = check_det_dataset(sys.argv[1], autodownload=False)
        files = sorted(str(p) for s in ("train", "val") for p in Path(data[s]).iterdir())
        print(json.dumps({"nc": data["nc"], **{s: str(data[s]) for s in ("train", "val", "test")},
                          "labels": [Path(p).is_file() for p in img2label_paths(files)]}))"""
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics"), "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(copy / "data.yaml")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path / "cwd")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["nc"] == 14 and [data[s] for s in ("train", "val", "test")] == \
        [str(copy / "images" / s) for s in ("train", "val", "test")]
    assert len(data["labels"]) == 3 and all(data["labels"])
