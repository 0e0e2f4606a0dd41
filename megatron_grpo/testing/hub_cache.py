"""Put local folders into a Hugging Face hub cache, laid out as huggingface_hub writes it.

``<cache>/{models|datasets}--org--name/blobs/<hash>`` holds the bytes, ``snapshots/<commit>/<file>``
are relative symlinks to them and ``refs/main`` names the commit. ``snapshot_download`` with
``HF_HUB_OFFLINE=1`` then resolves the id to that snapshot, as on a cluster whose cache was filled
by ``huggingface-cli download``. Used by tests and by users who stage a cache for offline nodes.

Also: tiny datasets in the real layouts of the recipes' datasets (parquet files + a README with
their ``configs``), from the synthetic arithmetic rows.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder(cache: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def put_in_hub_cache(src: str | os.PathLike, cache: str | os.PathLike, repo_id: str, *, repo_type: str = "model",
                     ref: str = "main") -> str:
    """Copy ``src`` (a folder) into ``cache`` as one commit of ``repo_id``; returns the commit hash."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    tree = hashlib.sha1()
    for f in files:
        tree.update(str(f.relative_to(src)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    commit = tree.hexdigest()
    root = repo_folder(cache, repo_id, repo_type)
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in files:
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


def _readme(configs: dict[str, dict[str, str]], default: str | None) -> str:
    """The YAML header datasets reads: one entry per config with its split -> file pattern."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        if name == default:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    return "\n".join(lines + ["---", "", "Tiny stand-in made by megatron_grpo.testing.hub_cache.", ""])


def _parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def numina_tir_rows(rows: list[dict]) -> list[dict]:
    """AI-MO/NuminaMath-TIR's columns: problem, solution (worked, ``\\boxed{}`` answer), messages."""
    out = []
    for r in rows:
        solution = f"We compute {r['problem'].rstrip('?')}.\n\nThe final answer is $\\boxed{{{r['answer']}}}$."
        out.append({"problem": r["problem"], "solution": solution,
                    "messages": [{"role": "user", "content": r["problem"]},
                                 {"role": "assistant", "content": solution}]})
    return out


def gsm8k_rows(rows: list[dict]) -> list[dict]:
    """openai/gsm8k's columns: question, answer (reasoning with <<calc>> notes, last line ``#### N``)."""
    out = []
    for r in rows:
        expr = r["problem"].removeprefix("What is ").rstrip("?")
        out.append({"question": r["problem"],
                    "answer": f"We need {expr} = <<{expr.replace(' ', '')}={r['answer']}>>{r['answer']}.\n#### {r['answer']}"})
    return out


def write_numina_tir(out: str | os.PathLike, train: list[dict], test: list[dict]) -> Path:
    """The repo layout of AI-MO/NuminaMath-TIR: data/{train,test}-00000-of-00001.parquet + README configs."""
    out = Path(out)
    _parquet(numina_tir_rows(train), out / "data" / "train-00000-of-00001.parquet")
    _parquet(numina_tir_rows(test), out / "data" / "test-00000-of-00001.parquet")
    (out / "README.md").write_text(_readme({"default": {"train": "data/train-*", "test": "data/test-*"}}, None))
    return out


def write_gsm8k(out: str | os.PathLike, train: list[dict], test: list[dict]) -> Path:
    """The repo layout of openai/gsm8k: {main,socratic}/{train,test}-00000-of-00001.parquet, two configs."""
    out = Path(out)
    for subset in ("main", "socratic"):  # socratic answers interleave sub-questions: "How much ...? ** ..."
        rows = gsm8k_rows if subset == "main" else (
            lambda rs: [{**r, "answer": "What is asked? ** " + r["answer"]} for r in gsm8k_rows(rs)])
        _parquet(rows(train), out / subset / "train-00000-of-00001.parquet")
        _parquet(rows(test), out / subset / "test-00000-of-00001.parquet")
    (out / "README.md").write_text(_readme(
        {s: {"train": f"{s}/train-*", "test": f"{s}/test-*"} for s in ("main", "socratic")}, None))
    return out
