"""A model id names the data it was trained on (#21 item 1): new, changed or relabelled images give new ids and
`train` trains anew; the same data gives the same ids; the `models` row records the digest and the counts."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import blob_home, tiny_config  # noqa: E402
from tests.conftest import scratch  # noqa: E402

from pipeline.config.train import load_config  # noqa: E402
from pipeline.training import stages  # noqa: E402
from warehouse import db  # noqa: E402

CONFIG = tiny_config(stages={"base": {"epochs": 1}, "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 0}},
                     am={"steps": 1})


def ids_of(home) -> list[str]:
    return [p.model_id for p in stages.home_plans(home, stages.resolved_config(CONFIG))]


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    with scratch(tmp_path_factory, "lineage") as base:
        a = blob_home(base / "a", n=48, seed=0)
        b = blob_home(base / "b", n=48, seed=1)                   # other pixels and labels, same image ids
        yield a, b


def test_ids_follow_the_data_not_only_the_config(homes, tmp_path):
    a, b = homes
    assert ids_of(a) == ids_of(a)                                  # deterministic
    assert ids_of(a) != ids_of(b)                                  # same config, other images
    plain = [p.model_id for p in stages.plan_stages(stages.resolved_config(CONFIG))]
    assert ids_of(a) != plain                                      # the data is part of the id
    relabelled = Path(shutil.copytree(a, tmp_path / "relabelled"))
    con = db.connect(relabelled)
    image_id = con.execute("SELECT image_id FROM images WHERE split = 'train' ORDER BY 1 LIMIT 1").fetchone()[0]
    con.execute("DELETE FROM labels WHERE image_id = ?", [image_id])
    con.execute("INSERT INTO labels VALUES (?, 'Hernia')", [image_id])
    con.close()
    assert ids_of(relabelled)[0] != ids_of(a)[0]


def test_train_trains_anew_on_new_data_and_records_what_it_used(homes, tmp_path):
    a, b = homes
    first = stages.train(a, CONFIG)
    assert stages.train(a, CONFIG) == first                        # same data: reused
    other = stages.train(b, CONFIG)
    assert other != first
    con = db.connect(a, read_only=True)
    config = json.loads(con.execute("SELECT config FROM models WHERE model_id = ?", [first]).fetchone()[0])
    n = con.execute("SELECT count(*) FROM images").fetchone()[0]
    con.close()
    used = config["trained_on"]
    assert len(used["digest"]) == 16 and sum(used["images"].values()) <= n and used["images"]["val"] > 0
    assert stages.final_model_id(a, stages.resolved_config(CONFIG)) == first
    assert load_config(config).name == "tiny"        # a trained model's config loads again (tune, repair)
