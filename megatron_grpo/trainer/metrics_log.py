"""Where step metrics go: metrics.jsonl (always), TensorBoard, W&B (offline works). Rank 0 only.

metrics.jsonl is append-only and flushed per line, so a killed run keeps every finished step and a
resumed run continues the same file (entries after the resumed step are dropped first, so the file
reads as one uninterrupted run).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": JSON has no literal for them
    return value


class MetricsLogger:
    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "megatron-grpo", wandb_mode: str = "offline", run_name: str | None = None,
                 config: dict | None = None, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:
                print("metrics: tensorboard not installed; TensorBoard logging off", flush=True)
        self._wandb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ValueError("logging.wandb=true but the wandb package is not installed (pip install wandb)") from None
            # The API key comes from the environment / netrc; it is never read or printed here.
            self._wandb = wb.init(project=wandb_project, mode=wandb_mode, dir=str(self.dir), name=run_name,
                                  config=config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with open(self.dir / "samples.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
