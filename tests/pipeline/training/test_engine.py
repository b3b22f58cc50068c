"""Training engine: AUROC kernels, augmentation, configs, a tiny staged AM+KP run that learns, KP through the engine."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import BLOB_FINDINGS, blob_home, tiny_config  # noqa: E402
from tests.conftest import scratch  # noqa: E402

from models import freeze_batchnorm, frozen_copy  # noqa: E402
from pipeline.base.vocab import INDEX  # noqa: E402
from pipeline.config import train as config  # noqa: E402
from pipeline.images.dataset import CacheDataset  # noqa: E402
from pipeline.training import checkpoint, engine, stages  # noqa: E402
from pipeline.training.augment import augment_batch, sample_affine, warp_boxes, warp_images  # noqa: E402
from pipeline.training.metrics import auroc, auroc_reference  # noqa: E402
from warehouse import db  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ AUROC

def test_auroc_rank_formula_matches_pairwise_reference():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((300, 6)), 2)           # rounding makes many ties
    labels = (rng.random((300, 6)) < 0.3).astype(np.float32)
    labels[:, 5] = 0                                       # no positives -> NaN
    fast, slow = auroc(scores, labels), auroc_reference(scores, labels)
    np.testing.assert_allclose(fast[:5], slow[:5], rtol=0, atol=1e-12)
    assert np.isnan(fast[5]) and np.isnan(slow[5])
    assert auroc(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]))[0] == pytest.approx(0.75)


# ------------------------------------------------------------------ augmentation

def test_augmentation_moves_boxes_with_the_image_and_never_flips():
    S = 64
    x = torch.zeros(6, 1, S, S)
    x[:, :, 10:30, 20:44] = 1.0
    box = torch.tensor([[20.0, 10.0, 24.0, 20.0]])
    cfg = config.AugmentConfig(scale=(0.8, 1.3), shift=0.1, rotate=10.0)
    theta = sample_affine(6, cfg, torch.Generator().manual_seed(3))
    assert (torch.linalg.det(theta[:, :, :2]) > 0).all()          # orientation kept: no mirror image
    warped = warp_images(x, theta)
    for i in range(6):
        ys, xs = torch.nonzero(warped[i, 0] > 0.5, as_tuple=True)
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]).float()
        assert torch.allclose(warp_boxes(box, theta[i], S)[0], seen, atol=2.5), i
    a, _ = augment_batch(x, cfg, torch.Generator().manual_seed(7))
    b, moved = augment_batch(x, cfg, torch.Generator().manual_seed(7), boxes=[box] * 6)
    assert torch.equal(a, b) and len(moved) == 6                   # a function of the seed


# ------------------------------------------------------------------ configs

def test_configs_load_and_fingerprints_follow_the_stage_chain():
    paper = config.load_config(REPO / "configs" / "paper.yaml")
    assert (paper.model.arch, paper.model.neck, paper.data.input_size, paper.runtime.batch_size) == \
        ("resnet50", "bilinear", 512, 64)
    assert (paper.stages.base.lr, paper.stages.base.epochs, paper.stages.msa_init.epochs) == (0.1, 50, 10)
    assert (paper.am.kp_lambda, paper.am.am_fraction, paper.am.steps) == (0.5, 0.125, 3)
    assert paper.stages.msa_init.freeze_backbone and paper.stages.end_to_end.patience > 0
    demo = config.load_config(REPO / "configs" / "demo.yaml")     # model.init: relative to the config's folder
    card = (REPO / "models" / "weights" / "README.md").read_text()
    assert checkpoint.sha256_file(demo.model.init) in card          # the model card names the shipped file
    config.load_config(REPO / "configs" / "demo-scratch.yaml")
    with pytest.raises(ValueError, match="unknown key"):
        config.load_config({"am": {"lamda": 0.5}})
    assert config.load_config(paper.to_dict()) == paper           # the stored dict rebuilds the config
    partial = config.load_config({"stages": {"base": {"epochs": 5}}, "am": {"stage": {"epochs": 1}}})
    assert (partial.stages.base.lr, partial.am.stage.freeze_bn, partial.am.stage.clip_grad_norm) == (0.1, True, 1.0)
    assert config.load_config({"phantom": {"n": 10}}) == config.TrainConfig()   # other flows' sections
    json.dumps(paper.to_dict())
    names = [p.name for p in stages.plan_stages(paper)]
    assert names == ["base", "msa_init", "end_to_end", "am1", "am2", "am3"]
    other = stages.plan_stages(config.load_config(paper, {"am": {"kp_lambda": 0.25}}))
    same = [a.model_id == b.model_id for a, b in zip(stages.plan_stages(paper), other)]
    assert same == [True, True, True, False, False, False]          # AM changes leave earlier stages reusable
    compiled = stages.plan_stages(config.load_config(paper, {"runtime": {"compile": True}}))
    assert [p.model_id for p in compiled] == [p.model_id for p in stages.plan_stages(paper)]   # the same math
    gap = config.load_config(paper, {"model": {"pool_top": 1.0}})
    top = config.load_config(paper, {"model": {"pool_top": 0.1}})
    assert [p.model_id for p in stages.plan_stages(gap)] == [p.model_id for p in stages.plan_stages(paper)]
    assert not {p.model_id for p in stages.plan_stages(top)} & {p.model_id for p in stages.plan_stages(paper)}
    assert (checkpoint.pool_top_of({"config": top.to_dict()}), checkpoint.pool_top_of({"config": {}})) == (0.1, 1.0)
    with pytest.raises(ValueError, match="model.pool_top"):
        config.load_config({"model": {"pool_top": 0}})


# ------------------------------------------------------------------ a tiny staged run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with scratch(tmp_path_factory, "train") as base:
        home = blob_home(base, n=160)
        steps = []
        model_id = stages.train(home, tiny_config(), on_step=lambda *a: steps.append(a))
        yield home, model_id, steps


def test_staged_am_kp_run_learns_and_registers_every_stage(trained):
    home, model_id, steps = trained
    con = db.connect(home, read_only=True)
    rows = con.execute("SELECT model_id, parent_id, stage, config, checkpoint, checkpoint_sha256, metrics "
                       "FROM models ORDER BY created_at").fetchall()
    con.close()
    assert [r[2] for r in rows] == ["base", "msa_init", "end_to_end", "am1", "am2"]
    assert [r[1] for r in rows[1:]] == [r[0] for r in rows[:-1]]            # each stage records its parent
    assert rows[-1][0] == model_id
    for mid, _, stage, cfg, rel, sha, metrics in rows:
        assert checkpoint.sha256_file(home / rel) == sha
        assert json.loads(cfg)["am"]["kp_lambda"] == 0.5
    base = checkpoint.load_checkpoint(home / rows[0][4])["trainer"]["history"]
    assert base[-1]["train"]["loss"] < 0.6 * base[0]["train"]["loss"]      # the loss goes down
    final = json.loads(rows[-1][6])
    aucs = [final["auroc"][f] for f in BLOB_FINDINGS]                       # both findings have boxes
    assert min(aucs) > 0.7 and np.mean(aucs) > 0.8, final
    am1 = checkpoint.load_checkpoint(home / rows[3][4])["trainer"]["history"][-1]["train"]
    am2 = checkpoint.load_checkpoint(home / rows[4][4])["trainer"]["history"][-1]["train"]
    assert am1["erased_frac"] == 0 and am2["erased_frac"] > 0               # stage t erases t-1 times
    assert am1["loss_kp"] > 0 and am2["loss_kp"] > 0
    model, meta = checkpoint.load_model(home, "latest")
    assert meta["model_id"] == model_id and meta["vocabulary"][INDEX["Mass"]] == "Mass"
    assert meta["input_size"] == 64 and meta["normalization"]["mean"] == pytest.approx(0.449)


def test_rerun_reuses_finished_stages(trained):
    home, model_id, _ = trained
    steps = []
    assert stages.train(home, tiny_config(), on_step=lambda *a: steps.append(a)) == model_id
    assert steps == []


def test_kp_is_zero_before_and_positive_after_an_am_update(trained):
    home, _, _ = trained
    cfg = config.load_config(tiny_config(runtime={"amp": "none"}, data={"augment": {"enabled": False}}))
    con = db.connect(home, read_only=True)
    parent = con.execute("SELECT model_id FROM models WHERE stage = 'end_to_end'").fetchone()[0]
    con.close()
    model, _ = checkpoint.load_model(home, parent)
    reference = frozen_copy(model)
    loss_module = engine.AttentionMiningLoss(model, cfg.am, t=2, reference=reference)
    ds = CacheDataset(home, 64, split="train")
    batch = ds.get_batch(np.arange(16))
    x = engine.prepare(batch["image"], torch.device("cpu"), cfg.runtime)
    freeze_batchnorm(model.train())
    _, before = loss_module(x, batch["labels"])
    assert before["loss_kp"] < 1e-4 and before["erased_frac"] > 0   # N_A == N_B (float noise: batch 12 vs 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine.train_one_epoch(loss_module, optimizer, scheduler, ds, [np.arange(16)], device=torch.device("cpu"),
                           runtime=cfg.runtime, augment=None, seed=0)
    _, after = loss_module(x, batch["labels"])
    assert after["loss_kp"] > 1e-2 and after["loss_kp"] > 100 * before["loss_kp"]
    vanilla = engine.AttentionMiningLoss(model, config.AMConfig(mode="vanilla", am_fraction=0.25), t=2)
    _, logs = vanilla(x, batch["labels"])
    assert "loss_kp" not in logs and vanilla.split(16) == 4
    assert engine.AttentionMiningLoss(model, config.AMConfig(mode="none"), t=1).split(16) == 16


def test_a_new_head_starts_at_the_training_prevalence(trained):
    """lr 0: the stages' weights stay at their initialization, so the head's bias is what it started at."""
    home, _, _ = trained
    frozen = {"stages": {"base": {"epochs": 1, "lr": 0.0, "warmup_steps": 0},
                         "msa_init": {"epochs": 1, "lr": 0.0}, "end_to_end": {"epochs": 0}}, "am": {"steps": 0}}
    cfg = config.load_config(tiny_config(**frozen))
    labels = CacheDataset(home, 64, image_ids=stages.split_ids(home, cfg)["train"]).labels
    prevalence = (labels.sum(0) + 1) / (len(labels) + 2)
    expected = torch.from_numpy(np.log(prevalence / (1 - prevalence))).float()
    assert expected[INDEX[BLOB_FINDINGS[0]]] - expected.min() > 1      # labelled findings vs absent ones
    stages.train(home, cfg)
    for plan in stages.home_plans(home, stages.resolved_config(cfg)):   # base (new head), msa_init (new neck + head)
        bias = checkpoint.load_checkpoint(home / "checkpoints" / plan.model_id / "final.pt")["model"]["head.bias"]
        torch.testing.assert_close(bias, expected)
    off = config.load_config(cfg, {"model": {"head_prior": False}})
    model_id = stages.train(home, off)
    bias = checkpoint.load_checkpoint(home / "checkpoints" / model_id / "final.pt")["model"]["head.bias"]
    assert bias.abs().max() < 1.0 and not torch.allclose(bias, expected)   # nn.Linear's uniform init


def test_model_init_starts_the_first_stage_from_exported_weights(trained, tmp_path):
    """`model.init`: project-made weights (fp16 export of a stage) start the first stage that runs; their
    content, not their path, enters the fingerprint; a wrong arch is refused."""
    from pipeline.training.weights import export_weights
    home, model_id, _ = trained
    path = tmp_path / "w" / "init.pt"
    export_weights(home, model_id, path)
    frozen = {"stages": {"base": {"epochs": 0}, "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 0}},
              "am": {"steps": 1, "stage": {"epochs": 1, "lr": 0.0}}}
    cfg = config.load_config(tiny_config(**frozen, model={"init": str(path)}))
    started = stages.train(home, cfg)
    assert [p.name for p in stages.plan_stages(cfg)] == ["am1"]
    got = checkpoint.load_checkpoint(home / "checkpoints" / started / "final.pt")["model"]
    src = checkpoint.load_checkpoint(home / "checkpoints" / model_id / "final.pt")["model"]
    for k, v in src.items():    # lr 0: the stage ends where it started, the exported weights (fp16-rounded)
        want = v.half().float() if v.is_floating_point() else v
        torch.testing.assert_close(got[k].to(want.dtype), want, rtol=0, atol=0, msg=k)
    moved = tmp_path / "elsewhere.pt"
    path.rename(moved)
    same = config.load_config(cfg, {"model": {"init": str(moved)}})
    assert stages.home_plans(home, stages.resolved_config(same))[0].model_id == started
    wrong = tmp_path / "w" / "resnet50.pt"      # a weights file of ours for another arch (no sha256 record)
    torch.save({"format": "cxr-harvest-weights/1", "model": {}, "meta": {"arch": "resnet50"}}, wrong)
    other = config.load_config(cfg, {"model": {"init": str(wrong)}})
    assert stages.home_plans(home, stages.resolved_config(other))[0].model_id != started
    with pytest.raises(ValueError, match="resnet50"):
        stages.train(home, other)
    with pytest.raises(ValueError, match="model.init"):
        config.load_config(cfg, {"model": {"init": str(tmp_path / "missing.pt")}})
