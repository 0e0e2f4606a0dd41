"""A checkpoint's manifest: every file, its size and a checksum, written last and checked on load.

The COMPLETE marker only says "every rank finished writing"; a shard lost or cut later (a full disk
during a copy, a failed rsync, a node's local scratch) still carries it. The manifest lets resume tell
a good checkpoint from a damaged one before megatron-core is asked to read it (which would fail on
one rank with a collective traceback). Small files are hashed whole; large ones (model shards) by
size plus the hash of their first and last block, so verifying a multi-GB checkpoint costs a few
reads per file, not a full pass.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "MANIFEST.json"
WHOLE_HASH_LIMIT = 1 << 20  # files up to 1 MiB are hashed whole
EDGE = 64 << 10  # larger files: first and last 64 KiB
VERSION = 1


def _digest(path: Path, size: int) -> tuple[str, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= WHOLE_HASH_LIMIT:
            h.update(fh.read())
            return "sha256", h.hexdigest()
        h.update(fh.read(EDGE))
        fh.seek(size - EDGE)
        h.update(fh.read(EDGE))
    return "sha256-edges", h.hexdigest()


def _files(root: Path, skip: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in skip:
                out.append(path)
    return sorted(out)


def write_manifest(ckpt_dir: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """Record every file under ckpt_dir (except the manifest, marker and ``skip``). Atomic."""
    ckpt_dir = Path(ckpt_dir)
    entries = {}
    for path in _files(ckpt_dir, (MANIFEST, MANIFEST + ".tmp", *skip)):
        size = path.stat().st_size
        kind, digest = _digest(path, size)
        entries[path.relative_to(ckpt_dir).as_posix()] = {"size": size, kind: digest}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "files": entries}, indent=1, sort_keys=True))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(ckpt_dir / MANIFEST)
    return ckpt_dir / MANIFEST


def verify_manifest(ckpt_dir: Path) -> str | None:
    """None if every recorded file is present with its size and checksum; else the first problem,
    one line naming the file. A checkpoint written before manifests existed has none: not checked."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for rel, entry in sorted(files.items()):
        f = ckpt_dir / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry["size"]:
            return f"{rel} has {size} bytes, the manifest recorded {entry['size']}"
        kind, digest = _digest(f, size)
        if entry.get(kind) != digest:
            return f"{rel} does not match its checksum"
    return None
