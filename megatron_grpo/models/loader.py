"""Load HF weights into megatron-core model chunks, each rank reading only what it holds.

Why slices: a 70B checkpoint is ~140 GB; with TP=8 x PP=4 every rank needs ~1/32 of it. Each rank
asks :func:`hf_mapping.hf_slice_for` which rows/columns of which HF tensors make up its shard and
reads just those with safetensors ``get_slice`` (memory-mapped), so neither host memory nor disk
traffic scales with the full model on any rank.

Only safe formats are read: safetensors (single ``model.safetensors`` or sharded with
``model.safetensors.index.json``); legacy ``pytorch_model*.bin`` only through
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import hf_mapping as hm
from .provider import ModelInfo, load_model_info

__all__ = ["WeightLoadError", "HFCheckpoint", "LoadReport", "unwrap_model", "layer_offset_of",
           "named_global_parameters", "load_hf_weights", "load_megatron_checkpoint"]


class WeightLoadError(ValueError):
    """A tensor the model needs is missing from the HF folder, or has the wrong shape."""


class HFCheckpoint:
    """Lazy, read-only view of the tensors of an HF model folder (name -> file, shape, slice reads)."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self.bytes_read = 0
        self._handles: dict[str, object] = {}
        self._bin: dict[str, dict] = {}
        d = self.dir
        if (d / "model.safetensors.index.json").is_file():
            self.weight_map = dict(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
            self.format = "safetensors"
        elif (d / "model.safetensors").is_file():
            self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
            self.format = "safetensors"
        elif (d / "pytorch_model.bin.index.json").is_file():
            self.weight_map = dict(json.loads((d / "pytorch_model.bin.index.json").read_text())["weight_map"])
            self.format = "bin"
        elif (d / "pytorch_model.bin").is_file():
            self.weight_map = {k: "pytorch_model.bin" for k in self._open("pytorch_model.bin").keys()}
            self.format = "bin"
        else:
            raise WeightLoadError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {d}")

    def _open(self, fname: str):
        if fname not in self._handles:
            path = self.dir / fname
            if not path.is_file():
                raise WeightLoadError(f"{path} is listed in the index but does not exist")
            if fname.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[fname] = safe_open(str(path), framework="pt", device="cpu")
            else:  # weights_only: never runs pickled code
                self._handles[fname] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return self._handles[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise WeightLoadError(
                f"tensor {name} not found in {self.dir} ({len(self.weight_map)} tensors in the checkpoint)")
        return self.dir / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._open(self.file_of(name).name)
        if self.format == "safetensors":
            return tuple(h.get_slice(name).get_shape())
        return tuple(h[name].shape)

    def read(self, part: hm.HFSlice) -> torch.Tensor:
        """The slice ``part`` of one tensor (whole tensor when ``part.dim`` is None)."""
        h = self._open(self.file_of(part.hf_name).name)
        src = h.get_slice(part.hf_name) if self.format == "safetensors" else h[part.hf_name]
        if part.dim is None:
            t = src[:]
        elif part.dim == 0:
            t = src[part.start:part.stop]
        else:
            t = src[:, part.start:part.stop]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str) -> torch.Tensor:
        return self.read(hm.HFSlice(name))

    def close(self) -> None:
        self._handles.clear()


@dataclass
class LoadReport:
    tensors: int = 0  # Megatron parameters filled on this rank
    bytes_read: int = 0  # bytes read from the HF files by this rank
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)  # global Megatron names filled


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``) down to the GPTModel."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def layer_offset_of(model: torch.nn.Module) -> int:
    """Global index of this chunk's first layer, read from the built layers themselves.

    ``TransformerLayer.layer_number`` is 1-based and already includes megatron's PP/VP offset, so
    this is right for any pipeline layout megatron built (uneven stages, virtual stages).
    """
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def named_global_parameters(model_chunks) -> Iterable[tuple[str, torch.nn.Parameter]]:
    """(global Megatron name, parameter) over all chunks; skips empty placeholders and extra state.

    Global names carry the global layer index and, for routed experts, the global expert index.
    """
    from .moe import expert_offset, local_to_global_expert

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        model = unwrap_model(chunk)
        offset = layer_offset_of(model)
        info = getattr(model, "megatron_grpo_info", None)
        experts = expert_offset(info) if info is not None and info.num_experts else 0
        for name, p in model.named_parameters():
            if hm.is_extra_state(name) or p.numel() == 0:
                continue
            yield local_to_global_expert(hm.local_to_global_name(name, offset), experts), p


def _tp_position() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return 0, 1


@torch.no_grad()
def load_hf_weights(model_chunks, model_dir, info: ModelInfo | None = None, *,
                    progress: Callable[[int, int, str], None] | None = None) -> LoadReport:
    """Fill every parameter of ``model_chunks`` (this rank's TP/PP part) from an HF folder.

    Reads only the slices this rank needs. Padded vocab rows are set to zero. Raises
    :class:`WeightLoadError` naming the missing tensor or the shape mismatch (expected vs got, file).
    ``progress(done, total, name)`` is called after each parameter.
    """
    started = time.monotonic()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    info = info or getattr(unwrap_model(chunks[0]), "megatron_grpo_info", None) or load_model_info(model_dir)
    from .moe import shard_position

    ckpt = HFCheckpoint(model_dir)
    expected = hm.hf_param_shapes(info)
    report = LoadReport()
    params = list(named_global_parameters(model_chunks))
    checked: set[str] = set()
    try:
        for i, (name, param) in enumerate(params):
            tp_rank, tp_size, _ = shard_position(name)  # expert TP for routed experts
            kind = hm.param_kind(info, name)
            padded = param.shape[0] * tp_size if kind == "vocab" else None
            plan = hm.hf_slice_for(info, name, tp_rank=tp_rank, tp_size=tp_size, padded_vocab_size=padded)
            pieces = []
            for part in plan.parts:
                if part.hf_name not in checked:
                    got = ckpt.shape(part.hf_name)
                    if got != expected[part.hf_name]:
                        raise WeightLoadError(
                            f"tensor {part.hf_name}: expected shape {expected[part.hf_name]} from config.json, "
                            f"got {got} in {ckpt.file_of(part.hf_name)}")
                    checked.add(part.hf_name)
                pieces.append(ckpt.read(part))
            shard = plan.assemble(pieces)
            if tuple(shard.shape) != tuple(param.shape):
                raise WeightLoadError(
                    f"{name}: the model holds shape {tuple(param.shape)} on TP rank {tp_rank}/{tp_size}, "
                    f"the HF tensors give {tuple(shard.shape)} (was the model built from this config?)")
            param.data.copy_(shard)
            report.names.append(name)
            if progress is not None:
                progress(i + 1, len(params), name)
    finally:
        report.bytes_read = ckpt.bytes_read
        ckpt.close()
    report.tensors = len(report.names)
    report.seconds = time.monotonic() - started
    return report


def load_megatron_checkpoint(model_chunks, ckpt_dir, *, strict: bool = True) -> dict:
    """Load a dist_checkpointing checkpoint written by ``tools/convert_hf_to_megatron.py`` (any TP/PP).

    Thin alias of :func:`checkpoint_io.load_megatron_checkpoint`, so both weight sources are reachable
    from the loader. Returns the checkpoint's metadata (ModelInfo dict, tp/pp, padded vocab, dtype).
    """
    from .checkpoint_io import load_megatron_checkpoint as _load

    return _load(model_chunks, ckpt_dir, strict=strict)
