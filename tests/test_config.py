"""Config loading, composition and validation: every bad input is one line naming the problem."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grpo.config import ConfigError, load_config, save_config, validate
from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", TinyModelSpec(arch="qwen2"))


@pytest.fixture
def base_args(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n')
    return [f"model.path={tiny_model}", f"data.path={data}", f"trainer.output_dir={tmp_path / 'out'}"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_composition_order_and_overrides(tmp_path, base_args):
    _write(tmp_path / "base.yaml", "trainer:\n  max_steps: 5\n  seed: 1\nrollout:\n  num_generations: 4\n")
    _write(tmp_path / "mid.yaml", "defaults: [base.yaml]\ntrainer:\n  seed: 2\n")
    top = _write(tmp_path / "top.yaml", "defaults: [mid.yaml]\nrollout:\n  temperature: 0.7\n")
    cfg = load_config(top, base_args + ["trainer.seed=3"])
    assert cfg.trainer.max_steps == 5  # from base
    assert cfg.rollout.num_generations == 4  # from base, untouched by later layers
    assert cfg.rollout.temperature == 0.7  # from top
    assert cfg.trainer.seed == 3  # command line wins over mid (2) and base (1)
    validate(cfg)
    saved = save_config(cfg, tmp_path / "run")
    again = load_config(saved)
    assert again == cfg  # the saved resolved config reproduces the run


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["foo.bar=1"], "unknown config section 'foo'"),
        (["trainer.max_stesp=1"], "did you mean 'trainer.max_steps'"),
        (["trainer.max_steps=abc"], "'trainer.max_steps'"),
        (["optimizer.lr=fast"], "'optimizer.lr'"),
        (["rollout.num_generations=1"], "rollout.num_generations=1"),
        (["parallel.tp=3"], "parallel.tp=3 does not divide the model's 4 attention heads"),
        (["parallel.tp=4"], "parallel.tp=4 does not divide the model's 2 KV heads"),
        (["parallel.pp=3"], "parallel.pp=3 does not divide the model's 2 layers"),
        (["parallel.world_size=3", "parallel.tp=2"], "world size 3 is not divisible"),
        (["algorithm.loss_agg=mean"], "algorithm.loss_agg='mean' is not one of"),
        (["algorithm.reference=none"], "algorithm.reference=none needs algorithm.kl_coef=0"),
        (["algorithm.dual_clip=0.5"], "algorithm.dual_clip=0.5 must be > 1"),
        (["algorithm.logprob_micro_batch_size=0"], "algorithm.logprob_micro_batch_size=0 must be > 0"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0 must be > 0"),
        (["data.max_prompt_length=-1"], "data.max_prompt_length=-1 must be > 0"),
        (["optimizer.warmup_ratio=1.5"], "optimizer.warmup_ratio=1.5"),
        (["model.path=/nonexistent/model"], "model.path: /nonexistent/model does not exist"),
        (["data.path=/nonexistent/data.jsonl"], "data.path: /nonexistent/data.jsonl does not exist"),
        (["trainer.max_steps"], "not of the form key=value"),
    ],
)
def test_bad_input_is_one_line(base_args, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, base_args + overrides))
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


def test_missing_required_key_and_bad_files(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="config key 'data.path' is required"):
        load_config(None, [f"model.path={tiny_model}"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = _write(tmp_path / "bad.yaml", "trainer: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    a = _write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    _write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)
    unknown = _write(tmp_path / "u.yaml", "rollout:\n  num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"u.yaml: unknown config key 'rollout.num_generation'; did you mean 'rollout.num_generations'"):
        load_config(unknown)


def test_unsupported_architecture_and_corrupt_config(tmp_path, base_args):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        validate(load_config(None, base_args + [f"model.path={model}"]))
    (model / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        validate(load_config(None, base_args + [f"model.path={model}"]))


def test_unwritable_output_dir(tmp_path, base_args):
    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        blocker = _write(tmp_path / "file", "x")
        target = blocker / "out"
        expected = "exists and is not a directory"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target, expected = ro / "out", "is not writable"
    with pytest.raises(ConfigError, match=expected):
        validate(load_config(None, base_args + [f"trainer.output_dir={target}"]))


def test_cli_print_config_and_unknown_key(base_args):
    cli = [sys.executable, "-m", "megatron_grpo.cli", "train", "--config", str(REPO / "configs" / "base.yaml")]
    bad = subprocess.run(cli + ["--print-config", "foo.bar=1"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0
    lines = [l for l in bad.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "foo" in lines[0], bad.stderr
    good = subprocess.run(cli + ["--print-config", *base_args, "trainer.max_steps=7"], capture_output=True,
                          text=True, cwd=REPO)
    assert good.returncode == 0, good.stderr
    assert "max_steps: 7" in good.stdout


def test_unknown_reward_lists_known_ones(base_args):
    cfg = load_config(None, base_args + ["rewards.functions=[{name: acuracy}]"])
    with pytest.raises(ConfigError, match=r"rewards.functions.0: unknown reward 'acuracy'; known rewards: .*accuracy"):
        validate(cfg)
    cfg = load_config(None, base_args + ["rewards.functions=[{name: 'no_such_pkg.mod:fn'}]"])
    with pytest.raises(ConfigError, match="rewards.functions.0: .*no_such_pkg.mod:fn"):
        validate(cfg)
