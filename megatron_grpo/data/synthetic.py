"""Small synthetic math datasets for the CPU demo and tests (``task``):

* ``arithmetic``: ``What is 3 + 5?`` -> solution ``\\boxed{8}`` (the gold form math-verify parses);
  300 distinct problems (a, b in 0..9; +, -, *). The tests' task.
* ``largest``: ``Largest of 3 8 1 5 9?`` -> ``\\boxed{9}``; five distinct digits, 30240 distinct
  problems. The demo's task: a model that only copies one of the prompt's numbers is right 1 time in
  5, and GRPO can discover the rule that picks the right one within minutes.

Problems and answers are a handful of tokens so a tiny model can learn them in minutes. The distinct
problems are shuffled with the seed; the test problems are the first n_test and never appear in
train; train draws from the rest, repeating them when n_train is larger.

    python -m megatron_grpo.data.synthetic --out DIR --n-train N --n-test M --seed S [--task largest]

writes DIR/train.jsonl and DIR/test.jsonl with columns problem, solution, answer.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TASKS = ("arithmetic", "largest")
LARGEST_OF = 5  # digits per ``largest`` problem


def all_problems(task: str = "arithmetic") -> list[dict[str, str]]:
    """Every distinct problem of ``task``, in a fixed order."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rows = []
    if task == "largest":
        for digits in itertools.permutations(range(10), LARGEST_OF):
            m = max(digits)
            rows.append({"problem": "Largest of " + " ".join(map(str, digits)) + "?",
                         "solution": f"\\boxed{{{m}}}", "answer": str(m)})
        return rows
    for op, fn in OPERATIONS.items():
        for a in range(10):
            for b in range(10):
                answer = fn(a, b)
                rows.append({"problem": f"What is {a} {op} {b}?", "solution": f"\\boxed{{{answer}}}", "answer": str(answer)})
    return rows


def prompt_numbers(problem: str) -> list[str]:
    """The numbers a problem states, in order ('What is 3 - 5?' -> ['3', '5'])."""
    return re.findall(r"\d+", problem)


def make_synthetic_splits(*, n_train: int, n_test: int, seed: int,
                          task: str = "arithmetic") -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), deterministic in seed; test problems are disjoint from train."""
    problems = all_problems(task)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if n_test > len(problems) // 2:
        raise ValueError(f"n_test must be <= {len(problems) // 2} (there are {len(problems)} distinct problems)")
    rng = random.Random(f"megatron_grpo.synthetic:{seed}")
    rng.shuffle(problems)
    test, pool = problems[:n_test], problems[n_test:]
    train = []
    while len(train) < n_train:  # whole shuffled passes over the pool, so coverage is even
        chunk = pool[:]
        rng.shuffle(chunk)
        train.extend(chunk[: n_train - len(train)])
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_synthetic_dataset(out_dir: str | Path, *, n_train: int, n_test: int, seed: int,
                            task: str = "arithmetic") -> dict[str, Path]:
    """Write train.jsonl and test.jsonl under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_synthetic_splits(n_train=n_train, n_test=n_test, seed=seed, task=task)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["test"], test)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", choices=TASKS, default="arithmetic")
    args = parser.parse_args(argv)
    try:
        paths = write_synthetic_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                                        task=args.task)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.n_train} train rows to {paths['train']} and {args.n_test} test rows to {paths['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
