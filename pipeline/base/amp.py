"""Mixed precision chosen by the hardware: `amp: auto` is bf16 where bf16 is native, fp32 everywhere else.

bf16 autocast pays only where the hardware computes in bf16: CUDA devices that support it, and CPUs whose oneDNN
kernels run bf16 natively (AVX512-BF16, AMX, or at least AVX512 core). On an AVX2-only CPU oneDNN emulates it,
and a training step ran 15x slower than fp32 (68 s vs 4.5 s, ResNet-18 + MSA at 256 px, batch 32; AMD EPYC,
docs/benchmarks.md). An explicit `bf16` or `none` is honoured; a forced bf16 on such a CPU logs a warning.

The AVX2-only path can be emulated on a bigger CPU with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`;
both variables are read here, so `auto` then decides as that CPU would.

torch is imported on first call, not at import: config checks read `MODES` without loading it.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODES = ("auto", "bf16", "none")
# ONEDNN_MAX_CPU_ISA values (lower case) below AVX512 core: oneDNN emulates bf16 under these caps.
_CAPPED_ISAS = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2")


def device_of(name: str) -> torch.device:
    """A config's device (`auto`, `cpu`, `cuda`, `cuda:N`) with `auto` resolved: CUDA when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_bf16_native() -> bool:
    """True when this CPU (as torch and oneDNN are allowed to use it) runs bf16 kernels natively."""
    import torch

    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").lower()
    if isa in _CAPPED_ISAS:
        return False
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_native(device: torch.device | str) -> bool:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def resolve_amp(mode: str, device: torch.device | str) -> str:
    """`auto` | `bf16` | `none` -> the mode to run on `device`: `bf16` or `none`."""
    import torch

    return _resolve(mode, torch.device(device))


@functools.lru_cache(maxsize=None)   # decided (and warned about) once per mode and device
def _resolve(mode: str, device: torch.device) -> str:
    import torch

    if mode not in MODES:
        raise ValueError(f"amp must be one of {', '.join(MODES)}, got {mode!r}")
    native = bf16_native(device)
    if mode == "auto":
        return "bf16" if native else "none"
    if mode == "bf16" and not native:
        log.warning("amp: bf16 forced on %s without native bf16 (CPU capability %s): autocast is emulated and "
                    "about 15x slower than fp32 (68 s vs 4.5 s per training step measured on AVX2); "
                    "use amp: auto or none", device, torch.backends.cpu.get_cpu_capability())
    return mode


def describe(device: torch.device | str) -> str:
    """One line for benches and logs: the device and what `auto` picks there."""
    import torch

    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}"
    return f"{where}, native bf16: {bf16_native(device)}, amp auto -> {resolve_amp('auto', device)}"


def autocast(device: torch.device, mode: str):
    """The autocast context of `mode` (`auto` resolved for `device`) for a forward on `device`."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_amp(mode, device) == "bf16")
