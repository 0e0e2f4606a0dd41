"""Load a problem/solution dataset with HF ``datasets``: local files first, the hub only by name.

Local sources: one file (.json, .jsonl, .parquet, .csv), a directory of such files (split by file
name: ``train*`` -> train, ``test*`` / ``val*`` / ``validation*`` -> test), or a ``save_to_disk``
directory. Anything else is tried as a hub name; with no hub reachable that is a one-line
:class:`DatasetLoadError` naming the dataset (checked up front, instead of datasets' ~25 s of retries).

Every row is checked: the problem and solution must be non-empty strings. A bad row is a ValueError
naming the column, the row index and the file -- or, with ``on_bad_row="skip"``, dropped and counted.
The configured columns are renamed to ``problem`` / ``solution`` (a different column already named
so is dropped); other columns are kept.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TEST_PREFIXES = ("test", "validation", "valid", "val", "eval", "dev")


class DatasetLoadError(ValueError):
    """A dataset could not be loaded; the message is one line that names it."""


@dataclass
class PromptSplits:
    """Train and (optional) test splits with canonical ``problem``/``solution`` columns."""

    train: Any
    test: Any | None
    source: str
    stats: dict[str, int] = field(default_factory=dict)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in FILE_BUILDERS


def _split_of(path: Path) -> str:
    stem = path.name.lower()
    return "test" if stem.startswith(TEST_PREFIXES) else "train"


def _files_by_split(directory: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
    if not files:
        raise DatasetLoadError(f"dataset directory {str(directory)!r} has no {'/'.join(sorted(FILE_BUILDERS))} files")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(_split_of(path), []).append(path)
    if "train" not in by_split:  # e.g. only data.jsonl named oddly: everything is train
        by_split = {"train": files}
    return by_split


def _load_file(path: Path):
    """One local file as a Dataset (its rows in file order)."""
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {str(path)!r}")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetLoadError(f"unsupported dataset file type {path.suffix!r} for {str(path)!r}; use {sorted(FILE_BUILDERS)}")
    import logging

    quiet = logging.getLogger("datasets")  # its own error log (and traceback) of a bad file: we say it in one line
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as exc:
        where = _bad_jsonl_line(path) if path.suffix.lower() == ".jsonl" else None
        raise DatasetLoadError(f"could not read dataset file {str(path)!r}: {where or _one_line(exc)}") from None
    finally:
        quiet.setLevel(level)


def _bad_jsonl_line(path: Path) -> str | None:
    """datasets' error for a malformed JSONL file names no line: find the first bad one (1-based)."""
    import json

    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None if the hub answers a TCP connect, else the reason; offline mode skips the check."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "ON") or os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true", "ON"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{endpoint} unreachable ({exc})"


def _load_hub(name: str) -> dict[str, Any]:
    import datasets

    reason = _hub_reachable()
    if reason is not None:
        raise DatasetLoadError(f"dataset {name!r} is not a local path and the Hugging Face hub is not reachable: {reason}")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:
        raise DatasetLoadError(f"could not load dataset {name!r} from the Hugging Face hub: {_one_line(exc)}") from None
    return {split: [(f"{name}[{split}]", ds)] for split, ds in loaded.items()}


def _is_repo_folder(path: Path) -> bool:
    """A hub dataset repo (a snapshot in the hub cache, or a clone): a README with its configs, or data
    files only in sub-folders (``data/train-00000-of-00001.parquet``)."""
    top = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_BUILDERS]
    return (path / "README.md").is_file() or not top


def _load_repo_folder(path: Path, subset: str | None) -> dict[str, list[tuple[str, Any]]]:
    """datasets' own layout rules (README configs, ``data/<split>-*`` files), as users load the repo."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(path), subset)
    except Exception as exc:
        raise DatasetLoadError(f"could not load dataset folder {str(path)!r}"
                               f"{f' (subset {subset!r})' if subset else ''}: {' '.join(str(exc).split())[:400]}"
                               f"{'' if subset else ' (data.subset picks a config)'}") from None
    return {split: [(f"{path}[{split}]", ds)] for split, ds in loaded.items()}


def _load_parts(source: str, subset: str | None = None) -> dict[str, list[tuple[str, Any]]]:
    """split -> [(origin label for error messages, Dataset)] from a local path or the hub."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return {split: [(f"{path}[{split}]", ds)] for split, ds in loaded.items()}
            return {"train": [(str(path), loaded)]}
        if subset is not None or _is_repo_folder(path):
            return _load_repo_folder(path, subset)
        return {split: [(str(p), _load_file(p)) for p in files] for split, files in _files_by_split(path).items()}
    if path.exists():
        return {"train": [(str(path), _load_file(path))]}
    if _looks_like_path(source):
        raise FileNotFoundError(f"dataset file not found: {source!r}")
    return _load_hub(source)


def _bad_value(value: Any) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if not value.strip():
        return "empty"
    return None


def _checked(ds, origin: str, columns: tuple[str, str], on_bad_row: str, stats: dict[str, int]):
    """Validate the two columns row by row; rename them to problem/solution."""
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"column {column!r} missing in {origin} (row 0; columns: {ds.column_names})")
    bad_rows = []
    for column in columns:
        for row, value in enumerate(ds[column]):
            problem = _bad_value(value)
            if problem is None:
                continue
            if on_bad_row == "error":
                raise ValueError(f"column {column!r} is {problem} in row {row} of {origin} "
                                 f"(record {row + 1}, counting from 1)")
            bad_rows.append(row)
    if bad_rows:
        bad = set(bad_rows)
        stats["dropped_bad_rows"] += len(bad)
        ds = ds.select([i for i in range(len(ds)) if i not in bad])
    for canonical, column in zip(("problem", "solution"), columns):
        if column != canonical:
            if canonical in ds.column_names:
                ds = ds.remove_columns(canonical)
            ds = ds.rename_column(column, canonical)
    return ds


def load_prompt_dataset(
    source: str,
    *,
    problem_column: str = "problem",
    solution_column: str = "solution",
    train_split: str = "train",
    test_split: str | None = "test",
    test_fraction: float | None = None,
    seed: int = 42,
    on_bad_row: str = "error",
    max_train_samples: int | None = None,
    subset: str | None = None,
) -> PromptSplits:
    """Load and validate a dataset's train (and test) split.

    test_split: the split used for evaluation when the source has it (None: never). test_fraction:
    when the source has no such split, carve this fraction out of train with ``seed`` (None/0: no test).
    on_bad_row: "error" or "skip". subset: the dataset's config name (a hub repo folder with several).
    stats: ``rows_read`` (all splits), ``dropped_bad_rows``,
    ``train_rows``, ``test_rows``.
    """
    import datasets

    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    parts = _load_parts(source, subset)
    if train_split not in parts:
        raise DatasetLoadError(f"dataset {source!r} has no split {train_split!r} (splits: {sorted(parts)})")
    stats = {"rows_read": 0, "dropped_bad_rows": 0}
    columns = (problem_column, solution_column)

    def assemble(split: str):
        pieces = []
        for origin, ds in parts[split]:
            stats["rows_read"] += len(ds)
            pieces.append(_checked(ds, origin, columns, on_bad_row, stats))
        return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)

    train = assemble(train_split)
    test = assemble(test_split) if test_split is not None and test_split in parts else None
    if test is None and test_fraction and len(train) > 1:
        halves = train.train_test_split(test_size=test_fraction, seed=seed)
        train, test = halves["train"], halves["test"]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    stats["train_rows"], stats["test_rows"] = len(train), len(test) if test is not None else 0
    if len(train) == 0:
        raise ValueError(
            f"dataset {source!r} split {train_split!r} is empty after validation: "
            f"{stats['rows_read']} rows read, {stats['dropped_bad_rows']} bad rows skipped"
        )
    return PromptSplits(train=train, test=test, source=source, stats=stats)
