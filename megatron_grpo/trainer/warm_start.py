"""Warm start for the CPU demo: a few supervised steps on formatted examples before GRPO.

A randomly initialised tiny model never writes ``<think>...</think><answer>...</answer>``, so every
reward is 0 and GRPO has no signal (all advantages are 0). The demo therefore runs a deliberately
short supervised fine-tune (SFT) on synthetic worked examples — enough steps to make the format and
some answers appear in samples, few enough that the policy is still poor — and GRPO takes it from
there. This is the same "cold start" the DeepSeek-R1 recipe uses before RL, at toy scale.
It uses plain transformers on CPU (no Megatron): it is a data-prep step, not part of GRPO.
"""
from __future__ import annotations

import random
from pathlib import Path


def worked_solution(problem: str, answer: str) -> str:
    """The completion the SFT teaches, e.g. '<think>3 + 5 = 8</think><answer>\\boxed{8}</answer>'
    ('<think>9</think><answer>\\boxed{9}</answer>' for 'Largest of ...?')."""
    if problem.startswith("What is "):
        expression = problem.removeprefix("What is ").removesuffix("?")
        return f"<think>{expression} = {answer}</think><answer>\\boxed{{{answer}}}</answer>"
    return f"<think>{answer}</think><answer>\\boxed{{{answer}}}</answer>"


def sft_warm_start(model_dir: str | Path, out_dir: str | Path, rows: list[dict], *, steps: int, lr: float = 1e-3,
                   batch_size: int = 32, seed: int = 0, system_prompt: str | None = None,
                   answer: str = "gold") -> Path:
    """Fine-tune the HF model in model_dir on rows ({problem, answer}) for `steps` steps; save to out_dir.

    Loss on completion tokens only (prompt masked), as SFT on chat data does. Deterministic for a seed.
    ``answer="prompt_number"`` replaces each example's answer by one of the prompt's own numbers, drawn
    afresh each time the example is used: the model learns the format and to answer with a number it
    was given, not which one is right, so the correctness GRPO adds afterwards is GRPO's own.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_grpo.data.prompts import render_prompt
    from megatron_grpo.data.synthetic import prompt_numbers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tok.eos_token

    def encode(row):
        prompt = render_prompt(row["problem"], tok, system_prompt=system_prompt)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(worked_solution(row["problem"], row["answer"]) + eos, add_special_tokens=False)["input_ids"]
        return p_ids + c_ids, [-100] * len(p_ids) + c_ids

    cache: dict[tuple[str, str], tuple[list, list]] = {}

    def draw(i):
        if answer == "gold":
            return encoded[i]
        row = {**rows[i], "answer": rng.choice(prompt_numbers(rows[i]["problem"]))}
        key = (row["problem"], row["answer"])
        if key not in cache:  # rows repeat: tokenize each (problem, answer) once
            cache[key] = encode(row)
        return cache[key]

    encoded = [encode(r) for r in rows] if answer == "gold" else []
    pad = tok.pad_token_id
    for _ in range(steps):
        batch = [draw(rng.randrange(len(rows))) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in ("generation_config.json", "tiny_model_spec.json"):
        src = Path(model_dir) / extra
        if src.is_file():
            (out / extra).write_bytes(src.read_bytes())
    return out
