"""Resume at another layout: a checkpoint written at TP1 (one rank) resumes at TP2 and, with the
distributed optimizer, at DP2 -- model weights equal the saved ones, and the next step (which reads
the Adam moments and the LR schedule) equals the uninterrupted run's up to float reordering. The
distributed optimizer ('dp_reshardable') resumes at another DP with the weights exact."""
import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.training_helpers import make_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_qwen2"))


def _max_diff(a: dict, b: dict) -> float:
    import torch

    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def test_resume_at_another_layout(model_dir, tmp_path):
    layout, distopt = dict(tp=2), False
    [ref] = run_distributed("tests.dist.resume_reshard:save_then_continue", 1,
                            kwargs={"model_dir": model_dir, "root": str(tmp_path / "ckpt"), "distopt": distopt})
    results = run_distributed("tests.dist.resume_reshard:resume_at", 2,
                              kwargs={"model_dir": model_dir, "ckpt": ref["ckpt"], **layout})
    for rep in results:
        assert rep["step"] == 2
        assert _max_diff(rep["loaded"], ref["saved"]) == 0.0  # resharded bit for bit
        moved = _max_diff(ref["after3"], ref["saved"])
        assert moved > 1e-4  # the third step changes the weights ...
        assert _max_diff(rep["after3"], ref["after3"]) <= 1e-5, (moved, rep["lr"])  # ... alike (Adam moments kept)


def test_distributed_optimizer_resumes_at_another_dp(model_dir, tmp_path):
    """The distributed optimizer's checkpoint ('dp_reshardable': TP x PP fixed, DP free) written at DP1
    loads at DP2: the step counter and every weight come back exactly, and the next step runs."""
    [ref] = run_distributed("tests.dist.resume_reshard:save_then_continue", 1,
                            kwargs={"model_dir": model_dir, "root": str(tmp_path / "ckpt"), "distopt": True})
    results = run_distributed("tests.dist.resume_reshard:resume_at", 2,
                              kwargs={"model_dir": model_dir, "ckpt": ref["ckpt"], "tp": 1, "distopt": True})
    for rep in results:
        assert rep["step"] == 2
        assert _max_diff(rep["loaded"], ref["saved"]) == 0.0, rep["lr"]
        assert _max_diff(rep["after3"], ref["saved"]) > 1e-4  # the resumed step trains
