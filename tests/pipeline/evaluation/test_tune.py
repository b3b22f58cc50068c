"""Box thresholds are chosen on the validation split's truth boxes, never on evaluation boxes."""
import pytest

from pipeline.evaluation.tune import tune_thresholds, validation_ids
from pipeline.ingest.nih import ingest_nih
from pipeline.phantom import generate
from pipeline.training.checkpoint import load_model
from tests.conftest import register_tiny_model
from warehouse import db

CONFIG = {"data": {"input_size": 64, "val_fraction": 0.3}}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    base = tmp_path_factory.mktemp("tune")
    generate(base / "phantom", n=40, seed=5, size=128, workers=1, progress=False)
    home = base / "home"
    ingest_nih(home, base / "phantom", sizes=(64,))
    register_tiny_model(home, "tiny", input_size=64, config=CONFIG)
    return home


def test_validation_images_are_held_out_training_images(home):
    _, meta = load_model(home, "tiny")
    ids = validation_ids(home, meta)
    con = db.connect(home, read_only=True)
    splits = {s for (s,) in con.execute("SELECT DISTINCT split FROM images WHERE image_id IN (SELECT unnest(?))",
                                        [ids]).fetchall()}
    boxed = {i for (i,) in con.execute("SELECT image_id FROM gt_boxes WHERE source = 'bbox_list'").fetchall()}
    con.close()
    assert ids and splits == {"train"}
    assert not boxed & set(ids)      # the evaluation (boxed, test split) images are never looked at


def test_best_candidate_is_the_top_of_the_table(home):
    cands = ((0.6, 0.4, 0.2), (0.3, 0.2, 0.1))
    best, table = tune_thresholds(home, "tiny", candidates=cands)
    assert len(table) == 2 and best == table.iloc[0]["thresholds"]
    col = table.columns[1]
    assert table[col].iloc[0] >= table[col].iloc[1]


def test_without_truth_boxes_it_refuses(home, tmp_path):
    import shutil
    copy = shutil.copytree(home, tmp_path / "home")
    con = db.connect(copy)
    con.execute("DELETE FROM gt_boxes WHERE source = 'truth'")
    con.close()
    with pytest.raises(ValueError, match="truth"):
        tune_thresholds(copy, "tiny", candidates=((0.5, 0.35, 0.2),))


def test_one_forward_gives_the_boxes_mining_gives(home):
    """The boxes a rule cuts from the kept heatmaps are the rows `mine_shard` writes with that rule."""
    from pipeline.config.mining import MiningConfig
    from pipeline.mining.shard import mine_shard
    from pipeline.evaluation.tune import cut, validation_maps
    model, meta = load_model(home, "tiny")
    ids = validation_ids(home, meta)
    cfg = MiningConfig(thresholds=(0.6, 0.4, 0.2), amp="none")
    key = ["image_id", "finding", "rank"]
    kept = cut(validation_maps(home, model, meta, ids, cfg), cfg.thresholds).sort_values(key).reset_index(drop=True)
    mined = mine_shard(home, "tiny", ids, cfg, "r", model=model).to_pandas().sort_values(key).reset_index(drop=True)
    assert len(kept) == len(mined) > 0
    assert (kept[key] == mined[key]).all().all()
    assert ((kept[list("xywh")] - mined[list("xywh")]).abs() < 1e-3).all().all()


def test_per_finding_rules_only_where_they_score_higher(home):
    from pipeline.evaluation.tune import tune
    cands = ((0.6, 0.4, 0.2), (0.3, 0.2, 0.1), (0.9, 0.8, 0.7))
    best, table, own, compare = tune(home, "tiny", candidates=cands, min_instances=1)
    assert best == table.iloc[0]["thresholds"] and set(own) <= set(compare["finding"])
    for finding, rule in own.items():
        assert rule != best and rule in cands
    gains = compare.set_index("finding")
    assert (gains["per_finding"] >= gains["one_rule"] - 1e-9).all()
    assert all(gains.loc[f, "per_finding"] > gains.loc[f, "one_rule"] for f in own)
    _, _, none, _ = tune(home, "tiny", candidates=cands, min_instances=10 ** 6)
    assert none == {}


def test_validation_images_from_another_home(home, tmp_path):
    """`data`: the model is `home`'s, the validation images and their truth boxes the other home's (a phantom of
    another seed), so every count follows that home; the diagnosis reads the same images."""
    from pipeline.evaluation.diagnose import diagnose
    from pipeline.evaluation.tune import tune
    generate(tmp_path / "phantom", n=60, seed=6, size=128, workers=1, progress=False)
    other = tmp_path / "other"
    ingest_nih(other, tmp_path / "phantom", sizes=(64,))
    _, meta = load_model(home, "tiny")
    ids = validation_ids(other, meta)
    con = db.connect(other, read_only=True)
    n_truth = dict(con.execute("SELECT finding, count(*) FROM gt_boxes WHERE source = 'truth' AND image_id IN "
                               "(SELECT unnest(?)) GROUP BY 1", [ids]).fetchall())
    con.close()
    cands = ((0.6, 0.4, 0.2), (0.9, 0.8, 0.7))
    _, _, _, compare = tune(home, "tiny", candidates=cands, data=other)
    _, _, _, own_home = tune(home, "tiny", candidates=cands)
    counts = dict(zip(compare["finding"], compare["n_gt"]))
    assert counts and all(n == n_truth[f] for f, n in counts.items())
    assert dict(zip(own_home["finding"], own_home["n_gt"])) != counts
    diag = diagnose(home, "tiny", last_only=True, data=other)
    assert set(diag["finding"]) <= set(n_truth) and (diag["n"] <= diag["finding"].map(n_truth)).all()
