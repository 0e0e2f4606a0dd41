"""Create the run's locally generated inputs on first use: a tiny model (+ warm start), synthetic data.

Runs before any process group exists. Every rank may call it at once (torchrun starts them together):
an exclusive file lock lets the first rank build while the others wait, and a build lands by an
atomic rename, so a killed build never leaves a half-written model or dataset behind.
"""
from __future__ import annotations

import fcntl
import shutil
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(final: Path, build) -> None:
    tmp = final.with_name(final.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    build(tmp)
    tmp.replace(final)


def ensure_synthetic_data(cfg: DictConfig) -> Path:
    from megatron_grpo.data.synthetic import write_synthetic_dataset

    out = Path(cfg.data.path)
    with _locked(out):
        if not out.exists():  # never build over (or into) anything already there
            _build_atomically(out, lambda tmp: write_synthetic_dataset(
                tmp, n_train=cfg.data.synthetic_train, n_test=cfg.data.synthetic_test, seed=cfg.data.seed,
                task=cfg.data.synthetic_task))
    return out


def ensure_tiny_model(cfg: DictConfig) -> Path:
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    out = Path(cfg.model.path)
    with _locked(out):
        if out.exists():  # an existing folder is used as is (validation reports what is wrong with it)
            return out
        spec = TinyModelSpec(**OmegaConf.to_container(cfg.model.tiny, resolve=True))
        if cfg.model.warm_start_steps <= 0:
            _build_atomically(out, lambda tmp: make_tiny_model(tmp, spec))
            return out
        from megatron_grpo.data.loading import load_prompt_dataset
        from megatron_grpo.trainer.warm_start import sft_warm_start

        base = out.with_name(out.name + ".random_init")
        if not (base / "config.json").is_file():
            _build_atomically(base, lambda tmp: make_tiny_model(tmp, spec))
        rows = _training_rows(cfg, load_prompt_dataset)
        _build_atomically(out, lambda tmp: sft_warm_start(
            base, tmp, rows, steps=cfg.model.warm_start_steps, lr=cfg.model.warm_start_lr,
            seed=cfg.trainer.seed, system_prompt=cfg.data.system_prompt, answer=cfg.model.warm_start_answer))
    return out


def _training_rows(cfg: DictConfig, load_prompt_dataset) -> list[dict]:
    splits = load_prompt_dataset(cfg.data.path, problem_column=cfg.data.prompt_column,
                                 solution_column=cfg.data.solution_column)
    train = splits.train
    if "answer" not in train.column_names:
        raise ValueError(f"model.warm_start_steps needs an 'answer' column in {cfg.data.path} (synthetic data has one)")
    return [{"problem": r["problem"], "answer": r["answer"]} for r in train]  # loader renames columns


def prepare_assets(cfg: DictConfig) -> None:
    """Data first: the warm start trains on it."""
    if cfg.data.synthetic:
        ensure_synthetic_data(cfg)
    if cfg.model.init == "tiny":
        ensure_tiny_model(cfg)
