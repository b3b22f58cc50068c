"""Staged training engine (sec. 3.1): the AM/KP training loop, checkpoints, weights, DDP. The config it
reads is `pipeline.config.train`.

    from pipeline.training import train, load_model
    model_id = train(home, "configs/demo.yaml")          # every stage; finished stages are reused
    model, meta = load_model(home, model_id, device="cpu")

Names are imported lazily, so `python -m pipeline.training.stages` (the torchrun entry) runs cleanly.
"""
import importlib

_EXPORTS = {
    "lineage": "checkpoint", "load_model": "checkpoint", "register_model": "checkpoint",
    "default_nproc": "stages", "plan_stages": "stages", "train": "stages", "train_distributed": "stages",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.training.{_EXPORTS[name]}"), name)
