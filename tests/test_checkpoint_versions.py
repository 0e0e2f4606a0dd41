"""Checkpoints across megatron-core versions, both directions, with the real converters of both environments.

`make test` builds two environments (.venv: megatron-core 0.16.1; .venv-mcore019: 0.19.2); this test runs
in either lane and drives the other one through subprocesses. A checkpoint written by one version and
read by the other either loads (its HF export is bit-exact with the source weights) or fails with exit 2
and ONE `error:` line naming both versions and the HF round trip, which the test then performs: export
with the writer, import with the reader, export again -> bit-exact. The older version's checkpoints must
load in the newer one.
"""
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from safetensors.torch import load_file

from tests.e2e import REPO, env, error_lines

LANE_VENVS = (".venv", ".venv-mcore019")


def _version_of(python: str) -> str | None:
    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


def _other_env() -> tuple[str, str] | None:
    """(python, megatron-core version) of the other lane's environment, or None if it is absent."""
    mine = md.version("megatron-core")
    pythons = [os.environ["MEGATRON_GRPO_OTHER_PYTHON"]] if os.environ.get("MEGATRON_GRPO_OTHER_PYTHON") else \
        [str(REPO / v / "bin" / "python") for v in LANE_VENVS]
    for py in pythons:
        if Path(py).exists() and (ver := _version_of(py)) not in (None, mine):
            return py, ver
    return None


def _cli(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "megatron_grpo.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env(), timeout=600)


# Several `megatron-grpo` commands in ONE interpreter of an environment (each a real `cli.main` call, as
# the console script makes): one `import megatron.core` instead of one per command. A ["resume", STEP]
# entry asks `checkpoint.resolve_resume` to resume STEP and reports its CheckpointError's text.
_BATCH = """
import json, sys
from megatron_grpo.cli import main
from megatron_grpo.trainer.checkpoint import CheckpointError, resolve_resume
out = []
for argv in json.loads(sys.argv[1]):
    if argv[0] == "resume":
        try:
            resolve_resume(None, argv[1])
            out.append("resumed")
        except CheckpointError as e:
            out.append(str(e))
    else:
        out.append(main(argv))
print("BATCH " + json.dumps(out))
"""


def _cli_batch(python: str, *commands: list) -> list:
    r = subprocess.run([python, "-c", _BATCH, json.dumps(commands)], capture_output=True, text=True, cwd=REPO,
                       env=env(), timeout=900)
    lines = [line for line in r.stdout.splitlines() if line.startswith("BATCH ")]
    assert r.returncode == 0 and len(lines) == 1, (commands, r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(lines[0][len("BATCH "):])


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def _training_checkpoint(tmp_path: Path, model_ckpt: Path, writer: str) -> Path:
    """A training checkpoint (COMPLETE marker naming its writer, dist_checkpointing ``model/``)."""
    import shutil

    step = tmp_path / f"train_{writer}" / "checkpoints" / "step_00000002"
    shutil.copytree(model_ckpt, step / "model")
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (step / "COMPLETE").write_text(json.dumps({"step": 2, "megatron_core_version": writer}))
    return step


def _check_training_resume_refused(line: str, writer: str, reader: str) -> None:
    """``checkpoint.resume`` of a training checkpoint in the format the reader cannot read refuses it
    with one line (before any model is built) naming both versions and what to do."""
    assert "\n" not in line.strip(), line
    assert f"megatron-core {writer}" in line and f"megatron-core {reader}" in line and "resume it with" in line, line


def test_checkpoints_across_megatron_core_versions(tmp_path):
    other = _other_env()
    if other is None:
        pytest.skip("no second environment with another megatron-core here (CI builds both: make setup "
                    "setup-mcore019, or set MEGATRON_GRPO_OTHER_PYTHON)")
    from packaging.version import Version

    if Version(other[1]) > Version(md.version("megatron-core")):
        pytest.skip("both directions run once, from the newest megatron-core's lane (the test drives both environments)")
    envs = {md.version("megatron-core"): sys.executable, other[1]: other[0]}
    mine = md.version("megatron-core")
    hf = tmp_path / "hf"
    # per environment, one process: its checkpoint of the HF folder, and that checkpoint exported back to
    # HF with the same version (the route the refusal line names, used below when the other cannot read it)
    for ver, py in envs.items():
        make = [["make-tiny", "--out", str(hf), "--arch", "qwen2"]] if ver == mine else []
        rcs = _cli_batch(py, *make,
                         ["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / f"ckpt_{ver}")],
                         ["convert", "megatron-to-hf", "--ckpt", str(tmp_path / f"ckpt_{ver}"),
                          "--out", str(tmp_path / f"via_{ver}")])
        assert rcs == [0] * len(rcs), (ver, rcs)
    outcome = {}
    for writer, reader in (tuple(envs), tuple(envs)[::-1]):
        ckpt, back = tmp_path / f"ckpt_{writer}", tmp_path / f"back_{writer}_to_{reader}"
        assert json.loads((ckpt / "megatron_grpo.json").read_text())["megatron_core_version"] == writer
        assert _same_weights(hf, tmp_path / f"via_{writer}")  # the writer's own round trip is bit-exact
        r = _cli(envs[reader], "convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(back))
        if r.returncode == 0:
            assert _same_weights(hf, back)
            outcome[(writer, reader)] = "loads"
            continue
        lines = error_lines(r.stderr)
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        line = lines[0]
        assert f"megatron-core {writer}" in line and f"megatron-core {reader}" in line, line
        assert "megatron-to-hf" in line and "hf-to-megatron" in line, line
        assert not back.exists() or not any(back.iterdir()), "nothing is written before the error"
        # the conversion the line names: export with the writer (above), import with the reader -> bit-exact
        via, again, out = tmp_path / f"via_{writer}", tmp_path / f"ckpt_{reader}_from_{writer}", tmp_path / "out"
        rc_in, rc_out, refusal = _cli_batch(
            envs[reader], ["convert", "hf-to-megatron", "--hf", str(via), "--out", str(again)],
            ["convert", "megatron-to-hf", "--ckpt", str(again), "--out", str(out)],
            ["resume", str(_training_checkpoint(tmp_path, ckpt, writer))])
        assert rc_in == 0 and rc_out == 0, (rc_in, rc_out)
        assert _same_weights(hf, out)
        outcome[(writer, reader)] = "one error line; converted through HF"
        _check_training_resume_refused(refusal, writer, reader)
    old, new = sorted(envs, key=Version)
    assert outcome[(old, new)] == "loads", outcome
    print("cross-version checkpoints:", outcome)
