"""The bad-input and fault corpus: each case runs `megatron-grpo train --check` in-process (every input
check a real start makes, through the same ``trainer/inputs.check_inputs``; nothing started) and
asserts exit code 2, exactly one `error:` line naming the problem, no exception escaping, and every
file already on disk (a previous run's outputs, checkpoints, model, data) byte-identical afterwards.
The real `train` path of a few of them runs as subprocesses in test_trainer_bad_inputs.py."""
import hashlib
import json
import shutil
import struct

import pytest

from megatron_grpo.cli import main
from tests.e2e import CONFIG


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _previous_run(out, run_id, steps=(2, 4)):
    """An output folder as a finished run leaves it: run.json, config.yaml, metrics, verified checkpoints."""
    from megatron_grpo.trainer.checkpoint import CheckpointWriter

    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id}))
    (out / "config.yaml").write_text("trainer: {max_steps: 4}\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    w = CheckpointWriter(out / "checkpoints", keep_last=5, run_id=run_id)
    for step in steps:
        tmp = w.begin(step, is_writer=True)
        (tmp / "model").mkdir()
        (tmp / "model" / "shard.distcp").write_bytes(b"\x01" * 4096)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        w.commit(step, {"tp": 1, "pp": 1, "dp": 1})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from megatron_grpo.data.synthetic import write_synthetic_dataset
    from megatron_grpo.models.tiny import TinyModelSpec, make_tiny_model

    root = tmp_path_factory.mktemp("corpus")
    model = make_tiny_model(root / "model", TinyModelSpec(arch="qwen2"))
    data = root / "data"
    write_synthetic_dataset(data, n_train=64, n_test=8, seed=0)

    def variant(name, edit=None, weights=None):
        dst = root / name
        shutil.copytree(model, dst)
        if edit is not None:
            cfg = json.loads((dst / "config.json").read_text())
            edit(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        if weights is not None:
            weights(dst)
        return dst

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    def garbage_header(d):
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all")

    def sharded_missing(d):
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))

    m = {
        "gpt2": variant("gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"])),
        "small_vocab": variant("small_vocab", lambda c: c.update(vocab_size=300)),
        "no_weights": variant("no_weights", weights=lambda d: (d / "model.safetensors").unlink()),
        "truncated": variant("truncated", weights=truncate),
        "garbage": variant("garbage", weights=garbage_header),
        "shard_missing": variant("shard_missing", weights=sharded_missing),
    }
    m["bad_json"] = variant("bad_json")
    (m["bad_json"] / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    (root / "no_config").mkdir()
    (root / "a_file").write_text("x")
    good = {"problem": "What is 1 + 1?", "solution": "\\boxed{2}"}
    d = {
        "nocol": _jsonl(root / "nocol" / "train.jsonl", [{"question": "1+1", "solution": "\\boxed{2}"}] * 16),
        "emptyval": _jsonl(root / "emptyval" / "train.jsonl", [good] * 5 + [{"problem": "", "solution": "x"}] * 11),
        "empty": _jsonl(root / "empty" / "train.jsonl", []),
        "few": _jsonl(root / "few" / "train.jsonl", [good] * 3),
        "malformed": _jsonl(root / "malformed" / "train.jsonl", [good] * 3 + ['{"problem": "2+2", "solution": '] + [good] * 12),
        "array_line": _jsonl(root / "array_line" / "train.jsonl", [good, "[1, 2]"] + [good] * 14),
        "txt": _jsonl(root / "txt" / "train.txt", ["hello"]),
        "no_files": root / "no_files",
    }
    d["no_files"].mkdir()
    (d["no_files"] / "README.md").write_text("no data here")
    runs = {"used": _previous_run(root / "used", "run-a"),
            "damaged": _previous_run(root / "damaged", "run-b", steps=(3,)),
            "other": _previous_run(root / "other", "run-c", steps=(1,))}
    shard = runs["damaged"] / "checkpoints" / "step_00000003" / "model" / "shard.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a shard cut after the checkpoint was committed
    (root / "ckpt_bad" / "step_00000002").mkdir(parents=True)
    (root / "ckpt_bad" / "step_00000002" / "COMPLETE").write_text("{broken")
    return root, model, data, m, d, runs


def cases(root, model, data, m, d, runs):
    used_ckpt = runs["used"] / "checkpoints"
    return [
        # model folder and weights
        ("missing model dir", [f"model.path={root / 'nope'}"], "does not exist"),
        ("model dir without config.json", [f"model.path={root / 'no_config'}"], "has no config.json"),
        ("config.json not JSON", [f"model.path={m['bad_json']}"], "config.json is not valid JSON"),
        ("unsupported architecture", [f"model.path={m['gpt2']}"], "GPT2LMHeadModel"),
        ("tokenizer larger than the model vocab", [f"model.path={m['small_vocab']}"], "do not belong together"),
        ("model folder without weights", [f"model.path={m['no_weights']}"], "has no weights"),
        ("truncated safetensors", [f"model.path={m['truncated']}"], "model.safetensors: truncated"),
        ("safetensors header not JSON", [f"model.path={m['garbage']}"], "model.safetensors: header is not valid JSON"),
        ("index names a missing shard", [f"model.path={m['shard_missing']}"], "model-00001-of-00002.safetensors is listed"),
        ("context longer than the model", ["rollout.max_new_tokens=5000"], "max_position_embeddings"),
        # layout
        ("TP not dividing heads", ["parallel.tp=3"], "parallel.tp=3 does not divide"),
        ("world size not divisible", ["parallel.world_size=3", "parallel.tp=2"], "world size 3"),
        ("--nproc-per-node not divisible by TP x PP", ["--nproc-per-node=3", "parallel.tp=2"],
         "--nproc-per-node=3 is not divisible by parallel.tp x parallel.pp = 2 x 1"),
        ("rollout TP not dividing the launch", ["--nproc-per-node=3", "rollout.tp=2"], "rollout.tp=2 does not divide"),
        # sampling and algorithm settings the trainer cannot honour
        ("G = 1", ["rollout.num_generations=1"], "rollout.num_generations=1"),
        ("greedy sampling", ["rollout.temperature=0"], "rollout.temperature=0"),
        ("top_k beyond the vocabulary", ["rollout.top_k=100000"], "rollout.top_k=100000 exceeds"),
        ("negative top_k", ["rollout.top_k=-5"], "rollout.top_k=-5"),
        ("top_p = 0", ["rollout.top_p=0"], "rollout.top_p=0"),
        ("stop token id outside the vocab", ["rollout.stop_token_ids=[99999]"], "rollout.stop_token_ids: 99999"),
        ("empty stop string", ["rollout.stop=['']"], "rollout.stop contains an empty string"),
        ("IS cap below 1", ["algorithm.importance_sampling=token", "algorithm.importance_sampling_cap=0.5"],
         "algorithm.importance_sampling_cap=0.5"),
        ("dual clip <= 1", ["algorithm.dual_clip=0.5"], "algorithm.dual_clip=0.5"),
        ("async rollout without IS correction", ["rollout.async_steps=1"], "set algorithm.importance_sampling"),
        ("async rollout deeper than one step", ["rollout.async_steps=2", "algorithm.importance_sampling=token"],
         "rollout.async_steps=2 is not one of: 0, 1"),
        ("KL without a reference", ["algorithm.kl_coef=0.1", "algorithm.reference=none"], "algorithm.reference=none needs"),
        ("clip range outside (0, 1)", ["algorithm.ratio_clip_low=1.5"], "algorithm.ratio_clip_low=1.5"),
        ("unknown loss aggregation", ["algorithm.loss_agg=sum"], "algorithm.loss_agg='sum' is not one of"),
        ("non-positive kl clamp", ["algorithm.kl_clamp=0"], "algorithm.kl_clamp=0"),
        ("warmup ratio >= 1", ["optimizer.warmup_ratio=1.5"], "optimizer.warmup_ratio=1.5"),
        ("negative learning rate", ["optimizer.lr=-1"], "optimizer.lr=-1"),
        ("zero steps", ["trainer.max_steps=0"], "trainer.max_steps=0"),
        ("negative keep_last", ["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1"),
        # rewards and config syntax
        ("unknown reward", ["rewards.functions=[{name: acuracy}]"], "known rewards"),
        ("reward plugin that does not import", ["rewards.functions=[{name: 'no_such_module_xyz:fn'}]"], "no_such_module_xyz"),
        ("unknown key", ["trainer.max_stesp=3"], "trainer.max_steps"),
        ("wrong type", ["optimizer.lr=fast"], "optimizer.lr"),
        ("override without =", ["trainer.max_steps"], "not of the form key=value"),
        # data
        ("missing dataset column", [f"data.path={d['nocol']}"], "column 'problem' missing"),
        ("empty value in a row", [f"data.path={d['emptyval']}"], "record 6, counting from 1"),
        ("empty dataset", [f"data.path={d['empty']}"], "empty"),
        ("fewer prompts than a step needs", [f"data.path={d['few']}"], "usable train prompts"),
        ("every prompt too long", ["data.max_prompt_length=2"], "max_prompt_length=2"),
        ("missing data path", [f"data.path={root / 'nodata.jsonl'}"], "nodata.jsonl"),
        ("malformed JSONL line", [f"data.path={d['malformed']}"], "train.jsonl': line 4 is not valid JSON"),
        ("JSONL line that is not an object", [f"data.path={d['array_line']}"], "line 2 is a JSON list"),
        ("unsupported data file type", [f"data.path={d['txt']}"], "unsupported dataset file type '.txt'"),
        ("data folder without data files", [f"data.path={d['no_files']}"], "doesn't contain any data files"),  # a README makes it a hub repo folder (datasets' rules)
        # output folder and checkpoints
        ("output dir under a file", [f"trainer.output_dir={root / 'a_file' / 'out'}"], "not a directory"),
        ("corrupt checkpoint marker", [f"checkpoint.resume={root / 'ckpt_bad' / 'step_00000002'}"], "incomplete or corrupt"),
        ("checkpoint path that does not exist", [f"checkpoint.resume={root / 'no_ckpt'}"], "is not a directory"),
        ("explicit checkpoint with a cut shard",
         [f"checkpoint.resume={runs['damaged'] / 'checkpoints' / 'step_00000003'}"],
         "model/shard.distcp has 100 bytes, the manifest recorded 4096"),
        ("new run into a folder holding another run", [f"trainer.output_dir={runs['used']}", "checkpoint.resume=none"],
         "holds another run (2 checkpoint folder(s) and metrics.jsonl with 4 line(s))"),
        ("auto resume where no checkpoint verifies", [f"trainer.output_dir={runs['damaged']}"],
         "no checkpoint there can be resumed from (newest: step_00000003"),
        ("another run's checkpoint into a used folder",
         [f"trainer.output_dir={runs['used']}", f"checkpoint.resume={runs['other'] / 'checkpoints' / 'step_00000001'}"],
         "would mix two runs"),
        ("resume a step the run never saved", [f"trainer.output_dir={runs['used']}", "checkpoint.resume=7"],
         "checkpoint.resume=7: no checkpoint"),
    ], used_ckpt


def _checksums(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".lock" not in p.name}


N_CASES = 56  # the parametrisation below needs the count before the world exists; kept equal by test_corpus_size


def test_corpus_size(world):
    table, _ = cases(*world)
    assert len(table) == N_CASES and len({c[0] for c in table}) == len(table)


@pytest.mark.parametrize("index", range(N_CASES))
def test_bad_input(world, capsys, index):
    root, model, data = world[:3]
    table, _ = cases(*world)
    name, overrides, expected = table[index]
    base = [f"model.path={model}", "model.init=hf", f"data.path={data}", "data.synthetic=false",
            f"trainer.output_dir={root / 'out'}"]
    before = _checksums(root)
    flags = [o for o in overrides if o.startswith("--")]
    rc = main(["train", "--check", *flags, "--config", str(CONFIG), *base, *[o for o in overrides if o not in flags]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and expected in errors[0], (name, rc, err[-2000:])
    assert "Traceback" not in err
    assert _checksums(root) == before, name  # nothing already on disk changed
    assert not (root / "out").exists()  # and nothing new was started


def test_check_passes_good_inputs_and_writes_nothing(world, capsys):
    """The controls: the same setup without the fault passes every check (so each case above fails
    for its own reason), resuming the used folder's newest verified checkpoint."""
    root, model, data, _, _, runs = world
    base = [f"model.path={model}", "model.init=hf", f"data.path={data}", "data.synthetic=false"]
    before = _checksums(root)
    assert main(["train", "--check", "--config", str(CONFIG), *base, f"trainer.output_dir={root / 'fresh'}"]) == 0
    assert "inputs ok: 64 train prompts" in capsys.readouterr().out
    assert main(["train", "--check", "--config", str(CONFIG), *base, f"trainer.output_dir={runs['used']}"]) == 0
    assert f"resume {runs['used'] / 'checkpoints' / 'step_00000004'}" in capsys.readouterr().out
    assert main(["train", "--check", "--config", str(CONFIG), *base, f"trainer.output_dir={runs['used']}",
                 "checkpoint.resume=none", "trainer.overwrite=true"]) == 0
    assert "new run" in capsys.readouterr().out
    assert _checksums(root) == before and not (root / "fresh").exists()
