"""trainer.log_every and logging.progress_bar: plain lines every N steps in logs, a bar on a terminal."""
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from megatron_grpo.trainer.loop import progress_line
from megatron_grpo.trainer.progress import StepProgress

REPO = Path(__file__).resolve().parents[1]
M = {"reward/mean": 0.5, "reward/format/mean": 0.25, "train/kl_ref": 0.0123, "time/step": 1.5}


def test_plain_lines_every_log_every_steps_and_the_last():
    out = io.StringIO()  # not a terminal: the bar is off even with progress_bar=true
    p = StepProgress(start_step=0, total=7, log_every=3, bar=True, stream=out, line=progress_line)
    for step in range(1, 8):
        p.update(step, M)
    p.close()
    lines = out.getvalue().splitlines()
    assert [l.split("step ", 1)[1].split("/")[0] for l in lines] == ["3", "6", "7"]
    assert all("reward 0.500" in l and "kl 0.0123" in l and "s/step" in l and "eta " in l for l in lines), lines
    assert lines[-1].endswith("eta 0:00")


def test_resumed_run_counts_from_its_start_step():
    out = io.StringIO()
    p = StepProgress(start_step=4, total=6, log_every=1, bar=False, stream=out, line=progress_line)
    p.update(5, M)
    p.update(6, M)
    assert [l.split("step ", 1)[1].split("/")[0] for l in out.getvalue().splitlines()] == ["5", "6"]


def _in_pty(code: str) -> str:
    """Run python code with stdout on a pseudo-terminal; returns what the terminal received."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=child, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_bar_on_a_terminal_with_reward_kl_speed_and_eta():
    code = ("from megatron_grpo.trainer.progress import StepProgress\n"
            f"p = StepProgress(start_step=0, total=4, log_every=100, bar=True)\n"
            f"for s in range(1, 5): p.update(s, {M!r})\n"
            "p.close()\n")
    screen = _in_pty(code)
    assert "\r" in screen and "4/4" in screen, screen  # redrawn in place, up to the last step
    final = screen.replace("\r\n", "\n").split("\r")[-1]
    for part in ("reward 0.500", "kl 0.0123", "s/step", "eta 0:00"):
        assert part in final, final
    assert "[megatron-grpo] step" not in screen  # no plain lines while the bar is shown


def test_bar_off_on_a_terminal_gives_lines():
    code = ("from megatron_grpo.trainer.progress import StepProgress\n"
            f"p = StepProgress(start_step=0, total=4, log_every=2, bar=False)\n"
            f"for s in range(1, 5): p.update(s, {M!r})\n")
    lines = [l for l in _in_pty(code).splitlines() if l.strip()]
    assert [l.split("step ", 1)[1].split("/")[0] for l in lines] == ["2", "4"], lines
