"""Bad input to `megatron-grpo train`: non-zero exit, exactly one `error:` line naming the problem,
no traceback, nothing started, nothing already written lost."""
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e import REPO, cli_in_one_process, env, error_lines, train_cmd

pytestmark = pytest.mark.vllm  # the train CLI starts vLLM


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_grpo.data.synthetic import write_synthetic_dataset
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    root = tmp_path_factory.mktemp("bad")
    model = make_tiny_model(root / "model", TinyModelSpec(arch="qwen2"))
    data = root / "data"
    write_synthetic_dataset(data, n_train=64, n_test=8, seed=0)
    return root, model, data


def _variant(root, name, edit):
    """A copy of the tiny model folder with config.json edited."""
    dst = root / name
    if not dst.exists():
        shutil.copytree(root / "model", dst)
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cases(root, model, data):
    out = root / "out"
    gpt2 = _variant(root, "gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    small_vocab = _variant(root, "small_vocab", lambda c: c.update(vocab_size=300))
    no_cfg = root / "no_config"
    no_cfg.mkdir(exist_ok=True)
    blocker = root / "a_file"
    blocker.write_text("x")
    corrupt = root / "ckpt" / "step_00000002"
    corrupt.mkdir(parents=True, exist_ok=True)
    (corrupt / "COMPLETE").write_text("{broken")
    no_column = _jsonl(root / "nocol" / "train.jsonl", [{"question": "1+1", "solution": "\\boxed{2}"}] * 16)
    empty_value = _jsonl(root / "emptyval" / "train.jsonl",
                         [{"problem": "What is 1 + 1?", "solution": "\\boxed{2}"}] * 5
                         + [{"problem": "", "solution": "\\boxed{2}"}] * 11)
    empty = _jsonl(root / "empty" / "train.jsonl", [])
    few = _jsonl(root / "few" / "train.jsonl", [{"problem": "What is 1 + 1?", "solution": "\\boxed{2}"}] * 3)
    truncated = root / "truncated"
    if not truncated.exists():
        shutil.copytree(model, truncated)
        weights = truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4096])
    malformed = _jsonl(root / "malformed" / "train.jsonl", [{"problem": "What is 1 + 1?", "solution": "\\boxed{2}"}] * 16)
    lines = malformed.read_text().splitlines()
    malformed.write_text("\n".join(lines[:2] + ['{"problem": "2 + 2", '] + lines[3:]) + "\n")  # line 3 cut
    base = [f"model.path={model}", "model.init=hf", f"data.path={data}", "data.synthetic=false",
            f"trainer.output_dir={out}"]
    return [
        ("missing model dir", [f"model.path={root / 'nope'}"], "does not exist"),
        ("model dir without config.json", [f"model.path={no_cfg}"], "has no config.json"),
        ("unsupported architecture", [f"model.path={gpt2}"], "GPT2LMHeadModel"),
        ("tokenizer larger than the model vocab", [f"model.path={small_vocab}"], "tokenizer and model do not belong together"),
        ("G = 1", ["rollout.num_generations=1"], "rollout.num_generations=1"),
        ("TP not dividing heads", ["parallel.tp=3"], "parallel.tp=3 does not divide"),
        ("world size not divisible", ["parallel.world_size=3", "parallel.tp=2"], "world size 3"),
        ("missing dataset column", [f"data.path={no_column}"], "column 'problem' missing"),
        ("empty value in a row", [f"data.path={empty_value}"], "row 5"),
        ("empty dataset", [f"data.path={empty}"], "empty"),
        ("fewer prompts than a step needs", [f"data.path={few}"], "usable train prompts"),
        ("every prompt too long", ["data.max_prompt_length=2"], "max_prompt_length=2"),
        ("missing data path", [f"data.path={root / 'nodata.jsonl'}"], "nodata.jsonl"),
        ("unwritable output dir", [f"trainer.output_dir={blocker / 'out'}"], "not a directory"),
        ("corrupt checkpoint", [f"checkpoint.resume={corrupt}"], "incomplete or corrupt"),
        ("unknown reward", ["rewards.functions=[{name: acuracy}]"], "known rewards"),
        ("unknown key", ["trainer.max_stesp=3"], "trainer.max_steps"),
        ("wrong type", ["optimizer.lr=fast"], "optimizer.lr"),
        ("context longer than the model", ["rollout.max_new_tokens=5000"], "max_position_embeddings"),
        ("truncated safetensors", [f"model.path={truncated}"], "truncated/model.safetensors: truncated"),
        ("malformed JSONL line", [f"data.path={malformed}"], "line 3 is not valid JSON"),
        ("--nproc-per-node not divisible by TP", ["--nproc-per-node=3", "parallel.tp=2"], "--nproc-per-node=3"),
        ("new run into a folder holding another run", ["checkpoint.resume=none"], "holds another run"),
    ], base, out


# Cases whose point is the command line itself (argument and override parsing, the launcher option) and
# one that passes the config checks (the run-folder check), each as its own `python -m megatron_grpo.cli`
# process; the other cases go through the same CLI entry (`megatron_grpo.cli.main`) one after the other in
# one fresh process, so the ~11 CPU-s of imports the input checks need are paid once, not per case.
OWN_PROCESS = {"--nproc-per-node not divisible by TP", "unknown key", "wrong type", "G = 1",
               "new run into a folder holding another run"}


def test_each_bad_input_is_one_line_and_nothing_is_lost(assets):
    root, model, data = assets
    table, base, out = cases(root, model, data)
    assert len(table) >= 15
    assert OWN_PROCESS <= {name for name, _, _ in table}
    out.mkdir(exist_ok=True)
    keep = out / "metrics.jsonl"
    keep.write_text('{"step": 1}\n')  # a previous run's files must survive every failed start
    (out / "config.yaml").write_text("previous: run\n")

    def command(overrides):
        flags = [o for o in overrides if o.startswith("--")]  # options before the positional overrides
        cmd = train_cmd(*base, *[o for o in overrides if o not in flags])
        return cmd[:4] + flags + cmd[4:]

    def own_process(case):
        return subprocess.run(command(case[1]), capture_output=True, text=True, cwd=REPO, env=env(), timeout=600)

    def check(case, proc):
        name, _, expected = case
        errors = error_lines(proc.stderr)
        if (proc.returncode == 0 or len(errors) != 1 or expected not in errors[0]
                or "Traceback" in proc.stderr or "[megatron-grpo] layout" in proc.stdout):
            return f"{name}: exit {proc.returncode}, errors {errors}, stderr tail {proc.stderr[-800:]!r}"
        return None

    alone = [c for c in table if c[0] in OWN_PROCESS]
    together = [c for c in table if c[0] not in OWN_PROCESS]
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent processes; two cores
        batch = pool.submit(cli_in_one_process, [command(c[1])[3:] for c in together], root / "results.json")
        procs = list(pool.map(own_process, alone))
        procs = procs + batch.result()
    failures = [f for f in map(check, alone + together, procs) if f]
    assert not failures, "\n".join(failures)
    assert keep.read_text() == '{"step": 1}\n' and (out / "config.yaml").read_text() == "previous: run\n"
    assert not (out / "checkpoints").exists()
