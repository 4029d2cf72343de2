"""Does this CPU multiply bf16 natively? Decides what ``--precision auto`` means on the CPU.

``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the answer: it only asks for AVX512-BW/VL/DQ, on which
oneDNN emulates bf16 (slower than fp32). Native bf16 matmul is AVX512-BF16 or AMX-BF16 on x86 (torch's cpuinfo
capabilities, read at run time, never at build time) and the BF16 extension on Arm (the kernel's ``bf16``
feature flag, and oneDNN built to use it).

``CONINFER_CPU_BF16=1`` / ``0`` overrides the detection, so each branch can be forced (tests, benchmarks, a CPU
the detection gets wrong).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from coninfer.errors import InputError

ENV_OVERRIDE = "CONINFER_CPU_BF16"
_X86_FLAGS = ("amx_bf16", "avx512_bf16")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def native_bf16() -> bool:
    """True when bf16 matmul runs natively on this CPU (or ``CONINFER_CPU_BF16`` says so)."""
    override = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if override in _TRUE:
        return True
    if override in _FALSE:
        return False
    if override:
        raise InputError(f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]!r} is neither 1 nor 0",
                         hint=f"set {ENV_OVERRIDE}=1 (use bf16), {ENV_OVERRIDE}=0 (fp32), or unset it (detect)")
    return bool(bf16_features())


@functools.cache
def bf16_features() -> tuple[str, ...]:
    """The native-bf16 features found on this CPU, e.g. ``("avx512_bf16",)``; empty when there are none."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        capabilities = _torch_capabilities()
        return tuple(flag for flag in _X86_FLAGS if capabilities.get(flag))
    if machine in ("aarch64", "arm64"):
        return ("bf16",) if "bf16" in _arm_features() and _mkldnn_bf16() else ()
    return ()


def _torch_capabilities() -> dict:
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else {}
    except (RuntimeError, TypeError):  # a torch build without cpuinfo
        return {}


def _arm_features() -> set[str]:
    """The kernel's Arm feature flags (Linux); empty elsewhere (macOS: bf16 left off, fp32 is used)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.lower().startswith("features")
            for flag in line.split(":", 1)[-1].split()}


def _mkldnn_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False
