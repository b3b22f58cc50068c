"""The chained `harvest` flow on a tiny phantom, the scheduled (incremental) deployment and its schedule."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.serve import PREFECT_YAML, load_deployments
from warehouse import db

TINY = {
    "name": "tiny", "seed": 0, "model": {"arch": "resnet18", "neck": "bilinear", "imagenet": False},
    "data": {"input_size": 64, "val_fraction": 0.2, "augment": {"enabled": False}},
    "runtime": {"device": "cpu", "amp": "auto", "batch_size": 8, "eval_batch_size": 16, "log_every": 0},
    "stages": {"base": {"epochs": 1, "lr": 0.05}, "msa_init": {"epochs": 1, "lr": 0.05, "freeze_backbone": True},
               "end_to_end": {"epochs": 1, "lr": 0.01}},
    "am": {"steps": 2, "mode": "kp", "stage": {"epochs": 1, "lr": 0.005}},
    "phantom": {"n": 30, "seed": 3, "size": 128},
    "mining": {"split": "all", "shard_size": 8, "batch_size": 8},
    "export": {"formats": ["coco", "nih-csv"], "ranks": [1, 2, 3]},
}
NEW = 2


def _drop_images(root, names):
    """Remove images (files and every CSV row naming them) from an NIH-layout folder."""
    for name in names:
        (root / "images" / name).unlink()
    for csv in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "truth.csv"):
        df = pd.read_csv(root / csv, dtype=str, keep_default_na=False)
        df[~df.iloc[:, 0].isin(names)].to_csv(root / csv, index=False)
    for lst in ("train_val_list.txt", "test_list.txt"):
        kept = [n for n in (root / lst).read_text().split() if n not in names]
        (root / lst).write_text("".join(f"{n}\n" for n in kept))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.phantom import generate
    base = tmp_path_factory.mktemp("harvest")
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    full = base / "full"
    generate(full, workers=1, progress=False, **TINY["phantom"])
    source = base / "source"
    shutil.copytree(full, source)
    entries = pd.read_csv(full / "Data_Entry_2017_v2020.csv")
    train = set((full / "train_val_list.txt").read_text().split())
    new = sorted(n for n in entries["Image Index"] if n in train)[-NEW:]
    _drop_images(source, new)
    return {"config": config, "full": full, "source": source, "new": new, "base": base}


def test_deployment_has_its_cron_schedule():
    spec = yaml.safe_load(PREFECT_YAML.read_text())["deployments"][0]
    (dep,) = load_deployments(overrides={"source": "/data/incoming"}, home="/data/home")
    assert dep.name == spec["name"] == "nightly-harvest"
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert str(dep.schedules[0].schedule.timezone) == "UTC"
    assert dep.parameters["incremental"] is True
    assert dep.parameters["source"] == "/data/incoming" and dep.parameters["home"] == "/data/home"
    assert dep.entrypoint.endswith("flows/harvest.py:harvest_flow") or "harvest_flow" in dep.entrypoint


@pytest.mark.timeout(900)
def test_harvest_then_scheduled_run_mines_only_new_images(tiny, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.harvest import harvest_flow
    home = tmp_path / "home"
    first = harvest_flow(str(home), str(tiny["source"]), str(tiny["config"]))
    con = db.connect(home, read_only=True)
    n_images = con.execute("SELECT count(*) FROM images").fetchone()[0]
    mined = con.execute("SELECT count(DISTINCT image_id), count(*) FROM mined_boxes WHERE run_id = ?",
                        [first["run_id"]]).fetchone()
    evals = con.execute("SELECT count(*) FROM eval_results WHERE run_id = ?", [first["run_id"]]).fetchone()[0]
    runs = dict(con.execute("SELECT flow, count(*) FROM runs GROUP BY 1").fetchall())
    con.close()
    assert n_images == TINY["phantom"]["n"] - NEW
    assert first["mine"]["images_mined"] == n_images and mined[1] > 0
    assert evals > 0 and first["report"] and (home / "reports").exists()
    cocos = [json.loads(p.read_text()) for p in (Path(first["exports"]["coco"]) / "annotations").glob("instances_*.json")]
    manifest = json.loads((Path(first["exports"]["coco"]) / "manifest.json").read_text())
    trust = manifest["trust"]   # measured on the phantom truth of the validation images, gating the export
    assert trust["applied"] and trust["source"] == "truth@val" and manifest["filters"]["trust_floor"] == 0.5
    rules = [(f, e["rank"], e["min_score"] or -1.0) for f, e in trust["findings"].items() if e["kept"]]
    con = db.connect(home, read_only=True)
    trusted = sum(con.execute("SELECT count(*) FROM mined_boxes WHERE run_id = ? AND finding = ? AND rank = ? "
                              "AND score >= ?", [first["run_id"], *rule]).fetchone()[0] for rule in rules)
    stored = con.execute("SELECT count(*) FROM trust WHERE run_id = ?", [first["run_id"]]).fetchone()[0]
    con.close()
    assert stored == len(trust["findings"]) > 0
    assert sum(len(c["images"]) for c in cocos) == n_images >= mined[0]  # every mined image, negatives too
    assert sum(len(c["annotations"]) for c in cocos) + manifest["counts"]["dropped_outside_frame"] == trusted
    assert {"ingest", "mine", "evaluate", "export"} <= set(runs)

    # the nightly run: two images land in the source folder; the scheduled deployment's parameters
    shutil.rmtree(tiny["source"])
    shutil.copytree(tiny["full"], tiny["source"])
    (dep,) = load_deployments(overrides={"source": str(tiny["source"]), "config": str(tiny["config"])},
                              home=str(home))
    second = harvest_flow(**dep.parameters)
    assert second["model_id"] == first["model_id"]            # the current model, no retraining
    assert second["run_id"] == first["run_id"]
    assert second["mine"]["images_mined"] == NEW
    assert second["ingest"]["decoded"] == NEW
    con = db.connect(home, read_only=True)
    per_image = con.execute("SELECT image_id, count(*) FROM mined_boxes WHERE run_id = ? GROUP BY 1",
                            [first["run_id"]]).fetchall()
    con.close()
    assert len(per_image) <= TINY["phantom"]["n"] and all(n <= 3 * 14 for _, n in per_image)

    # a night with nothing new does no work: no evaluation, no rewritten export
    manifest = Path(second["exports"]["coco"]) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    con = db.connect(home, read_only=True)
    evaluations = con.execute("SELECT count(*) FROM runs WHERE flow = 'evaluate'").fetchone()[0]
    con.close()
    third = harvest_flow(**dep.parameters)
    assert third["nothing_new"] and third["mine"]["images_mined"] == 0 and third["run_id"] == first["run_id"]
    assert manifest.stat().st_mtime_ns == before and third["report"] == second["report"]
    con = db.connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM runs WHERE flow = 'evaluate'").fetchone()[0] == evaluations
    con.close()

    # a config that asks to retrain on new data: the model was trained before the NEW images came, so it trains
    # anew (its id names the data) and mines every image with the new model
    retrain = tmp_path / "retrain.yaml"
    retrain.write_text(yaml.safe_dump({**TINY, "incremental": {"retrain": True}}))
    fourth = harvest_flow(**{**dep.parameters, "config": str(retrain)})
    assert fourth["model_id"] != first["model_id"] and fourth["run_id"] != first["run_id"]
    assert fourth["mine"]["images_mined"] == TINY["phantom"]["n"]

    async def artifact_keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}
    import asyncio
    keys = asyncio.run(artifact_keys())
    assert {"harvest-summary", "ingest-summary", "evaluation-summary", "export-summary"} <= keys
