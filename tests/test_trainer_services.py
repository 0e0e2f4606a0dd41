"""Checkpoint directory protocol, RNG capture, preemption flag, metrics log, pass@k."""
import itertools
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from megatron_grpo.trainer.checkpoint import (
    CheckpointError, CheckpointWriter, PreemptionFlag, list_complete, load_rng, resolve_resume, save_rng,
)
from megatron_grpo.trainer.eval_metrics import pass_at_k, summarize_eval
from megatron_grpo.trainer.metrics_log import MetricsLogger, read_metrics


def _save(writer, step):
    tmp = writer.begin(step, is_writer=True)
    (tmp / "payload.txt").write_text(f"step {step}")
    (tmp / "trainer_state.json").write_text("{}")
    (tmp / "model").mkdir()
    return writer.commit(step, {"note": "test"})


def test_commit_is_atomic_and_keeps_last_k(tmp_path):
    w = CheckpointWriter(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3):
        _save(w, step)
    assert [s for s, _ in list_complete(w.root)] == [2, 3]
    # a crash mid-write leaves a .partial dir that is never resumed from
    partial = w.begin(4, is_writer=True)
    (partial / "payload.txt").write_text("half")
    assert resolve_resume(w.root, "auto").name == "step_00000003"
    # a complete dir whose marker was corrupted is not complete
    (w.root / "step_00000003" / "COMPLETE").write_text("{trunc")
    assert resolve_resume(w.root, "auto").name == "step_00000002"
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        resolve_resume(w.root, str(w.root / "step_00000003"))
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_resume(w.root, str(tmp_path / "missing"))
    assert resolve_resume(w.root, "none") is None
    assert resolve_resume(tmp_path / "empty", "auto") is None
    # re-committing the same step replaces it
    final = _save(w, 2)
    assert (final / "payload.txt").read_text() == "step 2"


def test_rng_round_trip(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    save_rng(tmp_path, rank=0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    load_rng(tmp_path, rank=0)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(CheckpointError, match="no RNG state for rank 1"):
        load_rng(tmp_path, rank=1)


def test_preemption_flag_catches_sigusr1():
    flag = PreemptionFlag()
    try:
        assert not flag.set
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.set and flag.received == signal.SIGUSR1
    finally:
        flag.restore()


def test_metrics_log_resume_truncates_later_steps(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 6):
        log.log(step, {"reward": step * 0.1, "loss": torch.tensor(float(step)), "bad": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a line cut by kill -9
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    log.log(4, {"reward": 0.44})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward"] == 0.44 and rows[0]["loss"] == 1.0 and rows[0]["bad"] == "nan"
    assert any((tmp_path / "tensorboard").iterdir())


def _pass_at_k_by_enumeration(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_values_and_enumeration():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    s = summarize_eval([[True, False], [False, False]], [[1.0, 0.0], [0.5, 0.5]], ks=(1, 2))
    assert s["eval/accuracy"] == 0.25 and s["eval/pass@2"] == 0.5 and s["eval/reward_mean"] == 0.5
