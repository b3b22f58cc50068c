"""The ablation's variants of a recipe (#19 item 6): configs that load from wherever they are written, the
eight settings of docs/results/phantom-acc.csv, and the recipe's own stages reused (same model ids)."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config.check import read_yaml
from pipeline.config.train import load_config
from pipeline.evaluation.ablation import csv_setting, stage_model_id, training_config, variants

REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "configs" / "localize.yaml"


def test_variant_configs_load_from_another_folder_and_name_the_csv_settings(tmp_path):
    vs = variants(read_yaml(RECIPE))
    assert {csv_setting(v) for v in vs} == {"am3-kp", "am1", "am2", "am3-none", "am3-vanilla", "neck-baseline",
                                            "neck-bilinear", "neck-deconv"}
    for v in vs:
        path = tmp_path / f"{v.group}-{v.setting}.yaml".replace(" ", "_").replace("/", "-")
        path.write_text(yaml.safe_dump(training_config(RECIPE, v)))
        cfg = load_config(path)                   # fails when model.init was left relative to configs/
        assert Path(cfg.model.init).is_file()
        if v.group == "MSA":                      # on pretrained weights each neck gets its neck and head fitted
            fit = cfg.stages.base if v.setting == "baseline" else cfg.stages.msa_init
            assert fit.epochs == 1 and fit.freeze_backbone and cfg.model.neck == v.setting


def test_the_kp_variant_is_the_recipes_own_model():
    recipe = {k: v for k, v in read_yaml(RECIPE).items() if k not in ("phantom", "mining", "export")}
    recipe["model"]["init"] = str((RECIPE.parent / recipe["model"]["init"]).resolve())
    kp = next(v for v in variants(read_yaml(RECIPE)) if csv_setting(v) == "am3-kp")
    assert stage_model_id(training_config(RECIPE, kp), "am3") == stage_model_id(recipe, "am3")
