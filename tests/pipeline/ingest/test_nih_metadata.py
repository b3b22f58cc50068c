"""Ingestion of the real NIH ChestX-ray14 metadata shipped in the torchxrayvision wheel."""
import shutil

import pytest

from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS
from pipeline.ingest.nih import ingest_nih
from tests.conftest import package_data
from warehouse import db


@pytest.fixture(scope="module")
def real_nih(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih_real")
    data = package_data("torchxrayvision")
    for name in ("Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz"):
        shutil.copy(data / name, root / name)
    home = root / "home"
    summary = ingest_nih(home, root, metadata_only=True)
    con = db.connect(home, read_only=True)
    yield summary, con
    con.close()


def q(con, sql):
    return con.execute(sql).fetchall()


def test_counts_exact(real_nih):
    summary, con = real_nih
    assert summary["rejects"] == 0
    assert q(con, "SELECT count(*), count(DISTINCT patient_id) FROM images") == [(112120, 30805)]
    assert q(con, "SELECT count(*), count(DISTINCT image_id) FROM gt_boxes") == [(984, 880)]


def test_vocabulary_official_with_infiltrate_normalized(real_nih):
    _, con = real_nih
    assert {r[0] for r in q(con, "SELECT DISTINCT finding FROM labels")} == set(FINDINGS)
    assert {r[0] for r in q(con, "SELECT DISTINCT finding FROM gt_boxes")} == set(BOXED_FINDINGS)
    no_finding = q(con, "SELECT count(*) FROM images WHERE image_id NOT IN (SELECT image_id FROM labels)")[0][0]
    assert no_finding == 60361  # NIH's 'No Finding' rows


def test_per_class_box_counts(real_nih):
    _, con = real_nih
    counts = dict(q(con, "SELECT finding, count(*) FROM gt_boxes GROUP BY 1"))
    assert counts == {"Atelectasis": 180, "Cardiomegaly": 146, "Effusion": 153, "Infiltration": 123,
                      "Mass": 85, "Nodule": 79, "Pneumonia": 120, "Pneumothorax": 98}


def test_every_box_finding_is_a_label_of_its_image(real_nih):
    _, con = real_nih
    orphans = q(con, "SELECT count(*) FROM gt_boxes b ANTI JOIN labels l USING (image_id, finding)")
    assert orphans == [(0,)]


def test_split_and_frame(real_nih):
    _, con = real_nih
    assert q(con, "SELECT DISTINCT width, height FROM images") == [(1024, 1024)]
    assert q(con, "SELECT count(*) FROM images WHERE source_sha256 IS NOT NULL") == [(0,)]
    # the real spacing 0.143 mm on a 2500-3000 px detector image is ~0.35-0.42 mm at 1024
    lo, hi = q(con, "SELECT quantile_cont(spacing_x, 0.05), quantile_cont(spacing_x, 0.95) FROM images")[0]
    assert 0.2 < lo < hi < 0.6
