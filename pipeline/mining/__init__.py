"""Mining: attention mining at inference, fused heatmaps (eq. 7-8) and boxes (sec. 3.2), shard by shard.

Fast paths are batched torch on the model's device (`heatmap_fusion`, `boxes`); `reference` is the numpy and
scikit-image version of the same, one map at a time, which the tests hold them to.
"""
from pipeline.mining.config import MiningConfig
from pipeline.mining.shard import mine_batch, mine_shard

__all__ = ["MiningConfig", "mine_batch", "mine_shard"]
