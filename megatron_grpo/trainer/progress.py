"""What rank 0 shows per step: a progress bar on a terminal, plain lines every ``log_every`` steps otherwise.

``logging.progress_bar`` (and stdout being a terminal) selects the bar: one line redrawn in place with
the step, reward, KL, seconds per step and the ETA. Logs of batch jobs (Slurm, CI, a pipe) get a plain
line every ``trainer.log_every`` steps and at the last step, with the same numbers; metrics.jsonl and
TensorBoard still get every step.
"""
from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StepProgress:
    """Call :meth:`update` once per finished step (rank 0); :meth:`close` at the end."""

    def __init__(self, *, start_step: int, total: int, log_every: int = 1, bar: bool = True, stream=None,
                 line=None, prefix: str = "[megatron-grpo] "):
        self.total, self.every, self.start = total, max(1, int(log_every)), start_step
        self.stream = stream or sys.stdout
        self.line, self.prefix = line, prefix
        self._t0, self._bar = time.monotonic(), None
        if bar and getattr(self.stream, "isatty", lambda: False)():
            import shutil

            from tqdm import tqdm

            size = shutil.get_terminal_size((120, 24))  # a 0x0 pty (srun --pty) falls back to 120x24
            self._bar = tqdm(total=total, initial=start_step, file=self.stream, ncols=size.columns,
                             nrows=size.lines, mininterval=0,
                             desc="grpo", unit="step", bar_format="{desc} {n_fmt}/{total_fmt} |{bar}|{postfix}")

    def timing(self, step: int) -> tuple[float, float]:
        """(seconds per step, seconds left) averaged over this process's steps so far."""
        per = (time.monotonic() - self._t0) / max(step - self.start, 1)
        return per, per * (self.total - step)

    def update(self, step: int, metrics: dict) -> None:
        per, left = self.timing(step)
        if self._bar is not None:
            post = [f"reward {metrics.get('reward/mean', float('nan')):.3f}"]
            if "train/kl_ref" in metrics:
                post.append(f"kl {metrics['train/kl_ref']:.3g}")
            post += [f"{per:.2f} s/step", f"eta {_eta(left)}"]
            self._bar.set_postfix_str(" | ".join(post), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step % self.every == 0 or step == self.total:
            text = self.line(step, self.total, metrics) if self.line else f"step {step}/{self.total}"
            print(f"{self.prefix}{text} | {per:.3g} s/step | eta {_eta(left)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
