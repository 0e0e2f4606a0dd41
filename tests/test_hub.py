"""Hub ids through huggingface_hub's cache, the recipes' dataset layouts through `datasets`, GSM8K gold.

Resolution runs in subprocesses: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported,
as in a user's job.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grpo.testing.hub_cache import gsm8k_rows, put_in_hub_cache, write_gsm8k, write_numina_tir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from megatron_grpo.data.synthetic import make_synthetic_splits

    root = tmp_path_factory.mktemp("hub")
    train, test = make_synthetic_splits(n_train=20, n_test=4, seed=5)
    commits = {
        "AI-MO/NuminaMath-TIR": put_in_hub_cache(write_numina_tir(root / "numina", train, test), root / "home" / "hub",
                                                 "AI-MO/NuminaMath-TIR", repo_type="dataset"),
        "openai/gsm8k": put_in_hub_cache(write_gsm8k(root / "gsm8k", train, test), root / "home" / "hub",
                                         "openai/gsm8k", repo_type="dataset"),
    }
    return root / "home", commits


def _py(code: str, home: Path, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LOCAL_RANK", "MASTER_"))}
    e.update(PYTHONPATH=str(REPO), HF_HOME=str(home), HF_HUB_OFFLINE="1", **env)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=e, cwd=REPO)


def _run(code: str, home: Path, **env) -> dict:
    proc = _py(code, home, **env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


LOAD = """
import json
from megatron_grpo.hub import resolve
from megatron_grpo.data.loading import load_prompt_dataset, DatasetLoadError
out = {}
n = resolve("data.path", "AI-MO/NuminaMath-TIR", repo_type="dataset")
pinned = resolve("data.path", "AI-MO/NuminaMath-TIR@" + n.revision, repo_type="dataset")
s = load_prompt_dataset(n.path)
out["numina"] = dict(rev=n.revision, pinned=pinned.path == n.path, columns=s.train.column_names, train=len(s.train),
                     test=len(s.test), row=s.train[0])
g = resolve("data.path", "openai/gsm8k", repo_type="dataset")
for subset in ("main", "socratic"):
    s = load_prompt_dataset(g.path, subset=subset, problem_column="question", solution_column="answer")
    out[subset] = dict(columns=s.train.column_names, train=len(s.train), test=len(s.test), row=s.train[0])
try:
    load_prompt_dataset(g.path, problem_column="question", solution_column="answer")
except DatasetLoadError as e:
    out["no_subset"] = str(e)
print(json.dumps(out))
"""


def test_recipe_dataset_layouts_load_through_datasets(hub):
    home, commits = hub
    out = _run(LOAD, home)
    n = out["numina"]
    assert n["rev"] == commits["AI-MO/NuminaMath-TIR"] and n["pinned"]
    assert n["columns"] == ["problem", "solution", "messages"] and (n["train"], n["test"]) == (20, 4)
    assert "\\boxed{" in n["row"]["solution"] and n["row"]["messages"][0]["content"] == n["row"]["problem"]
    for subset in ("main", "socratic"):  # question/answer renamed to the loader's problem/solution
        assert out[subset]["columns"] == ["problem", "solution"] and (out[subset]["train"], out[subset]["test"]) == (20, 4)
        assert out[subset]["row"]["solution"].splitlines()[-1].startswith("#### ")
    assert out["main"]["row"]["problem"] == out["socratic"]["row"]["problem"]
    assert out["main"]["row"]["solution"] != out["socratic"]["row"]["solution"]
    assert "'main'" in out["no_subset"] and "'socratic'" in out["no_subset"] and "data.subset" in out["no_subset"]
    assert "\n" not in out["no_subset"]


HANDOFF = """
import json, time
from megatron_grpo.config.loader import ConfigError
from megatron_grpo.hub import resolve
time.sleep(float(__import__("os").environ["DELAY"]))
out = {}
for repo_id in __import__("os").environ["IDS"].split(","):
    try:
        r = resolve("data.path", repo_id, repo_type="dataset")
        out[repo_id] = {"path": r.path, "revision": r.revision}
    except ConfigError as e:
        out[repo_id] = {"error": str(e)}
print(json.dumps(out))
"""


def test_one_rank_per_node_resolves_the_others_wait(hub, tmp_path):
    """Local rank 1 starts first and waits for local rank 0's answer (a path or its error line), for a
    cached id and for a revision the cache does not hold (one pair of processes resolves both in turn).
    Rank 1 sees an empty cache of its own, so what it returns can only come from rank 0."""
    home, commits = hub
    ids = ["openai/gsm8k", "openai/gsm8k@v0"]
    job = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + int(time.time()) % 20000), IDS=",".join(ids))
    empty = tmp_path / "empty_home"
    empty.mkdir()
    waiting = _py(HANDOFF, empty, LOCAL_RANK="1", DELAY="0", **job)
    resolving = _py(HANDOFF, home, LOCAL_RANK="0", DELAY="3", **job)
    results = []
    for proc in (resolving, waiting):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1], results
    assert sorted(results[0]) == sorted(ids), results
    found, missing = results[0]["openai/gsm8k"], results[0]["openai/gsm8k@v0"]
    assert found["revision"] == commits["openai/gsm8k"], found
    assert "'openai/gsm8k@v0'" in missing["error"] and str(home / "hub") in missing["error"], missing


GSM8K_COMPLETIONS = [
    ("<think>48/2=24, 48+24=72</think><answer>\\boxed{72}</answer>", 72),
    ("<think>so</think><answer>\\boxed{71}</answer>", 72),
    ("The answer is $\\frac{144}{2}$.", 72),
    ("\\boxed{1000}", 1000),
    ("\\boxed{1,000}", 1000),
    ("\\boxed{0.5}", "1/2"),
    ("no answer at all", 5),
    ("\\boxed{-3}", -3),
]


def test_gsm8k_gold_accuracy_matches_math_verify_called_directly():
    from math_verify import parse, verify

    from megatron_grpo.rewards.registry import build_reward
    from megatron_grpo.rewards.math_accuracy import answer_extraction_config

    rows = gsm8k_rows([{"problem": f"What is {i}?", "answer": str(a)} for i, (_, a) in enumerate(GSM8K_COMPLETIONS)])
    rows[3]["answer"] = rows[3]["answer"].replace("#### 1000", "#### 1,000")  # GSM8K writes some with commas
    completions = [c for c, _ in GSM8K_COMPLETIONS]
    solutions = [r["answer"] for r in rows]
    # generous math-verify limits on both sides: this is about what is parsed (its 5 s default counts wall
    # time, which a loaded CI machine can exceed)
    ours = build_reward("accuracy", gold="gsm8k", parsing_timeout=120, verify_timeout=120)(completions,
                                                                                          solutions=solutions)
    expected = []
    for completion, solution in zip(completions, solutions):
        final = solution.split("####")[-1].strip().replace(",", "")
        gold = parse(f"${final}$", parsing_timeout=120)
        answer = parse(completion, extraction_config=answer_extraction_config(), parsing_timeout=120)
        expected.append(float(verify(gold, answer, timeout_seconds=120)))
    assert ours == expected, (ours, expected)
    assert ours[:3] == [1.0, 0.0, 1.0] and ours[6] == 0.0 and sum(ours) >= 5
    # today's default (LaTeX gold, the seed) reads no gold from a GSM8K answer: skipped, not scored
    assert build_reward("accuracy")(completions[:2], solutions=solutions[:2]) == [None, None]


def test_unknown_gold_format_is_a_config_error():
    from megatron_grpo.config import ConfigError, load_config, validate

    cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml",
                      ["rewards.functions=[{name: accuracy, params: {gold: gsm9k}}]"])
    with pytest.raises(ConfigError, match=r"rewards.functions.0: .*gold must be one of \('latex', 'gsm8k'\)"):
        validate(cfg, check_paths=False)
