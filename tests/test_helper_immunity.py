"""Helpers started inside ``PreemptionFlag.children_immune`` survive a process-group SIGTERM/SIGINT/
SIGUSR1 -- even when the block is what first starts multiprocessing's resource tracker, whose start
unblocks SIGINT/SIGTERM. That is how a group SIGTERM during a save killed dist_checkpointing's
results-queue manager ("Broken pipe" after the save). A fresh process, so that no tracker runs yet."""
import json
import subprocess
import sys

from tests.e2e import REPO, env

SCRIPT = r"""
import json, multiprocessing as mp, os, signal, time
from megatron_grpo.trainer.checkpoint import PreemptionFlag

if __name__ == "__main__":
    flag = PreemptionFlag()
    with PreemptionFlag.children_immune():  # as the trainer starts dist_checkpointing's helper
        queue = mp.get_context("spawn").Manager().Queue()
        inside = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    kids = [int(p) for p in os.popen(f"pgrep -P {os.getpid()}").read().split()]
    masks = {}
    for pid in kids:
        cmd = open(f"/proc/{pid}/cmdline").read()
        if "spawn_main" in cmd:
            masks[pid] = int([l for l in open(f"/proc/{pid}/status") if l.startswith("SigBlk")][0].split()[1], 16)
    os.killpg(os.getpgid(0), signal.SIGTERM)  # what scancel / timeout do to a job's processes
    time.sleep(1.0)
    queue.put("still there")  # a dead manager: BrokenPipeError / EOFError here
    print(json.dumps({"inside": inside, "masks": masks, "got": queue.get(timeout=10), "flag": flag.received}))
"""


def test_helpers_started_in_the_block_survive_a_group_sigterm(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["inside"] == [2, 10, 15]  # SIGINT, SIGUSR1, SIGTERM stayed blocked for the whole block
    assert out["masks"] and all(m & (1 << 14) and m & (1 << 1) and m & (1 << 9) for m in out["masks"].values())
    assert out["got"] == "still there" and out["flag"] == 15  # the manager lived; the trainer saw the signal
