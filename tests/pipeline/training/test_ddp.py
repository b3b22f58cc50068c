"""DDP: two CPU processes under torchrun (gloo) reach the weights of one process on the same global batch.

BatchNorm in training mode makes a sample's output depend on its batch-mates, so per-rank statistics (plain
DDP) and global ones (one process) differ by design, and SyncBatchNorm exists only for GPUs. The test runs the
`base` stage with BatchNorm frozen (`freeze_bn`, running statistics), which leaves what DDP is responsible
for: each rank takes its shard of every global batch, gradients are averaged, every rank steps the same
optimizer, rank 0 writes the checkpoint. fp32 and no augmentation, so only summation order differs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import blob_home, ddp_overrides, tiny_config  # noqa: E402

from models import create_model  # noqa: E402
from pipeline.config.train import load_config  # noqa: E402
from pipeline.training.checkpoint import load_checkpoint  # noqa: E402
from pipeline.training.engine import seed_of  # noqa: E402
from pipeline.training.stages import train  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_two_gloo_processes_match_one_process(tmp_path):
    home = blob_home(tmp_path, n=48)
    single = tmp_path / "single"
    shutil.copytree(home, single)
    out = tmp_path / "ddp.pt"
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).parent / "ddp_worker.py"), str(home), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)

    threads = torch.get_num_threads()
    try:
        model_id = train(single, load_config(tiny_config(**ddp_overrides())))
    finally:
        torch.set_num_threads(threads)
    one = load_checkpoint(single / "checkpoints" / model_id / "final.pt")["model"]
    assert ddp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(seed_of(0, 0))                            # the stage's initial weights
    init = create_model("resnet18", "baseline").state_dict()
    moved = max(float((one[k].float() - init[k].float()).abs().max()) for k in init if k.endswith("weight"))
    assert moved > 1e-4                                         # both actually trained (untrained: exactly 0)
    assert (home / "checkpoints" / model_id / "final.pt").exists()   # rank 0 wrote the same stage
