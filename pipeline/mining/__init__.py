"""Mining: attention mining at inference, fused heatmaps (eq. 7-8) and boxes (sec. 3.2), shard by shard.

Fast paths are batched torch on the model's device (`heatmap_fusion`, `boxes`); `reference` is the numpy and
scikit-image version of the same, one map at a time, which the tests hold them to. Its config is
`pipeline.config.mining`; run ids and parts on disk are `pipeline.runs.parts`. Names are imported lazily.
"""
import importlib

_EXPORTS = {"mine_batch": "shard", "mine_shard": "shard"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
