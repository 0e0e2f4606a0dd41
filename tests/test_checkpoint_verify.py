"""Verified checkpoints (manifest), one run per output folder, weight-file and launch preflight.
Fast: files only, no process group."""
import json
import struct

import pytest
import torch
from omegaconf import OmegaConf

from megatron_grpo.config import ConfigError, load_config
from megatron_grpo.config.preflight import check_launch, check_weights, safetensors_problem
from megatron_grpo.trainer.checkpoint import CheckpointError, CheckpointWriter, resolve_resume
from megatron_grpo.trainer.manifest import EDGE, MANIFEST, WHOLE_HASH_LIMIT, verify_manifest
from megatron_grpo.trainer.run_dir import plan_run, read_run_id, start_run
from tests.e2e import CONFIG


def _save(writer, step, big=False):
    tmp = writer.begin(step, is_writer=True)
    (tmp / "model").mkdir()
    (tmp / "model" / "shard.distcp").write_bytes(bytes(range(256)) * ((WHOLE_HASH_LIMIT + 3 * EDGE) // 256 if big else 4))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    return writer.commit(step, {"tp": 1})


@pytest.mark.parametrize("damage,reason", [
    (lambda d: (d / "model" / "shard.distcp").unlink(), "model/shard.distcp is missing"),
    (lambda d: (d / "model" / "shard.distcp").write_bytes(b"cut"), "has 3 bytes"),
    (lambda d: (d / "trainer_state.json").write_text('{"step": 9}'), "trainer_state.json does not match its checksum"),
    (lambda d: (d / MANIFEST).write_text("{"), "MANIFEST.json is unreadable"),
    (lambda d: (d / "COMPLETE").unlink(), "no valid COMPLETE marker"),
], ids=["shard-missing", "shard-truncated", "state-edited", "manifest-corrupt", "marker-missing"])
def test_auto_resume_walks_back_past_a_damaged_checkpoint(tmp_path, capsys, damage, reason):
    w = CheckpointWriter(tmp_path / "ckpt", keep_last=3, run_id="r1")
    for step in (2, 4):
        _save(w, step, big=True)
    newest = w.root / "step_00000004"
    assert verify_manifest(newest) is None
    damage(newest)
    skipped = []
    assert resolve_resume(w.root, "auto", run_id="r1", skipped=skipped) == w.root / "step_00000002"
    if reason != "no valid COMPLETE marker":  # no marker: not a checkpoint at all, nothing to say
        assert skipped == [(newest, skipped[0][1])] and reason in skipped[0][1]
        assert f"skipping checkpoint {newest}: " in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="cannot be resumed from") as e:
        resolve_resume(w.root, str(newest))
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_large_files_checked_by_size_and_edges(tmp_path):
    w = CheckpointWriter(tmp_path / "ckpt", run_id="r1")
    final = _save(w, 1, big=True)
    shard = final / "model" / "shard.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # last block: covered by the cheap check
    shard.write_bytes(bytes(data))
    assert "does not match its checksum" in verify_manifest(final)


def test_auto_resume_skips_another_runs_checkpoint(tmp_path):
    w = CheckpointWriter(tmp_path / "ckpt", run_id="mine")
    _save(w, 1)
    CheckpointWriter(tmp_path / "ckpt", run_id="other").begin(2, is_writer=True)
    _save(CheckpointWriter(tmp_path / "ckpt", run_id="other"), 2)
    skipped = []
    assert resolve_resume(w.root, "auto", run_id="mine", skipped=skipped).name == "step_00000001"
    assert "written by another run (other" in skipped[0][1]


def _cfg(out, *overrides):
    return load_config(CONFIG, [f"trainer.output_dir={out}", *overrides])


def test_new_run_into_a_used_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    plan = plan_run(_cfg(out, "checkpoint.resume=none"))
    assert plan.resume_dir is None and plan.new_run
    start_run(plan)
    w = CheckpointWriter(out / "checkpoints", run_id=plan.run_id)
    _save(w, 2)
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for resume in ("none", str(tmp_path / "elsewhere")):
        if resume != "none":  # another run's checkpoint into this folder
            _save(CheckpointWriter(tmp_path / "elsewhere" / "checkpoints", run_id="x"), 1)
            resume = str(tmp_path / "elsewhere" / "checkpoints" / "step_00000001")
        with pytest.raises(CheckpointError, match="holds another run") as e:
            plan_run(_cfg(out, f"checkpoint.resume={resume}"))
        assert "trainer.overwrite=true" in str(e.value) and "metrics.jsonl with 2 line(s)" in str(e.value)
    # auto continues the folder's own run
    again = plan_run(_cfg(out, "checkpoint.resume=auto"))
    assert again.resume_dir == out / "checkpoints" / "step_00000002" and again.run_id == plan.run_id
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # planning writes nothing
    # overwrite: a new run id; the old run's outputs go only when start_run runs
    fresh = plan_run(_cfg(out, "checkpoint.resume=none", "trainer.overwrite=true"))
    assert fresh.clear and fresh.run_id != plan.run_id and fresh.resume_dir is None
    start_run(fresh)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert read_run_id(out) == fresh.run_id


def test_auto_with_only_damaged_checkpoints_is_refused(tmp_path):
    out = tmp_path / "run"
    final = _save(CheckpointWriter(out / "checkpoints", run_id="r"), 3)
    (final / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint there can be resumed from .*step_00000003"):
        plan_run(_cfg(out))


def _safetensors(path, tensors, cut=0):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[:-cut])
    return path


def test_weight_preflight_names_the_file(tmp_path):
    good = _safetensors(tmp_path / "model.safetensors", {"w": torch.ones(64, 64)})
    assert safetensors_problem(good) is None
    check_weights(tmp_path)
    _safetensors(good, {"w": torch.ones(64, 64)}, cut=100)
    with pytest.raises(ConfigError, match=r"model\.safetensors: truncated: \d+ bytes, its header needs \d+"):
        check_weights(tmp_path)
    good.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    assert "not valid JSON" in safetensors_problem(good)
    good.write_bytes(b"abc")
    assert "too short" in safetensors_problem(good)
    good.unlink()
    with pytest.raises(ConfigError, match="has no weights"):
        check_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part-1.safetensors"}}))
    with pytest.raises(ConfigError, match="part-1.safetensors is listed in model.safetensors.index.json"):
        check_weights(tmp_path)


def test_launch_world_size_checked_in_the_parent():
    cfg = OmegaConf.merge(load_config(CONFIG, ["parallel.tp=2"]))
    check_launch(cfg, 2)
    with pytest.raises(ConfigError, match=r"--nproc-per-node=3 is not divisible by parallel.tp x parallel.pp = 2 x 1"):
        check_launch(cfg, 3)
