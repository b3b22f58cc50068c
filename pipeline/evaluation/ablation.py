"""The paper's ablations on one dataset: Table 1 (MSA necks) and Table 3 (AM steps t, KP variants).

Every variant is a training config derived from one base config plus the mining steps to use:
- MSA: neck baseline | bilinear | deconv, no AM (Table 1 compares necks before AM); mined with T=1 (CAM).
- AM:  the KP run's stages am1, am2, am3, each mined with T=t steps (Table 3, top).
- KP:  am.mode none | vanilla | kp at t=3, mined with T=3 (Table 3, bottom).
Stages shared between variants (same fingerprint: e.g. `base` for all) are trained once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.check import merge, read_yaml
from pipeline.config.train import HARVEST_SECTIONS


@dataclass(frozen=True)
class Variant:
    group: str                    # MSA | AM | KP (pipeline.evaluation.compare.SETTINGS)
    setting: str
    overrides: dict = field(hash=False)
    stage: str                    # the stage whose model is mined
    steps: int                    # T used for mining


def variants(base: dict | None = None) -> list[Variant]:
    """The variants of `base` (a config dict). When `base` starts from weights with no `msa_init` epochs (a
    recipe on pretrained weights), every neck gets one epoch that fits its neck and head on the frozen
    backbone before end-to-end training, as `msa_init` does in the paper (`base` for the baseline, which has
    no `msa_init`): a neck the weights lack is loaded backbone only."""
    stages = (base or {}).get("stages") or {}
    pretrained = (stages.get("msa_init") or {}).get("epochs") == 0
    fit = {"baseline": {"stages": {"base": {"epochs": 1, "lr": 0.1, "freeze_backbone": True}}},   # no msa_init
           "bilinear": {"stages": {"msa_init": {"epochs": 1}}}, "deconv": {"stages": {"msa_init": {"epochs": 1}}}}
    out = [Variant("MSA", neck, merge({"model": {"neck": neck}, "am": {"steps": 0}}, fit[neck] if pretrained else {}),
                   "end_to_end", 1) for neck in ("baseline", "bilinear", "deconv")]
    out += [Variant("AM", f"t={t}", {"am": {"mode": "kp", "steps": 3}}, f"am{t}", t) for t in (1, 2, 3)]
    out += [Variant("KP", name, {"am": {"mode": mode, "steps": 3}}, "am3", 3)
            for name, mode in (("w/o KP", "none"), ("KP-Vanilla", "vanilla"), ("KP", "kp"))]
    return out


CSV_SETTINGS = {("MSA", "baseline"): "neck-baseline", ("MSA", "bilinear"): "neck-bilinear",
                ("MSA", "deconv"): "neck-deconv", ("AM", "t=1"): "am1", ("AM", "t=2"): "am2", ("AM", "t=3"): "am3-kp",
                ("KP", "w/o KP"): "am3-none", ("KP", "KP-Vanilla"): "am3-vanilla", ("KP", "KP"): "am3-kp"}


def csv_setting(variant: Variant) -> str:
    """The variant's name in docs/results/phantom-acc.csv (AM t=3 and KP are the same run: `am3-kp`)."""
    return CSV_SETTINGS[(variant.group, variant.setting)]


def training_config(base_config, variant: Variant) -> dict:
    """The base config file with the variant's overrides (harvest sections dropped)."""
    data = read_yaml(base_config)
    data = {k: v for k, v in data.items() if k not in HARVEST_SECTIONS}
    init = (data.get("model") or {}).get("init")
    if isinstance(init, str) and not Path(init).is_absolute():   # the variant file is written elsewhere
        data = merge(data, {"model": {"init": str((Path(base_config).parent / init).resolve())}})
    return merge(data, variant.overrides)


def stage_model_id(config: dict, stage: str, home=None) -> str:
    """The model id that training on `home`'s images gives the named stage of `config` (fingerprints are
    deterministic; without a home, the id of the config alone, which no training since data lineage has)."""
    from pipeline.training.stages import home_plans, plan_stages, resolved_config
    cfg = resolved_config(config)
    plans = {p.name: p for p in (home_plans(home, cfg) if home is not None else plan_stages(cfg))}
    if stage not in plans:
        raise KeyError(f"stage {stage!r} not in the plan {list(plans)} (0 epochs?)")
    return plans[stage].model_id
