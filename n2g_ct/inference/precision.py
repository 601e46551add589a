"""Inference precision: what ``--precision auto|fp32|bf16|fp16`` runs, on which instructions.

- ``fp32``: float32 everywhere; on the CPU the network runs channels-last (oneDNN's fast layout,
  outputs bit-identical to the default layout).
- ``bf16`` / ``fp16`` on the CPU: the U-Net's levels 1 and deeper in that type (autocast), the
  full-resolution level (first and last blocks, head) and the residual stage in float32, which holds
  the error to the precision contract below where the whole network in bfloat16 does not
  (``python -m n2g_ct.research.benchmarks.precision``; BENCHMARKS.md). They pay off on CPUs with
  bfloat16 / float16 matrix instructions (AMX, AVX512-BF16, AVX512-FP16); elsewhere they are
  emulated and slower than float32.
- On CUDA: ``fp16`` runs the whole network under float16 autocast (the residual stage in float32),
  ``bf16`` as on the CPU.
- ``auto``: ``fp16`` on CUDA; on a CPU ``bf16`` where it has AMX-BF16 or AVX512-BF16, else ``fp32``.

Precision contract against float32 (starter model, chest CT): mean |ΔHU| ≤ 0.5 and the 99.9th
percentile ≤ 3 HU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from n2g_ct.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (``/proc/cpuinfo``) of bfloat16 matrix instructions."""
FP16_FLAGS = ("amx_fp16", "avx512_fp16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_precision(requested: str, device: torch.device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The precision to run and a note on the instructions it uses (for logs and reports).

    >>> resolve_precision("auto", torch.device("cpu"), frozenset({"avx512f"}))
    ('fp32', 'CPU without bfloat16 instructions: float32, channels-last')
    >>> resolve_precision("auto", torch.device("cpu"), frozenset({"amx_bf16"}))[0]
    'bf16'
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if device.type == "cuda":
        precision = "fp16" if requested == "auto" else requested
        return precision, f"CUDA, {precision}"
    flags = cpu_flags() if flags is None else flags
    bf16 = [flag for flag in BF16_FLAGS if flag in flags]
    if requested == "auto":
        if bf16:
            return "bf16", f"CPU with {', '.join(bf16)}: levels 1+ in bfloat16, full resolution in float32"
        return "fp32", "CPU without bfloat16 instructions: float32, channels-last"
    if requested == "fp32":
        return "fp32", "CPU, float32, channels-last"
    native = [flag for flag in (BF16_FLAGS if requested == "bf16" else FP16_FLAGS) if flag in flags]
    if native:
        return requested, f"CPU with {', '.join(native)}: levels 1+ in {requested}, full resolution in float32"
    return requested, f"CPU without {requested} instructions (emulated, slower than fp32): levels 1+ in {requested}"


def prepare_network(network: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """Set up F for ``precision`` on ``device`` (in place; returns it): CPU layout and the U-Net's level dtypes."""
    if device.type == "cpu":
        network.to(memory_format=torch.channels_last)
    if device.type == "cpu" or precision == "bf16":
        network.low_precision = DTYPES.get(precision)
    return network


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast of the whole forward pass: float16 for ``fp16`` on CUDA; none otherwise (the U-Net
    sets the dtype of its levels itself)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda" and precision == "fp16")
