"""Where the encoders run in bf16: always on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX).

On such CPUs oneDNN runs channels_last convolutions about twice as fast in bf16 as in float32
(measured here: resnet18 79 → 148 images/s, the audio CNN 90 → 196 segments/s on 2 cores); the
labels agree with float32 on the default bundle (``vidpipe bench`` measures the agreement).
``precision="fp32"`` forces float32 everywhere.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, get_args

import torch

from pipeline.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


# oneDNN's instruction-set caps below bf16 dot products: with one of these in ONEDNN_MAX_CPU_ISA (or the older
# DNNL_MAX_CPU_ISA) oneDNN emulates bf16 even on a CPU that has it (measured here: efficientnet_lite0 at 23.5 ms
# per image in bf16 against 20.1 in fp32 with AVX512_CORE_VNNI, 289 against 26 with AVX2)
_ISA_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                    "AVX512_CORE_VNNI"})


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (Linux /proc/cpuinfo flags) and oneDNN may use it (no
    ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 in this process's environment)."""
    # oneDNN reads ONEDNN_MAX_CPU_ISA, and the older name only where that one is not set
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.strip().upper() in _ISA_CAPS_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether a model on ``device`` runs under bf16 autocast."""
    check_precision(precision)
    if precision == "fp32":
        return False
    if device.type == "cuda" or precision == "bf16":
        return True
    return device.type == "cpu" and cpu_has_native_bf16()


def pick_device(choice: str, *, here: bool = True) -> torch.device:
    """The device ``--device CHOICE`` means: ``auto`` is CUDA where this machine has it.  ``here``: the models run
    on this machine, so ``cuda`` without CUDA is a usage error (else it would run on the CPU, unsaid); on a
    cluster's workers (``here=False``) ``cuda`` is taken at its word."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and here and not cuda:
        raise ConfigError("--device cuda: this machine has no CUDA GPU; use --device auto (the GPU where there is "
                          "one) or --device cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu")


def encoder_precision(precision: str, device: str, *, here: bool = False) -> str:
    """The encoders' precision that ``--precision P --device D`` means on this machine: "fp32" or "bf16"."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if uses_bf16(pick_device(device, here=here), "auto") else "fp32"


def runs_emulated_bf16(device: torch.device, precision: str) -> bool:
    """Whether a model on ``device`` at ``precision`` runs bf16 that this machine's CPU (or oneDNN's cap) emulates."""
    return device.type == "cpu" and uses_bf16(device, precision) and not cpu_has_native_bf16()


def emulated_bf16_warning(precision: str, device: str) -> str | None:
    """What to say where ``--precision bf16`` (or a job's recorded bf16) puts this machine's encoders on a CPU
    without native bf16: oneDNN emulates it there, several times slower than float32.  None otherwise."""
    if precision != "bf16" or not runs_emulated_bf16(pick_device(device), precision):
        return None
    return ("WARNING: --precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): the encoders' bf16 is "
            "emulated here, several times slower than fp32 (efficientnet_lite0 measured at 289 ms per image against "
            "26 in fp32 where oneDNN had only AVX2); --precision auto runs fp32 on this machine")


def node_has_native_bf16() -> bool:
    """:func:`cpu_has_native_bf16` as a plain function, for Ray to run on each node of a cluster."""
    return cpu_has_native_bf16()
