"""Resuming an older checkpoint of the folder's own run (checkpoint.resume=<step or path>) sets the
abandoned branch's later checkpoints and log lines aside, never deletes them, and a later
`resume=auto` continues the new branch. The first tests are files only; the last runs the trainer."""
import json
import shutil

import pytest

from megatron_grpo.trainer.checkpoint import CheckpointError, CheckpointWriter, verify_checkpoint
from megatron_grpo.trainer.run_dir import plan_run, start_run
from tests.e2e import PLAIN_RUN, metrics, run_train
from tests.test_checkpoint_verify import _cfg, _save


def _run_with_steps(out, steps, logged):
    plan = plan_run(_cfg(out, "checkpoint.resume=none"))
    start_run(plan)
    w = CheckpointWriter(out / "checkpoints", keep_last=10, run_id=plan.run_id)
    for s in steps:
        _save(w, s)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in logged))
    (out / "samples.jsonl").write_text("".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in logged))
    return plan


@pytest.mark.parametrize("how", ["2", "step_00000002", "path"])
def test_older_step_sets_later_work_aside(tmp_path, capsys, how):
    out = tmp_path / "run"
    plan = _run_with_steps(out, (1, 2, 3, 4), logged=range(1, 6))
    (out / "checkpoints" / "step_00000005.partial").mkdir()  # a save the kill cut short
    old = {p.relative_to(out / "checkpoints"): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    resume = str(out / "checkpoints" / "step_00000002") if how == "path" else how
    again = plan_run(_cfg(out, f"checkpoint.resume={resume}"))
    assert again.resume_dir == out / "checkpoints" / "step_00000002" and again.run_id == plan.run_id
    assert again.aside_after == 2 and not again.clear and not again.new_run
    assert len(list((out / "checkpoints").iterdir())) == 5  # planning moves nothing
    capsys.readouterr()
    start_run(again)
    printed = [line for line in capsys.readouterr().out.splitlines() if "moved to" in line]
    aside = [p for p in out.iterdir() if p.name.startswith("abandoned_after_step_00000002_")]
    assert len(aside) == 1 and len(printed) == 1, (aside, printed)
    assert "step_00000003, step_00000004, step_00000005.partial" in printed[0] and str(aside[0]) in printed[0]
    assert "3 metrics.jsonl line(s)" in printed[0] and "3 samples.jsonl line(s)" in printed[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    # nothing lost: the later checkpoints moved whole (and still verify), the later lines moved, in order
    for name in ("step_00000003", "step_00000004"):
        assert verify_checkpoint(aside[0] / "checkpoints" / name, run_id=plan.run_id) is None
    moved = {p.relative_to(aside[0] / "checkpoints"): p.read_bytes()
             for p in (aside[0] / "checkpoints").rglob("*") if p.is_file()}
    assert {**{k: v for k, v in old.items() if k.parts[0] in ("step_00000001", "step_00000002")}, **moved} == old
    assert [r["step"] for r in metrics(out)] == [1, 2] and [r["step"] for r in metrics(aside[0])] == [3, 4, 5]
    assert [json.loads(x)["step"] for x in (aside[0] / "samples.jsonl").read_text().splitlines()] == [3, 4, 5]
    # auto now continues the new branch: the resumed step, not the abandoned step 4
    assert plan_run(_cfg(out, "checkpoint.resume=auto")).resume_dir == out / "checkpoints" / "step_00000002"


def test_resuming_the_newest_or_auto_moves_nothing(tmp_path):
    out = tmp_path / "run"
    _run_with_steps(out, (1, 2), logged=range(1, 4))  # step 3 logged, killed before its checkpoint
    for resume in ("2", "auto"):
        plan = plan_run(_cfg(out, f"checkpoint.resume={resume}"))
        assert plan.resume_dir.name == "step_00000002" and plan.aside_after is None
        start_run(plan)
    assert not [p for p in out.iterdir() if p.name.startswith("abandoned")]


def test_a_step_without_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    _run_with_steps(out, (1, 2), logged=())
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=7: no checkpoint .*step_00000007 \(complete "
                                              r"steps: 1, 2\)") as e:
        plan_run(_cfg(out, "checkpoint.resume=7"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(2400)
def test_trainer_resumes_an_older_step_as_a_new_branch(assets, plain_run, tmp_path):
    """A real run to step 4 (a checkpoint each step: a copy of the session's `plain_run` folder), resumed
    from step 1 to step 3: steps 2-4 of the abandoned branch are set aside, the new branch repeats steps
    2-3 exactly, and `auto` then continues the new branch to a step 4 equal to the abandoned one."""
    out = tmp_path / "run"
    shutil.copytree(plain_run["out"], out)
    common = [*assets, *PLAIN_RUN, f"trainer.output_dir={out}"]  # PLAIN_RUN sets max_steps=4; overridden below
    old = {r["step"]: r for r in metrics(out)}
    assert sorted(old) == [1, 2, 3, 4]

    branch = run_train(*common, "trainer.max_steps=3", "checkpoint.resume=1", timeout=900)
    assert branch.returncode == 0, branch.stdout[-3000:] + branch.stderr[-3000:]
    assert "at step 1" in branch.stdout, branch.stdout[-3000:]
    aside = [p for p in out.iterdir() if p.name.startswith("abandoned_after_step_00000001_")]
    assert len(aside) == 1
    said = [line for line in branch.stdout.splitlines() if "moved to" in line]
    assert (len(said) == 1 and "step_00000002, step_00000003, step_00000004" in said[0]
            and "3 metrics.jsonl line(s)" in said[0]), said
    for s in (2, 3, 4):
        assert verify_checkpoint(aside[0] / "checkpoints" / f"step_{s:08d}") is None
    assert [r["step"] for r in metrics(aside[0])] == [2, 3, 4]
    new = {r["step"]: r for r in metrics(out)}
    assert sorted(new) == [1, 2, 3]  # one line per step: the new branch's
    for s in (2, 3):  # the same config from the same state: the abandoned steps come back exactly
        for key in ("reward/mean", "train/loss", "train/grad_norm"):
            assert new[s][key] == old[s][key], (s, key)

    more = run_train(*common, "trainer.max_steps=4", "checkpoint.resume=auto", timeout=900)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'} at step 3" in more.stdout, more.stdout[-3000:]
    assert "moved to" not in more.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics(aside[0])] == [2, 3, 4]
    for key in ("reward/mean", "train/loss", "train/grad_norm"):  # and continues it as the abandoned one went
        assert metrics(out)[3][key] == old[4][key], key
