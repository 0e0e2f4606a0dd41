"""The conversion tools as users run them: real CLIs (python / torchrun), exit codes, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grpo.distributed.ports import free_port
from tests.dist.models_fixtures import make_test_models

REPO = Path(__file__).resolve().parents[1]
IMPORT = str(REPO / "tools" / "convert_hf_to_megatron.py")
EXPORT = str(REPO / "tools" / "convert_megatron_to_hf.py")


def _run(args, nproc: int = 1, timeout: float = 900):  # a hang guard; CI shares 2 cores among 3 streams
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
                     "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return subprocess.run(launcher + args, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_test_models(tmp_path_factory.mktemp("hf"), archs=("qwen2", "qwen3"))


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_cli_refusals(models, tmp_path):
    p = _run([IMPORT, "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "model directory not found" in _error_line(p)
    p = _run([IMPORT, "--hf", models["qwen3"], "--out", str(tmp_path / "o"), "--tp", "4"])
    assert p.returncode == 2 and "does not divide num_key_value_heads=2" in _error_line(p)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    p = _run([IMPORT, "--hf", models["qwen2"], "--out", str(busy)])
    assert p.returncode == 2 and "not empty (pass --force" in _error_line(p)
    assert (busy / "keep.txt").exists()
    p = _run([EXPORT, "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert p.returncode == 2 and "checkpoint directory not found" in _error_line(p)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_cli_import_force_then_torchrun_export_bf16(models, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "stale.txt").write_text("old")
    p = _run([IMPORT, "--hf", models["qwen2"], "--out", str(ckpt), "--force"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[load]" in p.stdout and "[done]" in p.stdout  # progress is shown
    assert not (ckpt / "stale.txt").exists()
    meta = json.loads((ckpt / "megatron_grpo.json").read_text())
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"], meta["dtype"]) == (1, 1, 512, "float32")
    assert (ckpt / "hf" / "tokenizer.json").is_file()

    out = tmp_path / "hf-bf16"  # world 2 with a TP1/PP1 checkpoint: data-parallel rank 1 only watches
    p = _run([EXPORT, "--ckpt", str(ckpt), "--out", str(out), "--dtype", "bfloat16"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    assert "[export]" in p.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    original, exported = load_file(str(Path(models["qwen2"]) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name, t in original.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], t.to(torch.bfloat16)), name
