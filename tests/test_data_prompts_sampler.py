"""Prompt rendering with the seed's SYSTEM_PROMPT, the resumable DP sampler, the synthetic dataset."""
import json
import subprocess
import sys

import pytest

from megatron_grpo.data import (
    ResumablePromptSampler,
    build_messages,
    load_prompt_dataset,
    render_prompt,
    tokenize_prompts,
    write_synthetic_dataset,
)

# The seed recipe's text (Open R1 grpo.py), written out here independently of the package.
SEED_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)


def _fallback_tokenizer():
    """A WordLevel tokenizer with a ChatML-like template, used if the tiny-model factory is absent."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [SEED_SYSTEM_PROMPT, "What is 3 + 5 ? system user assistant"]
    tok.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"]))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=template)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    try:
        from megatron_grpo.models.tiny import build_tokenizer

        tok = build_tokenizer()
    except ImportError:
        tok = _fallback_tokenizer()
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# -- prompts --------------------------------------------------------------------------------------
def test_messages_and_rendering_use_exact_system_prompt(tokenizer):
    assert build_messages("What is 3 + 5?") == [
        {"role": "system", "content": SEED_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 3 + 5?"},
    ]
    text = render_prompt("What is 3 + 5?", tokenizer)
    assert SEED_SYSTEM_PROMPT in text
    assert text.index(SEED_SYSTEM_PROMPT) < text.index("What is 3 + 5?")
    assert text.rstrip().endswith("assistant")  # generation prompt opened
    no_system = render_prompt("What is 3 + 5?", tokenizer, system_prompt=None)
    assert SEED_SYSTEM_PROMPT not in no_system and "What is 3 + 5?" in no_system
    assert build_messages("q", system_prompt="") == [{"role": "user", "content": "q"}]
    custom = render_prompt("q", tokenizer, system_prompt="Be brief.")
    assert "Be brief." in custom and SEED_SYSTEM_PROMPT not in custom


def test_tokenize_prompts_and_length_filter(tokenizer):
    import datasets

    problems = [f"What is {i} + 1?" + " Explain it slowly." * i for i in range(6)]
    dataset = datasets.Dataset.from_dict({"problem": problems, "solution": ["\\boxed{1}"] * 6})
    ds, stats = tokenize_prompts(dataset, tokenizer)
    assert stats == {"prompts": 6, "dropped_too_long": 0}
    for text, ids in zip(ds["prompt_text"], ds["prompt_ids"]):
        assert SEED_SYSTEM_PROMPT in text
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in ds["prompt_ids"]]
    assert lengths == sorted(lengths) and lengths[0] < lengths[3] < lengths[5]
    kept, stats = tokenize_prompts(dataset, tokenizer, max_prompt_length=lengths[3])
    assert stats == {"prompts": 4, "dropped_too_long": 2}
    assert kept["problem"] == problems[:4] and kept["solution"] == ["\\boxed{1}"] * 4
    with pytest.raises(ValueError, match="no train prompts left: 6 rows, 6 longer than max_prompt_length=3"):
        tokenize_prompts(dataset, tokenizer, max_prompt_length=3)


# -- sampler --------------------------------------------------------------------------------------
def _draw(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resumes_exactly_mid_epoch_and_across_epochs(drop_last):
    make = lambda: ResumablePromptSampler(10, global_batch_size=4, seed=7, drop_last=drop_last)
    reference = _draw(make(), 12)  # several epochs
    for stop in (1, 2, 3, 5):  # mid-epoch and right at / past epoch boundaries
        first = make()
        head = _draw(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        assert set(state) >= {"epoch", "position", "seed"}
        resumed = make()
        resumed.load_state_dict(state)
        assert head + _draw(resumed, 12 - stop) == reference


def test_sampler_epochs_are_seeded_permutations():
    sampler = ResumablePromptSampler(10, global_batch_size=5, seed=3)
    epoch0, epoch1 = sum(_draw(sampler, 2), []), sum(_draw(sampler, 2), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = ResumablePromptSampler(10, global_batch_size=5, seed=3)
    assert sum(_draw(again, 2), []) == epoch0
    other = ResumablePromptSampler(10, global_batch_size=5, seed=4)
    assert sum(_draw(other, 2), []) != epoch0
    dropping = ResumablePromptSampler(10, global_batch_size=4, seed=3)
    assert [s.__len__() for s in _draw(dropping, 3)] == [4, 4, 4] and dropping.state_dict()["epoch"] == 1
    wrapping = ResumablePromptSampler(10, global_batch_size=4, seed=3, drop_last=False)
    third = _draw(wrapping, 3)[2]
    assert third[:2] == wrapping.epoch_order(0)[8:] and third[2:] == wrapping.epoch_order(1)[:2]


def test_dp_shards_are_disjoint_and_cover_the_global_batch():
    world = 4
    ranks = [ResumablePromptSampler(24, global_batch_size=8, seed=1, rank=r, world_size=world) for r in range(world)]
    whole = ResumablePromptSampler(24, global_batch_size=8, seed=1)
    for _ in range(7):
        shards = [s.next_batch() for s in ranks]
        assert all(len(shard) == 2 for shard in shards)
        flat = sum(shards, [])
        assert len(set(flat)) == len(flat) == 8
        assert flat == whole.next_global_batch()
    assert len({json.dumps(s.state_dict()) for s in ranks}) == 1  # rank-independent state
    # a checkpoint from world size 4 resumes at world size 2 with the same global order
    pair = [ResumablePromptSampler(24, global_batch_size=8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in pair:
        s.load_state_dict(ranks[0].state_dict())
    assert sum((s.next_batch() for s in pair), []) == whole.next_global_batch()


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumablePromptSampler(10, global_batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="drop_last=False"):
        ResumablePromptSampler(3, global_batch_size=4)
    sampler = ResumablePromptSampler(10, global_batch_size=2)
    with pytest.raises(ValueError, match="11 prompts"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "seed": 1, "num_samples": 11})


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_cli_is_seeded_and_gold_parses(tmp_path):
    from megatron_grpo.rewards import build_reward

    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "megatron_grpo.data.synthetic", "--out", str(tmp_path / name),
                        "--n-train", "40", "--n-test", "10", "--seed", "5"], check=True, capture_output=True)
    write_synthetic_dataset(tmp_path / "c", n_train=40, n_test=10, seed=6)
    read = lambda name, split: (tmp_path / name / f"{split}.jsonl").read_text()
    assert read("a", "train") == read("b", "train") and read("a", "train") != read("c", "train")
    splits = load_prompt_dataset(str(tmp_path / "a"))
    assert len(splits.train) == 40 and len(splits.test) == 10
    assert not set(splits.train["problem"]) & set(splits.test["problem"])
    for problem, solution in zip(splits.train["problem"], splits.train["solution"]):
        a, op, b = problem.removeprefix("What is ").removesuffix("?").split()
        assert solution == f"\\boxed{{{eval(f'{a} {op} {b}')}}}"
    accuracy = build_reward("accuracy")
    golds = splits.test["solution"]
    answers = [f"<think>easy</think><answer>{g}</answer>" for g in golds]
    assert accuracy(answers, solutions=golds) == [1.0] * len(golds)
