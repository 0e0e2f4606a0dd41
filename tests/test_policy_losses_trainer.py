"""GSPO and CISPO through the real training stack: exact gradients across TP/DP/micro-batch splits on
megatron-core (gloo), and a short `megatron-grpo train` run with each (vLLM rollouts, math-verify)."""
import pytest

from megatron_grpo.config import ConfigError, load_config, validate
from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.training_helpers import make_model_dir
from tests.e2e import CONFIG, metrics, run_train


@pytest.mark.parametrize("overrides,expected", [
    (["algorithm.policy_loss=sapo"], "algorithm.policy_loss='sapo' is not one of"),
    (["algorithm.policy_loss=gspo", "algorithm.gspo_clip_low=1.5"], "algorithm.gspo_clip_low=1.5 must be in (0, 1)"),
    (["algorithm.policy_loss=cispo", "algorithm.cispo_clip_high=0"], "algorithm.cispo_clip_high=0.0 must be > 0"),
    (["algorithm.policy_loss=cispo", "algorithm.dual_clip=3.0"], "does not apply to policy_loss=cispo"),
])
def test_bad_policy_loss_config_is_one_line(tmp_path, overrides, expected):
    base = [f"model.path={tmp_path / 'm'}", f"data.path={tmp_path / 'd'}", f"trainer.output_dir={tmp_path / 'o'}"]
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIG, base + overrides), check_paths=False)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_good_policy_loss_configs_validate(tmp_path):
    base = [f"model.path={tmp_path / 'm'}", f"data.path={tmp_path / 'd'}", f"trainer.output_dir={tmp_path / 'o'}"]
    for extra in (["algorithm.policy_loss=gspo"], ["algorithm.policy_loss=cispo", "algorithm.cispo_clip_low=0.5"]):
        validate(load_config(CONFIG, base + extra), check_paths=False)


def test_gspo_cispo_gradients_exact_across_tp_dp_and_microbatches(tmp_path):
    results = run_distributed("tests.dist.training_loss_kinds:loss_kinds_parity", 2,
                              kwargs={"model_dir": make_model_dir(tmp_path / "tiny_qwen2")})
    rep = results[0]
    assert len(rep["grad_err"]) == 2 * 2 * 4  # kinds x agg modes x (layout, micro-batch size)
    assert max(rep["grad_err"].values()) <= 1e-5, rep["grad_err"]
    assert max(rep["loss_err"].values()) <= 1e-6, rep["loss_err"]
    for kind in ("gspo", "cispo"):
        assert rep["clip_frac"][kind] > 0.0, rep["clip_frac"]  # the clipped branch was exercised
        assert rep["ref_grad_max"][kind] > 1e-4  # and the compared gradients are not all zero
    assert all(r == rep for r in results)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.usefixtures("no_shm_leak")
@pytest.mark.parametrize("options", [
    ["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.policy_loss=cispo", "algorithm.cispo_clip_low=0.001", "algorithm.cispo_clip_high=0.001",
     "algorithm.importance_sampling=sequence"],
], ids=["gspo", "cispo"])
def test_policy_loss_runs_through_the_trainer(assets, tmp_path, options):
    """Two GRPO steps, two passes over each batch (mu=2: the second pass is off-policy)."""
    out = tmp_path / "run"
    proc = run_train(*assets, f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.eval_steps=0",
                     "checkpoint.save_steps=0", "trainer.export_at_end=false", "algorithm.update_epochs=2",
                     *options)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/skipped"] == 0.0 and r["train/grad_norm"] > 0.0
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN anywhere
    # mu=2: the second pass sees ratios != 1; GSPO's 3e-4/4e-4 sequence clip and CISPO's 0.999..1.001
    # weight clip both bite there (the first, on-policy pass clips nothing)
    assert any(r["train/clip_frac_low"] + r["train/clip_frac_high"] > 0.0 for r in rows)
