"""A small synthetic math dataset for the CPU demo and tests: single-digit arithmetic.

``What is 3 + 5?`` -> solution ``\\boxed{8}`` (the gold form math-verify parses). Problems and answers
are a handful of tokens so a tiny random model can learn the task in minutes. The 300 distinct
problems (a, b in 0..9; +, -, *) are shuffled with the seed; the test problems are the first n_test
and never appear in train; train draws from the rest, repeating them when n_train is larger.

    python -m megatron_grpo.data.synthetic --out DIR --n-train N --n-test M --seed S

writes DIR/train.jsonl and DIR/test.jsonl with columns problem, solution, answer.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def all_problems() -> list[dict[str, str]]:
    """Every distinct single-digit problem, in a fixed order."""
    rows = []
    for op, fn in OPERATIONS.items():
        for a in range(10):
            for b in range(10):
                answer = fn(a, b)
                rows.append({"problem": f"What is {a} {op} {b}?", "solution": f"\\boxed{{{answer}}}", "answer": str(answer)})
    return rows


def make_synthetic_splits(*, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), deterministic in seed; test problems are disjoint from train."""
    problems = all_problems()
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


def write_synthetic_dataset(out_dir: str | Path, *, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Write train.jsonl and test.jsonl under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_synthetic_splits(n_train=n_train, n_test=n_test, seed=seed)
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
    args = parser.parse_args(argv)
    try:
        paths = write_synthetic_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.n_train} train rows to {paths['train']} and {args.n_test} test rows to {paths['test']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
