"""R2 routing replay on a tiny Qwen3-MoE at EP=2 (DP=2) and EP=2 x PP=2 (DP=2),
after real optimizer steps:

* the old pass's record is per sequence: identical under fixed micro-batches of 2 and 8 rows and
  token-budget micro-batches (regrouped, reordered, cut rows);
* the first update runs at the old pass's weights: no (token, layer) expert set differs (exactness of
  the keying across micro-batchings); after the updates, without replay some do;
* with R2 none does, at 1, 2, 8 rows and token-budget micro-batches, and the training forward's
  logprobs equal a forward with the recorded routing forced; the free routing gives other logprobs;
* the reference pass replays the record (its weights are the old pass's: it gives the old logprobs);
* megatron's aux loss and the expert load (models/moe_load.py, equal to the record's) are logged.
"""
import pytest

from megatron_grpo.testing.torchrun import run_distributed
from tests.dist.moe_bodies import make_moe_models


# EP=2 x PP=2. No TP>1 here: megatron-core refuses MoE training with TP without sequence parallelism, and
# with it the dispatcher all-gathers uneven splits, which gloo refuses (MoE x TP training cannot run on CPU).
LAYOUTS4 = [(1, 2, 2, False)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_moe_models(tmp_path_factory.mktemp("rr-hf"), archs=("qwen3_moe",))["qwen3_moe"]


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """{layout: [per-rank results]}: EP=2 on 2 ranks, then EP2xPP2 on 4 ranks."""
    work = tmp_path_factory.mktemp("rr-w")
    out = {"tp1ep2pp1": run_distributed("tests.dist.routing_replay_bodies:routing_replay", 2, warm=True, workdir=work,
                                        timeout=900, kwargs={"model_dir": model_dir, "ep": 2})}
    four = run_distributed("tests.dist.routing_replay_bodies:routing_replay_layouts", 4, warm=True, workdir=work, timeout=1200,
                           kwargs={"model_dir": model_dir, "layouts": LAYOUTS4})
    for key in four[0]:
        out[key] = [r[key] for r in four]
    return out


KEYS = ["tp1ep2pp1", "tp1ep2pp2"]


@pytest.mark.parametrize("key", KEYS)
def test_record_is_per_sequence(runs, key):
    for r in runs[key]:
        assert r["dp"] == 2 and r["ep"] == 2
        assert r["record_shape"][2:] == [2 // r["pp"], 2]  # this stage's MoE layers x top-2
        assert r["record_split_equal"], r
        assert r["trainer_old_pass_equal"] and not r["record_on_policy"], r
        assert r["old_split_err"] <= 1e-5, r
        assert r["changed_first_update"] == 0.0, r


@pytest.mark.parametrize("key", KEYS)
def test_without_replay_routing_changes_with_r2_it_does_not(runs, key):
    print(key, runs[key][0])
    for r in runs[key]:
        assert r["changed_none"] > 0.0, r  # the updates moved some tokens to other experts
        assert r["free_vs_forced"] > 1e-4, r  # ... which changes their logprobs
        for split, frac in r["changed_r2"].items():
            assert frac == 0.0, (split, r)  # fails when replay stops being applied
        for split, err in r["r2_vs_forced"].items():
            assert err <= 1e-5, (split, r)
    assert any(r["r2_vs_forced"] for r in runs[key])  # the last stage compared


@pytest.mark.parametrize("key", KEYS)
def test_reference_replays_and_aux_loss_is_logged(runs, key):
    for r in runs[key]:
        assert r["ref_vs_old"] <= 1e-6, r
        assert r["aux_metrics"].get("moe/load_balancing_loss", 0.0) > 0.0, r
        load = {k: v for k, v in r["aux_metrics"].items() if k.startswith("moe/load_") and k != "moe/load_balancing_loss"}
        assert set(load) == {"moe/load_max_share", "moe/load_min_share", "moe/load_entropy"}, r
        assert 0.0 <= load["moe/load_min_share"] <= 0.25 <= load["moe/load_max_share"] <= 1.0, r  # 4 experts
        if "load_from_record" in r:  # the expert load of the routing used equals the record's
            for k, v in r["load_from_record"].items():
                assert abs(load[k] - v) <= 1e-9, (k, load[k], v)
