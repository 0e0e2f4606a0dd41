"""The console script's subcommands beyond train: make-tiny, convert (both directions), input errors."""
import importlib.util
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from megatron_grpo.config import ConfigError, load_config, validate
from megatron_grpo.config.validate import check_runtime_packages
from tests.e2e import REPO, env


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_grpo.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=300)


def test_make_tiny_then_convert_round_trip_is_bit_exact(tmp_path):
    hf, mg, back = tmp_path / "hf", tmp_path / "mg", tmp_path / "back"
    assert _cli("make-tiny", "--out", str(hf), "--arch", "llama", "--tied").returncode == 0
    again = _cli("make-tiny", "--out", str(hf))
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--force" in again.stderr
    r = _cli("convert", "hf-to-megatron", "--hf", str(hf), "--out", str(mg))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("convert", "megatron-to-hf", "--ckpt", str(mg), "--out", str(back))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    bad = _cli("convert", "sideways")
    assert bad.returncode == 2 and "hf-to-megatron|megatron-to-hf" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_package_is_a_config_error(tmp_path):
    cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml",
                      [f"trainer.output_dir={tmp_path}", "logging.wandb=true"])
    validate(cfg, check_paths=False)  # a submit host that only plans the launch needs no wandb
    with pytest.raises(ConfigError, match="logging.wandb=true but the wandb package is not installed"):
        check_runtime_packages(cfg)
