"""Megatron dist_checkpointing checkpoints of a policy, and streaming export to an HF folder.

A checkpoint written here is a ``megatron.core.dist_checkpointing`` directory (re-shardable: it can be
loaded at another TP/PP) plus ``megatron_grpo.json`` (ModelInfo, tp/pp, padded vocab, dtype) and
``hf/`` (the source config.json, generation config, tokenizer and chat template), so an export can
rebuild a complete HF folder with no access to the original.

Export streams: for each parameter, in model order, the ranks that hold its TP shards (on the
owning pipeline stage, data-parallel rank 0) send them to global rank 0, which gathers, maps to HF
names, and appends to the current safetensors shard; a shard is written once it reaches
``max_shard_bytes``. Rank 0 never holds more than one full tensor plus one output shard.

Trust: dist_checkpointing's common state is read with ``torch.load`` (weights-only by default in
torch >= 2.6), but PyTorch DCP reads its ``.metadata`` file with pickle: load Megatron checkpoints
only from sources you trust; untrusted weights should come in as HF safetensors.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import ckpt_versions
from . import hf_mapping as hm
from .loader import named_global_parameters, unwrap_model
from .provider import ModelInfo

__all__ = ["META_FILE", "HF_SUBDIR", "CheckpointError", "parallel_session", "prepare_output_dir", "copy_hf_side_files",
           "save_megatron_checkpoint", "read_checkpoint_meta", "load_megatron_checkpoint", "export_hf",
           "progress_printer"]

META_FILE = "megatron_grpo.json"
HF_SUBDIR = "hf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A missing/foreign checkpoint, a refused overwrite, or a checkpoint/model mismatch."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def parallel_session(*, tp: int, pp: int, seed: int = 1234, ep: int = 1):
    """Model-parallel groups at (tp, pp, ep) for the duration of a tool run.

    Creates the process group when there is none (and destroys it after); inside an existing one
    (a trainer, a test) it only (re)builds megatron's parallel state, so tools can also be called
    in-process.
    """
    from megatron.core import parallel_state as ps

    from megatron_grpo.distributed.init import current_layout, destroy_distributed, init_distributed

    owns_group = not dist.is_initialized()
    if ps.model_parallel_is_initialized() and (
            ps.get_tensor_model_parallel_world_size() != tp or ps.get_pipeline_model_parallel_world_size() != pp
            or ps.get_expert_model_parallel_world_size() != ep):
        ps.destroy_model_parallel()
    try:
        init_distributed(tp=tp, pp=pp, seed=seed, ep=ep)
        yield current_layout()
    finally:
        if owns_group:
            destroy_distributed()
        elif ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


def prepare_output_dir(out, *, force: bool, protect: tuple = ()) -> Path:
    """Check (all ranks) that ``out`` may be written; rank 0 empties it with ``force``.

    Refuses a non-empty ``out`` without ``force`` and never deletes one of the ``protect`` folders.
    """
    out = Path(out).resolve()
    if any(out == Path(p).resolve() for p in protect):
        raise CheckpointError(f"refusing to write into the input folder {out}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty (pass --force to overwrite)")
    _barrier()  # every rank checked before rank 0 changes anything
    if _rank() == 0:
        if out.exists() and force:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    return out


def copy_hf_side_files(src, dst) -> list[str]:
    """Copy config, generation config, tokenizer and template files (not weights) from ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _chunks(model_chunks) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _sharded_state_dict(model_chunks) -> dict:
    chunks = _chunks(model_chunks)
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _padded_vocab_of(model_chunks) -> int | None:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    for name, p in named_global_parameters(model_chunks):
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return int(p.shape[0]) * tp
    return None


def save_megatron_checkpoint(model_chunks, out_dir, info: ModelInfo, *, hf_dir=None, extra_meta: dict | None = None) -> Path:
    """Save ``model_chunks`` (every rank calls) as a dist_checkpointing checkpoint + metadata + ``hf/`` files.

    ``out_dir`` must exist and be empty (see :func:`prepare_output_dir`).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    out = Path(out_dir)
    padded = _padded_vocab_of(model_chunks)
    if dist.is_initialized():  # stages without embedding/output learn the padded vocab from the others
        all_padded = [None] * dist.get_world_size()
        dist.all_gather_object(all_padded, padded)
        padded = next(p for p in all_padded if p is not None)
    dtype = next(p for _, p in named_global_parameters(model_chunks)).dtype
    dist_checkpointing.save(sharded_state_dict=_sharded_state_dict(model_chunks), checkpoint_dir=str(out))
    if _rank() == 0:
        meta = {
            "format": "megatron_grpo/dist_checkpointing/v1", "model_info": info.to_dict(),
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "padded_vocab_size": padded, "dtype": str(dtype).replace("torch.", ""),
            "num_chunks": len(_chunks(model_chunks)), **ckpt_versions.writer_meta(), **(extra_meta or {}),
        }
        if hf_dir is not None:
            meta["hf_files"] = copy_hf_side_files(hf_dir, out / HF_SUBDIR)
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _barrier()
    return out


def read_checkpoint_meta(ckpt_dir) -> dict:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    if not (d / META_FILE).is_file():
        raise CheckpointError(f"{d} has no {META_FILE}: not a checkpoint written by megatron_grpo")
    meta = json.loads((d / META_FILE).read_text())
    ckpt_versions.check_readable(d, d, meta.get(ckpt_versions.META_KEY), training=False, error=CheckpointError)
    return meta


def load_megatron_checkpoint(model_chunks, ckpt_dir, *, strict: bool = True) -> dict:
    """Load a checkpoint from :func:`save_megatron_checkpoint` into ``model_chunks`` (any TP/PP). Returns its metadata."""
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_meta(ckpt_dir)
    padded = _padded_vocab_of(model_chunks)
    if padded is not None and meta.get("padded_vocab_size") not in (None, padded):
        raise CheckpointError(
            f"{ckpt_dir} holds a padded vocab of {meta['padded_vocab_size']} rows but the model was built with {padded}: "
            f"build it with build_gpt_model(..., padded_vocab_size={meta['padded_vocab_size']})")
    chunks = _chunks(model_chunks)
    loaded = dist_checkpointing.load(sharded_state_dict=_sharded_state_dict(chunks), checkpoint_dir=str(ckpt_dir))
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    return meta


class _ShardWriter:
    """Rank 0's safetensors writer: fills shards up to ``max_bytes``, then HF names them and writes the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tmp = f".shard-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(self.out / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, tensors) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _owner_table(model_chunks, info: ModelInfo):
    """Every rank learns, for each global parameter name, (tp_rank -> global rank, shape, dtype) of its holders."""
    from megatron.core import parallel_state as ps

    from .moe import shard_position

    mine = {}
    for name, p in named_global_parameters(model_chunks):
        tp_rank, _, dp_rank = shard_position(name)  # routed experts: expert-TP rank, expert-DP rank
        if dp_rank == 0:
            mine[name] = (tp_rank, tuple(p.shape), str(p.dtype).replace("torch.", ""))
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, (dist.get_rank(), mine))
    owners: dict[str, dict[int, tuple]] = {}
    for rank, table in tables:
        for name, (tp_rank, shape, dtype) in table.items():
            owners.setdefault(name, {})[tp_rank] = (rank, shape, dtype)
    te = any(n.endswith("layer_norm_weight") for n in owners)
    order = hm.megatron_param_names(info, te_names=te)
    missing = [n for n in order if n not in owners]
    if missing:
        raise CheckpointError(f"no rank holds {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for n in owners:  # a tied model's last stage holds an output_layer copy: not exported
        if n not in order and not (n == "output_layer.weight" and info.tie_word_embeddings):
            raise CheckpointError(f"parameter {n} has no HF mapping for {info.hf_architecture}")
    return order, owners


def export_hf(model_chunks, info: ModelInfo, out_dir, *, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30, progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Gather the model (all ranks call) and write HF safetensors under ``out_dir`` on rank 0.

    Writes weights only; config/tokenizer files are the caller's (see :func:`copy_hf_side_files`).
    Returns the written file names on rank 0, [] elsewhere.
    """
    from megatron_grpo.platform import detect

    order, owners = _owner_table(model_chunks, info)
    local = dict(named_global_parameters(model_chunks))
    rank = dist.get_rank()
    dev = detect().device
    writer = _ShardWriter(Path(out_dir), max_shard_bytes) if rank == 0 else None
    for i, name in enumerate(order):
        holders = owners[name]
        needed = [0] if hm.param_kind(info, name) == "replicated" else sorted(holders)
        if sorted(holders) != list(range(len(holders))):
            raise CheckpointError(f"{name}: TP shards {sorted(holders)} are incomplete")
        if rank == 0:
            shards = []
            for tp_rank in needed:
                src, shape, dt = holders[tp_rank]
                if src == 0:
                    shards.append(local[name].detach())
                else:
                    buf = torch.empty(shape, dtype=getattr(torch, dt), device=dev)
                    dist.recv(buf, src=src)
                    shards.append(buf)
            full = hm.tp_gather(name, [s.cpu() for s in shards], info)
            for hf_name, t in hm.megatron_to_hf(info, name, full):
                writer.add(hf_name, t.to(dtype or t.dtype).contiguous().clone())
            if progress is not None:
                progress(i + 1, len(order), name)
        elif name in local and any(holders[t][0] == rank for t in needed):
            dist.send(local[name].detach().contiguous(), dst=0)
    files = writer.close() if writer is not None else []
    dist.barrier()
    return files


def progress_printer(label: str, *, steps: int = 10) -> Callable[[int, int, str], None]:
    """A ``progress(done, total, name)`` callback that prints about ``steps`` lines on rank 0."""
    started = time.monotonic()
    last = [-1]

    def report(done: int, total: int, name: str) -> None:
        if _rank() != 0:
            return
        bucket = done * steps // max(total, 1)
        if bucket != last[0] or done == total:
            last[0] = bucket
            print(f"[{label}] {done}/{total} ({100 * done // max(total, 1)}%) {time.monotonic() - started:.1f}s  {name}",
                  flush=True)

    return report
