"""Which megatron-core wrote a dist_checkpointing checkpoint, and whether the installed one can read it.

megatron-core changed its on-disk format after 0.16: 0.16 keeps the common (non-sharded) state in
``common.pt``; 0.19 stores it as a ``common_state`` object inside the torch_dist files and writes no
``common.pt``. 0.19 reads both; 0.16 stops deep inside ``dist_checkpointing.load`` ("Common file ...
does not exist"). Every checkpoint this project writes records the writing version, and every load
first calls :func:`check_readable`, so a reader that cannot read the format says so in one line —
naming both versions and the HF round trip that converts in either direction — before any model is
built. Support is feature-detected (the reader's ``load_common_state_dict`` knows the embedded
format), not inferred from version numbers.
"""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

COMMON_FILE = "common.pt"  # megatron-core's COMMON_STATE_FNAME (legacy common-state file)
META_KEY = "megatron_core_version"


def megatron_core_version() -> str:
    try:
        return md.version("megatron-core")
    except md.PackageNotFoundError:
        return "unknown"


def writer_meta() -> dict:
    """Recorded beside every checkpoint: ``{"megatron_core_version": "0.19.2"}``."""
    return {META_KEY: megatron_core_version()}


def reads_embedded_common_state() -> bool:
    """True if this megatron-core reads checkpoints whose common state is inside the torch_dist files."""
    try:
        from megatron.core.dist_checkpointing import serialization
    except ImportError:
        return False
    return hasattr(serialization, "_legacy_common_state_exists")


def incompatibility(dist_dir, written_by: str | None) -> str | None:
    """Why this megatron-core cannot read the dist_checkpointing directory ``dist_dir`` (None if it can)."""
    d = Path(dist_dir)
    if (d / COMMON_FILE).is_file() or not (d / "metadata.json").is_file() or reads_embedded_common_state():
        return None
    return (f"written by megatron-core {written_by or 'newer than 0.16 (not recorded)'}, which keeps the common "
            f"state inside the checkpoint (no {COMMON_FILE}); this megatron-core {megatron_core_version()} "
            "cannot read that format")


def check_readable(ckpt_dir, dist_dir, written_by: str | None, *, training: bool, error=ValueError) -> None:
    """Raise ``error`` with one line if this megatron-core cannot read the checkpoint at ``ckpt_dir``."""
    why = incompatibility(dist_dir, written_by)
    if why is None:
        return
    w = written_by or ">= 0.17"
    if training:
        how = (f"resume it with megatron-core {w}, or start a new run from HF weights exported there "
               f"(`megatron-grpo convert hf-to-megatron` converts them for this version)")
    else:
        how = (f"convert it through HF: with megatron-core {w} run `megatron-grpo convert megatron-to-hf "
               f"--ckpt {ckpt_dir} --out HF_DIR`, then here `megatron-grpo convert hf-to-megatron --hf HF_DIR "
               f"--out NEW_DIR`")
    raise error(f"{ckpt_dir}: {why}: {how}")
