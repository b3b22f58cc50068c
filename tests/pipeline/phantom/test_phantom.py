"""Phantom ChestX-ray14 (issue 3): layout, determinism, ingestion, truth boxes, box and label statistics."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.base.files import sha256_file
from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS, NO_FINDING, parse_labels
from pipeline.phantom import anatomy, build as gen_mod, drr, findings, metadata
from pipeline.phantom.build import encode_png, generate, plan, render_image, sample_boxes

N, SEED, SIZE = 48, 11, 256


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "a"
    summary = generate(out, N, SEED, size=SIZE, workers=2, progress=False)
    return out, summary


def test_ct_files_are_checked():
    paths = anatomy.check_files()
    assert set(paths) == {"cxr.nii.gz", "mask.nii.gz", "structures.csv", "ct"}
    assert paths["ct"] == paths["cxr.nii.gz"]
    assert sha256_file(paths["mask.nii.gz"]) == anatomy.SHA256["mask.nii.gz"]
    ids = anatomy.structures(paths["structures.csv"])
    for name in list(anatomy.LOBES) + ["heart", "aorta", "rib_left_1", "vertebrae_T5", "clavicula_left",
                                       "scapula_right"]:
        assert name in ids


def test_the_raw_ct_of_the_gpu_kit_is_accepted_and_a_changed_one_is_not(tmp_path):
    """`cxr.nii` (the wheel's gzip, uncompressed) in place of `cxr.nii.gz`: the same voxels, another sha256."""
    import gzip
    import shutil
    wheel = anatomy.check_files()
    for name in ("mask.nii.gz", "structures.csv"):
        (tmp_path / name).symlink_to(wheel[name])
    with gzip.open(wheel["cxr.nii.gz"]) as src, open(tmp_path / "cxr.nii", "wb") as dst:
        shutil.copyfileobj(src, dst)
    paths = anatomy.check_files(tmp_path)
    assert paths["ct"] == tmp_path / "cxr.nii" and sha256_file(paths["ct"]) == anatomy.CT_RAW[1]
    with open(tmp_path / "cxr.nii", "r+b") as f:   # one voxel byte changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(anatomy.AnatomyError, match="expected 5fbab6a7"):
        anatomy.check_files(tmp_path)


def test_the_atlas_file_holds_the_atlas_exactly_and_a_foreign_file_is_refused(tmp_path):
    """The GPU kit carries the atlas instead of the CT (bench/gpu_kit.sh): the phantom must not change."""
    atlas = anatomy.load_atlas()
    path = anatomy.save_atlas(tmp_path / "atlas.npz.xz", atlas, preset=0)
    again = anatomy.read_atlas(path)
    for name in anatomy._ARRAYS:
        a, b = getattr(atlas, name), getattr(again, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (again.body_y, again.ids, again.spacing, again.shape_full, again.sha) == \
        (atlas.body_y, atlas.ids, atlas.spacing, atlas.shape_full, atlas.sha)
    # a phantom made from the file, in a process without nibabel, is byte-identical to one made from the CT
    code = ("import sys; sys.modules['nibabel'] = None; from pipeline.phantom.build import generate; "
            f"generate({str(tmp_path / 'from-file')!r}, n=3, seed=5, size=128, workers=1, progress=False)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, anatomy.ATLAS_ENV: str(path)})
    gen_mod.generate(tmp_path / "from-ct", n=3, seed=5, size=128, workers=1, progress=False)
    pngs = sorted(p.name for p in (tmp_path / "from-ct" / "images").iterdir())
    assert len(pngs) == 3 and all((tmp_path / "from-ct" / "images" / n).read_bytes()
                                  == (tmp_path / "from-file" / "images" / n).read_bytes() for n in pngs)
    (tmp_path / "bad.xz").write_bytes(b"not an atlas")
    with pytest.raises(anatomy.AnatomyError, match="not a phantom atlas"):
        anatomy.read_atlas(tmp_path / "bad.xz")


def test_nih_layout(phantom):
    out, summary = phantom
    real_header = ",".join(metadata.real_entries()[0])
    assert (out / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0] == real_header
    assert (out / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    entries = pd.read_csv(out / "Data_Entry_2017_v2020.csv")
    assert len(entries) == N == summary["n"]
    names = entries["Image Index"].tolist()
    assert all(re.fullmatch(r"\d{8}_\d{3}\.png", m) for m in names)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)
    for m in names[:5]:
        with Image.open(out / "images" / m) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
    train = (out / "train_val_list.txt").read_text().split()
    test = (out / "test_list.txt").read_text().split()
    assert train and test and not set(train) & set(test) and sorted(train + test) == sorted(names)
    # the split is by patient
    pid = dict(zip(entries["Image Index"], entries["Patient ID"]))
    assert not {pid[m] for m in train} & {pid[m] for m in test}
    boxes = pd.read_csv(out / "BBox_List_2017.csv").iloc[:, :6]
    assert set(boxes.iloc[:, 0]) <= set(test)
    assert "Infiltration" not in set(boxes.iloc[:, 1])
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.columns) == ["image_id", "finding", "x", "y", "w", "h"]
    # truth covers every finding of every image
    labels = {m: set(parse_labels(s)) for m, s in zip(entries["Image Index"], entries["Finding Labels"])}
    got = truth.groupby("image_id")["finding"].apply(set).to_dict()
    assert all(got.get(m, set()) == ls for m, ls in labels.items())


def test_same_seed_is_byte_identical(phantom, tmp_path):
    out, _ = phantom
    again = tmp_path / "b"
    generate(again, N, SEED, size=SIZE, workers=1, progress=False)   # other worker count, same bytes
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "c"
    generate(other, 6, SEED + 1, size=SIZE, workers=1, progress=False)
    assert (other / "Data_Entry_2017_v2020.csv").read_bytes() != (out / "Data_Entry_2017_v2020.csv").read_bytes()


def test_ingestion_accepts_the_output(phantom, tmp_path):
    from pipeline.ingest.nih import ingest_nih
    out, _ = phantom
    counts = ingest_nih(tmp_path / "home", out, sizes=(256,))
    assert counts["rejects"] == 0
    assert counts["images"] == N


def test_truth_boxes_inside_image_and_cover_the_footprint(phantom):
    out, _ = phantom
    truth = pd.read_csv(out / "truth.csv")
    assert (truth[["x", "y"]] >= 0).all().all() and (truth[["w", "h"]] > 0).all().all()
    assert ((truth["x"] + truth["w"]) <= SIZE).all() and ((truth["y"] + truth["h"]) <= SIZE).all()
    rows, _, _, _ = plan(N, SEED)
    job = {"out": str(out), "seed": SEED, "size": SIZE, "difficulty": 0.0}
    checked = 0
    for i, r in enumerate(rows.itertuples(index=False)):
        fs = parse_labels(r.labels)
        if not fs or checked >= 6:
            continue
        fps = []
        item = {"index": i, "image": r.image, "variant": int(r.variant), "view": r.view, "findings": fs}
        img, boxes = render_image(job, item, fps)
        assert np.array_equal(img, np.asarray(Image.open(out / "images" / r.image)))   # same image as written
        for (f, x, y, w, h), (f2, rs, cs, fp) in zip(boxes, fps):
            assert f == f2
            a = np.zeros((SIZE, SIZE), np.float32)
            a[rs, cs] = np.abs(fp)
            inside = a[int(y):int(y + h), int(x):int(x + w)]
            assert inside.sum() >= 0.9 * a.sum(), f             # and nearly all of the finding's |dP|
            assert (a >= drr.FOOTPRINT * a.max()).sum() == (inside >= drr.FOOTPRINT * a.max()).sum(), f
        checked += 1
    assert checked >= 3


def test_box_sizes_match_real_medians():
    """Per-class median box width and height within a factor 1.5 of NIH's (1024 frame, default difficulty)."""
    real = metadata.real_box_stats().set_index("finding")
    for f in BOXED_FINDINGS:
        b = sample_boxes(f, 10, seed=3)
        assert len(b) == 10
        for col, key in ((2, "median_w"), (3, "median_h")):
            ratio = np.median(b[:, col]) / real.loc[f, key]
            assert 1 / 1.5 <= ratio <= 1.5, (f, key, ratio)


def test_difficulty_makes_findings_smaller_and_fainter():
    easy = sample_boxes("Nodule", 6, seed=5, difficulty="easy")
    hard = sample_boxes("Nodule", 6, seed=5, difficulty="hard")
    assert np.median(hard[:, 2]) < np.median(easy[:, 2])
    assert findings.knob(1.0).contrast < findings.knob(0.0).contrast
    with pytest.raises(ValueError):
        gen_mod.parse_difficulty(2.0)


def test_label_statistics_follow_the_real_data():
    _, real = metadata.real_entries()
    want = metadata.label_frequencies(real["labels"])
    rows = metadata.sample_rows(4000, np.random.default_rng(0))
    got = metadata.label_frequencies(rows["labels"])
    assert abs(got[NO_FINDING] - want[NO_FINDING]) < 0.03 and 0.5 < got[NO_FINDING] < 0.58
    for f in FINDINGS:
        assert abs(got.get(f, 0) - want[f]) < max(0.012, 0.3 * want[f]), f
    # co-occurrence: the share of multi-label images follows too
    multi = lambda labels: np.mean([len(parse_labels(s)) > 1 for s in labels])
    assert abs(multi(rows["labels"]) - multi(real["labels"])) < 0.03
    # patients keep several follow-ups, numbered from 0
    per = rows.groupby("patient")["follow_up"].agg(["count", "min", "max"])
    assert (per["count"] > 1).any() and (per["min"] == 0).all() and (per["max"] == per["count"] - 1).all()


def test_plan_follow_ups_share_anatomy_and_boxed_subset_mimics_nih():
    rows, is_test, boxed, k = plan(3000, 2)
    assert rows.groupby("patient")["variant"].nunique().max() == 1
    assert k >= 2
    names = set(rows["image"][is_test])
    assert {f for _, f in boxed} == set(BOXED_FINDINGS)
    assert all(m in names for m, _ in boxed)
    n_img = len({m for m, _ in boxed})
    assert 0.004 * 3000 <= n_img <= 0.02 * 3000
    assert 0.15 < is_test.mean() < 0.32


def test_cardiomegaly_has_a_cardiothoracic_ratio_over_half():
    atlas = anatomy.load_atlas()
    job = {"seed": 1, "size": SIZE, "difficulty": 0.0}
    base = gen_mod._base(0, "PA", job)
    assert base.ctr < 0.5
    les = findings.make_lesion("Cardiomegaly", np.random.default_rng(0), atlas, base, 0.0)
    (r0, c0), _, enlarged = les.canvas()
    heart = np.zeros_like(base.t_heart)
    heart[r0:r0 + enlarged.shape[0], c0:c0 + enlarged.shape[1]] = enlarged
    assert drr.cardiothoracic_ratio(heart, base.t_lung) > 0.5


def test_lesion_projection_matches_the_slow_reference():
    """Fast path (local projection + one affine at the lesion's depth) vs the whole-volume slab path."""
    atlas = anatomy.load_atlas()
    base = gen_mod._base(1, "AP", {"seed": 4, "size": SIZE, "difficulty": 0.0})
    rng = np.random.default_rng(7)
    lg = findings.lungs(atlas)
    for model in (findings.nodule, findings.pneumonia, findings.effusion, findings.pneumothorax,
                  findings.pleural_thickening):
        dmu, origin = model(rng, atlas, lg, base, findings.knob(0.0))
        les = drr.lesion_from_volume(atlas, base.geom, model.__name__, dmu, origin)
        rs, cs, dP, _ = drr.project_lesion(base, les)
        fast = np.zeros((SIZE, SIZE), np.float32)
        fast[rs, cs] = dP
        ref = drr.project_volume_reference(atlas, base, dmu, origin)
        assert np.corrcoef(fast.ravel(), ref.ravel())[0, 1] > 0.995, model.__name__
        assert abs(fast.sum() / ref.sum() - 1) < 0.02


def test_png_encoder_matches_pil():
    img = (np.random.default_rng(0).random((37, 53)) * 255).astype(np.uint8)
    with Image.open(io.BytesIO(encode_png(img))) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), img)


def test_cli_verb_writes_a_small_phantom(tmp_path, capsys):
    import argparse

    from flows import phantom as verb
    parser = argparse.ArgumentParser(prog="harvest")
    verb.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["phantom", "--out", str(tmp_path / "p"), "--n", "3", "--seed", "1", "--size", "128",
                              "--workers", "1", "--difficulty", "hard", "--quiet"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 3
    assert '"difficulty": 1.0' in capsys.readouterr().out
    with pytest.raises(ValueError):
        generate(tmp_path / "q", 2, 0, size=100)
    # over an earlier phantom: its extra images go; a folder of other files is refused
    generate(tmp_path / "p", 2, 1, size=128, workers=1, progress=False)
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 2
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        generate(tmp_path / "r", 2, 0, size=128)
