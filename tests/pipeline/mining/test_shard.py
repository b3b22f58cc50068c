"""mine_shard / mine_batch on a real ingested home with a tiny registered model; MiningConfig."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.base.vocab import FINDINGS, INDEX
from pipeline.config.mining import MiningConfig
from pipeline.images.dataset import CacheDataset, normalize
from pipeline.mining import mine_batch, mine_shard
from warehouse.db import PARQUET_TABLES

SIZE, FRAME = 128, 512   # cache (model input) and original image frame
ROWS = [("a.png", "Mass|Nodule", 1), ("b.png", "Effusion", 2), ("c.png", "No Finding", 3),
        ("d.png", "Atelectasis|Cardiomegaly|Infiltration", 4), ("e.png", "Pneumothorax", 5)]
KEY = ["image_id", "finding", "rank"]


@pytest.fixture(scope="module")
def mined_home(tmp_path_factory):
    """Five 512 px images ingested at 128 px, and a tiny ResNet-18 (bilinear MSA: an 8x8 CAM grid) registered."""
    from pipeline.ingest.nih import ingest_nih
    from tests.conftest import HEADER, gray_image, register_tiny_model
    from PIL import Image

    base = tmp_path_factory.mktemp("mining")
    root = base / "nih"
    (root / "images").mkdir(parents=True)
    lines = [HEADER]
    for k, (name, labels, patient) in enumerate(ROWS):
        lines.append(f"{name},{labels},0,{patient},40,M,PA,1024,1024,0.143,0.143\n")
        Image.fromarray(gray_image(k, FRAME)).save(root / "images" / name)
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    (root / "test_list.txt").write_text("")
    (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r in ROWS))
    home = base / "home"
    ingest_nih(home, root, sizes=(SIZE,), workers=1)
    register_tiny_model(home, "tiny", neck="bilinear", input_size=SIZE)
    ids = CacheDataset(home, size=SIZE).image_ids
    return home, ids


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in KEY])


def test_rows_follow_the_schema_labels_ranks_and_frames(mined_home):
    home, ids = mined_home
    table = mine_shard(home, "tiny", ids, MiningConfig(), "run-1")
    assert table.schema.equals(PARQUET_TABLES["mined_boxes"])
    df = table.to_pandas()
    ds = CacheDataset(home, size=SIZE)
    positives = {(ds.image_ids[i], FINDINGS[c]) for i, c in zip(*np.nonzero(ds.labels))}
    assert set(zip(df.image_id, df.finding)) == positives          # every positive finding, nothing else
    assert (df.run_id == "run-1").all() and (df.model_id == "tiny").all()
    assert not df.duplicated(KEY).any()
    for _, g in df.groupby(["image_id", "finding"]):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1)) and len(g) <= 3
        assert (np.diff(g.sort_values("rank")["score"].to_numpy()) <= 0).all()   # ranked by mean H_f
    frame = dict(zip(ds.image_ids, ds.frames.tolist()))
    for r in df.itertuples():
        W, H = frame[r.image_id]
        assert W == FRAME and 0 <= r.x and r.x + r.w <= W and 0 <= r.y and r.y + r.h <= H and r.w >= 1
        assert 0 < r.score <= 1 and np.isclose(r.threshold, MiningConfig().thresholds).any()


def test_prob_is_the_models_sigmoid_probability(mined_home):
    from pipeline.training.checkpoint import load_model

    home, ids = mined_home
    table = mine_shard(home, "tiny", ids, MiningConfig(amp="none"), "run").to_pandas()
    model, _ = load_model(home, "tiny")
    batch = CacheDataset(home, size=SIZE).get_batch(range(len(ids)))
    with torch.no_grad():
        prob = torch.sigmoid(model(normalize(batch["image"]))).numpy()
    pos = {iid: i for i, iid in enumerate(batch["image_id"])}
    expect = [prob[pos[r.image_id], INDEX[r.finding]] for r in table.itertuples()]
    np.testing.assert_allclose(table["prob"], expect, rtol=1e-4)


def test_a_shard_handed_its_index_and_model_row_opens_no_connection(mined_home, tmp_path, monkeypatch):
    """What `flows.mine` hands a Dask task: its part of the CacheIndex (pickled) and the model's `models` row. The
    rows are those of a shard that reads them itself; a missing image fails the shard with one KeyError."""
    import pickle

    from pipeline.images.dataset import CacheIndex
    from pipeline.training.checkpoint import model_row
    from warehouse import db

    home, ids = mined_home
    with db.reading(home) as con:
        index, row = CacheIndex.read(con, SIZE, image_ids=[*ids, "gone.png"]), model_row(home, "tiny", con)
    assert index.image_ids == ids
    part = pickle.loads(pickle.dumps(index.subset([ids[3], ids[1], "gone.png"], strict=False)))
    assert part.image_ids == [ids[1], ids[3]] and (part.labels == index.labels[[1, 3]]).all()
    trace = tmp_path / "connections.tsv"
    monkeypatch.setenv("HARVEST_TRACE_CONNECT", str(trace))
    got = mine_shard(home, "tiny", part.image_ids, MiningConfig(), "run", index=part, row=row)
    with pytest.raises(KeyError, match="1 image.s. not in the 128px cache"):
        mine_shard(home, "tiny", [ids[1], "gone.png"], MiningConfig(), "run", index=part, row=row)
    assert not trace.exists()
    monkeypatch.delenv("HARVEST_TRACE_CONNECT")
    assert _sorted(got).equals(_sorted(mine_shard(home, "tiny", part.image_ids, MiningConfig(), "run")))


def test_fast_and_reference_paths_give_the_same_rows(mined_home):
    home, ids = mined_home
    fast = _sorted(mine_shard(home, "tiny", ids, MiningConfig(amp="none"), "r")).to_pandas()
    ref = _sorted(mine_shard(home, "tiny", ids, MiningConfig(amp="none", fast=False), "r")).to_pandas()
    assert fast[KEY + ["threshold"]].equals(ref[KEY + ["threshold"]])
    np.testing.assert_allclose(fast[list("xywh")], ref[list("xywh")], atol=1.0)
    np.testing.assert_allclose(fast["score"], ref["score"], atol=1e-3)


def test_batches_do_not_change_rows_and_the_callers_model_mode_is_kept(mined_home):
    from pipeline.training.checkpoint import load_model

    home, ids = mined_home
    model, _ = load_model(home, "tiny")
    model.train()
    one = _sorted(mine_shard(home, "tiny", ids, MiningConfig(batch_size=2, amp="none"), "r", model=model))
    assert model.training
    every = _sorted(mine_shard(home, "tiny", ids, MiningConfig(batch_size=8, amp="none"), "r"))
    assert one.select(KEY).equals(every.select(KEY))
    np.testing.assert_allclose(one["x"].to_numpy(), every["x"].to_numpy(), atol=1.0)


def test_unlabeled_mode_mines_predicted_findings_marked_by_prob(mined_home):
    home, ids = mined_home
    everything = mine_shard(home, "tiny", ids, MiningConfig(unlabeled=True, prob_threshold=0.0), "u").to_pandas()
    assert set(everything.finding) == set(FINDINGS) and set(everything.image_id) == set(ids)
    cut = float(np.median(everything.prob))
    some = mine_shard(home, "tiny", ids, MiningConfig(unlabeled=True, prob_threshold=cut), "u").to_pandas()
    assert 0 < len(some) < len(everything) and (some.prob >= cut).all()


def test_fused_heatmaps_are_stored_on_request(mined_home, tmp_path):
    home, ids = mined_home
    path = tmp_path / "part-00000.heatmaps.npz"
    table = mine_shard(home, "tiny", ids, MiningConfig(save_heatmaps=True), "h", heatmaps_path=path)
    stored = np.load(path, allow_pickle=False)
    assert stored["heatmap"].dtype == np.uint8 and stored["heatmap"].shape[1:] == (SIZE // 16, SIZE // 16)
    assert (stored["heatmap"].reshape(len(stored["heatmap"]), -1).max(1) == 255).all()   # H_f peaks at 1
    assert set(zip(stored["image_id"], stored["finding"])) == set(zip(table["image_id"].to_pylist(),
                                                                      table["finding"].to_pylist()))
    assert not (tmp_path / "other.npz").exists()
    mine_shard(home, "tiny", ids, MiningConfig(), "h", heatmaps_path=tmp_path / "other.npz")
    assert not (tmp_path / "other.npz").exists()                 # off by default


def test_mine_batch_without_positives_returns_no_rows(mined_home):
    from pipeline.training.checkpoint import load_model

    home, _ = mined_home
    model, _ = load_model(home, "tiny")
    images = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.uint8)
    out = mine_batch(model, images, torch.zeros(2, 14), torch.tensor([[1024, 1024]] * 2), MiningConfig())
    assert len(out["index"]) == 0 and len(out["x"]) == 0


def test_config_hash_dict_round_trip_and_validation(tmp_path):
    cfg = MiningConfig(thresholds=[0.6, 0.3])
    assert cfg.thresholds == (0.6, 0.3)
    assert MiningConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.config_hash() == MiningConfig(thresholds=(0.6, 0.3)).config_hash()
    assert cfg.config_hash() != MiningConfig().config_hash()
    assert MiningConfig(batch_size=7, device="cuda").config_hash() == MiningConfig().config_hash()
    (tmp_path / "m.yaml").write_text("steps: 2\nthresholds: [0.4]\n")
    assert MiningConfig.from_yaml(tmp_path / "m.yaml") == MiningConfig(steps=2, thresholds=(0.4,))
    with pytest.raises(ValueError, match="unknown key"):
        MiningConfig.from_dict({"threshold": 0.5})
    with pytest.raises(ValueError, match="thresholds"):
        MiningConfig(thresholds=(1.5,))


def test_per_finding_thresholds_config():
    # one rule for all keeps the ids of runs mined before per-finding rules existed (values from 63125f3)
    assert MiningConfig().config_hash() == "4356193717d6529e"
    assert MiningConfig(thresholds=(0.9, 0.8, 0.7)).config_hash() == "8b18d90779a3516d"
    cfg = MiningConfig(thresholds=(0.9, 0.8, 0.7), finding_thresholds={"Nodule": [0.6, 0.5, 0.4]})
    assert MiningConfig.from_dict(cfg.to_dict()) == cfg and cfg.config_hash() != "8b18d90779a3516d"
    table = cfg.threshold_table()
    assert table[INDEX["Nodule"]] == (0.6, 0.5, 0.4) and table[INDEX["Mass"]] == (0.9, 0.8, 0.7)
    with pytest.raises(ValueError, match="finding_thresholds.Tumor"):
        MiningConfig(finding_thresholds={"Tumor": [0.5, 0.35, 0.2]})
    with pytest.raises(ValueError, match="as many as `thresholds`"):
        MiningConfig(finding_thresholds={"Mass": [0.5]})
    with pytest.raises(ValueError, match="must be a mapping"):
        MiningConfig.from_dict({"finding_thresholds": [0.5]})


def test_per_finding_thresholds_change_only_their_findings_rows(mined_home):
    home, ids = mined_home
    base = _sorted(mine_shard(home, "tiny", ids, MiningConfig(amp="none"), "r")).to_pandas()
    cfg = MiningConfig(amp="none", finding_thresholds={"Mass": [0.95, 0.9, 0.85]})
    fast = _sorted(mine_shard(home, "tiny", ids, cfg, "r")).to_pandas()
    ref = _sorted(mine_shard(home, "tiny", ids, MiningConfig(**{**cfg.to_dict(), "fast": False}), "r")).to_pandas()
    assert fast[KEY + ["threshold"]].equals(ref[KEY + ["threshold"]])
    np.testing.assert_allclose(fast[list("xywh")], ref[list("xywh")], atol=1.0)
    mass = fast["finding"] == "Mass"
    assert {round(float(t), 3) for t in fast.loc[mass, "threshold"]} <= {0.95, 0.9, 0.85} and mass.any()
    others = base[base["finding"] != "Mass"].reset_index(drop=True)
    assert fast[~mass].reset_index(drop=True).equals(others)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rows_equal_cpu_rows(mined_home):
    """The GPU path (pinned buffer ring, boxes on a side stream while the next forward runs) gives the CPU rows."""
    home, ids = mined_home
    cpu = _sorted(mine_shard(home, "tiny", ids, MiningConfig(amp="none", batch_size=2), "g")).to_pandas()
    gpu = _sorted(mine_shard(home, "tiny", ids, MiningConfig(amp="none", batch_size=2, device="cuda"), "g")).to_pandas()
    assert cpu[KEY + ["threshold"]].equals(gpu[KEY + ["threshold"]])
    np.testing.assert_allclose(cpu[list("xywh")], gpu[list("xywh")], atol=1.0)
    np.testing.assert_allclose(cpu["prob"], gpu["prob"], atol=1e-3)
