"""Resume at another layout: a checkpoint written at TP1 x PP1 (one rank) resumes at TP2 and at PP2
with the plain optimizer, and with the distributed optimizer at DP2 -- step and model weights equal the
saved ones, and the next step (which reads the Adam moments, Adam's step count and the LR schedule)
equals the uninterrupted run's up to float reordering. The distributed optimizer's 'dp_reshardable'
format keeps TP x PP fixed: at another PP it is one line naming both layouts."""
import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.training_helpers import make_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2"))


def _reference(model_dir, root, distopt: bool) -> dict:
    [ref] = run_distributed("tests.dist.resume_reshard:save_then_continue", 1, warm=True,
                            kwargs={"model_dir": model_dir, "root": str(root), "distopt": distopt})
    return ref


@pytest.fixture(scope="module")
def plain_ref(model_dir, tmp_path_factory):
    """2 steps at TP1 x PP1, saved, then the uninterrupted 3rd step (plain optimizer)."""
    return _reference(model_dir, tmp_path_factory.mktemp("ckpt_plain"), False)


@pytest.fixture(scope="module")
def distopt_ref(model_dir, tmp_path_factory):
    """The same with the distributed optimizer (DP1)."""
    return _reference(model_dir, tmp_path_factory.mktemp("ckpt_distopt"), True)


def _max_diff(a: dict, b: dict) -> float:
    import torch

    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def _assert_resumed(results: list, ref: dict) -> None:
    moved = _max_diff(ref["after3"], ref["saved"])
    assert moved > 1e-4  # the third step changes the weights ...
    for rep in results:
        assert rep["step"] == 2
        assert _max_diff(rep["loaded"], ref["saved"]) == 0.0, rep["lr"]  # resharded bit for bit
        assert _max_diff(rep["after3"], ref["after3"]) <= 1e-5, (moved, rep["lr"])  # ... alike (Adam state kept)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(tp=1, pp=2)], ids=["tp1_to_tp2", "pp1_to_pp2"])
def test_resume_at_another_layout(model_dir, plain_ref, layout):
    results = run_distributed("tests.dist.resume_reshard:resume_at", 2, warm=True,
                              kwargs={"model_dir": model_dir, "ckpt": plain_ref["ckpt"], **layout})
    _assert_resumed(results, plain_ref)


def test_distributed_optimizer_resumes_at_another_dp(model_dir, distopt_ref):
    """The distributed optimizer's checkpoint ('dp_reshardable': TP x PP fixed, DP free) written at DP1
    loads at DP2: the step counter and every weight come back exactly, and the next step equals the
    uninterrupted run's (Adam moments and step count restored; the DP sum only reorders floats)."""
    results = run_distributed("tests.dist.resume_reshard:resume_at", 2, warm=True,
                              kwargs={"model_dir": model_dir, "ckpt": distopt_ref["ckpt"], "tp": 1, "distopt": True})
    _assert_resumed(results, distopt_ref)


def test_distributed_optimizer_at_another_pp_is_one_line(model_dir, distopt_ref):
    """'dp_reshardable' cannot move to another PP (its buckets follow the TP x PP shard of the model):
    every rank reports one line naming the layout written and the layout asked for."""
    results = run_distributed("tests.dist.resume_reshard:resume_error_at", 2, warm=True,
                              kwargs={"model_dir": model_dir, "ckpt": distopt_ref["ckpt"], "tp": 1, "pp": 2,
                                      "distopt": True})
    for rep in results:
        assert rep["error"] and rep["lines"] == 1, rep
        assert "tp=1 pp=1 dp=1" in rep["error"] and "tp=1 pp=2 dp=1" in rep["error"], rep
        assert "resume at tp=1 pp=1, any DP" in rep["error"], rep
