"""R3 routing replay on CPU: vLLM's fused-MoE experts captured per token in the project's worker extension
(rollout/routed_capture.py), replayed by a tiny Qwen3-MoE trainer at EP=2 (DP=2), over real rollouts,
optimizer steps and weight syncs:

* every completion carries ``[prompt + completion - 1, layers, k]`` experts;
* at the rollout's weights the trainer's own router picks the same expert sets as vLLM (up to near ties:
  share <= 2%), and its logprobs match the rollout's (fp32);
* with R3 the routing used in the training pass IS the rollout's (``routing_changed_frac`` 0, also in a
  plain replayed forward): this fails if the replay stops being applied;
* after an update, without replay the routing drifts from the rollout's; with R3 it does not.
"""
import json

import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.moe_bodies import make_moe_models

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model_dir = make_moe_models(tmp_path_factory.mktemp("r3-hf"), archs=("qwen3_moe",))["qwen3_moe"]
    return run_distributed("tests.dist.r3_bodies:r3_capture", 2, workdir=tmp_path_factory.mktemp("r3-w"),
                           timeout=900, kwargs={"model_dir": model_dir, "steps": 2})


def test_rollout_experts_match_the_trainer_and_r3_replays_them(runs):
    print(json.dumps(runs[0], indent=1))
    for r in runs:
        assert r["dp"] == 2 and r["record_shapes_ok"], r
        drift = 0
        for s in r["steps"]:
            changed, total = s["old_pass_vs_rollout"]
            assert total > 0 and changed / total <= 0.02, s  # same weights: near ties only
            assert s["old_lp_vs_rollout"]["max_abs"] <= 1e-4, s
            assert s["replayed_forward_changed"][0] == 0 and s["replayed_forward_changed"][1] > 0, s
            for phase in ("same_weights", "after_update"):
                r3 = s[f"{phase}/r3"]
                assert r3["changed_vs_batch_routing"] == 0.0, s  # R3 replays the rollout's experts
                assert r3["rollout_diff"] is not None, s
            assert s["same_weights/r3"]["rollout_diff"] <= 0.02, s
            if s["same_weights/r3"]["rollout_diff"] == 0.0:  # the same routing: the same expert load (the
                for k in ("moe/load_max_share", "moe/load_min_share", "moe/load_entropy"):  # last token left out)
                    assert abs(s["same_weights/r3"]["load"][k] - s["same_weights/none"]["load"][k]) <= 0.05, s
            drift += s["after_update/none"]["vs_rollout"]
        assert drift > 0.0, r  # the updates moved some tokens to other experts without replay
