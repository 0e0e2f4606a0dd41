"""Dataset loading: every local format, column mapping, row validation, splits, missing sources."""
import json
import time

import pytest

from megatron_grpo.data import DatasetLoadError, load_prompt_dataset

ROWS = [{"problem": f"What is {i} + 1?", "solution": f"\\boxed{{{i + 1}}}", "extra": i} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_pairs(ds):
    return list(zip(ds["problem"], ds["solution"]))


EXPECTED = [(r["problem"], r["solution"]) for r in ROWS]


def test_jsonl_json_parquet_csv_files_load(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    paths = [write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "d.csv"]
    paths[1].write_text(json.dumps(ROWS))  # a top-level JSON array
    frame.to_parquet(paths[2])
    frame.to_csv(paths[3], index=False)
    for path in paths:
        splits = load_prompt_dataset(str(path))
        assert as_pairs(splits.train) == EXPECTED, path
        assert splits.test is None
        assert splits.stats == {"rows_read": 10, "dropped_bad_rows": 0, "train_rows": 10, "test_rows": 0}


def test_save_to_disk_dirs_load(tmp_path):
    import datasets

    full = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": full.select(range(7)), "test": full.select(range(7, 10))}).save_to_disk(tmp_path / "dd")
    splits = load_prompt_dataset(str(tmp_path / "dd"))
    assert as_pairs(splits.train) == EXPECTED[:7] and as_pairs(splits.test) == EXPECTED[7:]
    full.save_to_disk(tmp_path / "single")
    assert as_pairs(load_prompt_dataset(str(tmp_path / "single")).train) == EXPECTED


def test_directory_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:8])
    write_jsonl(tmp_path / "test.jsonl", ROWS[8:])
    splits = load_prompt_dataset(str(tmp_path))
    assert as_pairs(splits.train) == EXPECTED[:8] and as_pairs(splits.test) == EXPECTED[8:]
    assert splits.train["extra"] == list(range(8))  # other columns are kept
    assert load_prompt_dataset(str(tmp_path), test_split=None).test is None


def test_configurable_columns(tmp_path):
    rows = [{"question": r["problem"], "answer": r["solution"], "problem": "ignored"} for r in ROWS]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    splits = load_prompt_dataset(str(path), problem_column="question", solution_column="answer")
    assert as_pairs(splits.train) == EXPECTED
    assert "question" not in splits.train.column_names


def test_test_fraction_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = load_prompt_dataset(str(path), test_fraction=0.3, seed=1)
    b = load_prompt_dataset(str(path), test_fraction=0.3, seed=1)
    c = load_prompt_dataset(str(path), test_fraction=0.3, seed=2)
    assert len(a.train) == 7 and len(a.test) == 3
    assert as_pairs(a.test) == as_pairs(b.test) and as_pairs(a.test) != as_pairs(c.test)
    assert sorted(as_pairs(a.train) + as_pairs(a.test)) == sorted(EXPECTED)
    assert load_prompt_dataset(str(path), test_fraction=0.0).test is None


@pytest.mark.parametrize("bad_row, fragment", [
    ({"problem": "What is 1 + 1?"}, "column 'solution' is missing in row 3"),
    ({"problem": "", "solution": "\\boxed{2}"}, "column 'problem' is empty in row 3"),
    ({"problem": "   ", "solution": "\\boxed{2}"}, "column 'problem' is empty in row 3"),
    ({"problem": "What?", "solution": None}, "column 'solution' is missing in row 3"),
    ({"problem": 7, "solution": "\\boxed{2}"}, "column 'problem' is not a string (int) in row 3"),
])
def test_bad_row_names_column_row_and_file(tmp_path, bad_row, fragment):
    rows = [dict(r) for r in ROWS[:3]] + [bad_row] + [dict(r) for r in ROWS[3:5]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        load_prompt_dataset(str(path))
    assert fragment in str(info.value) and str(path) in str(info.value)
    skipped = load_prompt_dataset(str(path), on_bad_row="skip")
    assert skipped.stats["dropped_bad_rows"] == 1 and len(skipped.train) == 5


def test_column_absent_from_file(tmp_path):
    path = write_jsonl(tmp_path / "nosol.jsonl", [{"problem": "x"}, {"problem": "y"}])
    with pytest.raises(ValueError, match=r"column 'solution' missing in .*nosol.jsonl \(row 0"):
        load_prompt_dataset(str(path))


def test_empty_after_filtering_reports_counts(tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"problem": "", "solution": "1"}, {"problem": "a", "solution": ""}])
    with pytest.raises(ValueError, match="empty after validation: 2 rows read, 2 bad rows skipped"):
        load_prompt_dataset(str(path), on_bad_row="skip")


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(missing)
    with pytest.raises(FileNotFoundError, match="relative/data.parquet"):
        load_prompt_dataset("relative/data.parquet")


def test_unreachable_hub_is_one_line_naming_dataset(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(DatasetLoadError) as info:
        load_prompt_dataset("AI-MO/NuminaMath-TIR")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "AI-MO/NuminaMath-TIR" in message and "\n" not in message
    assert info.value.__cause__ is None  # no chained traceback
    assert info.value.__context__ is None or info.value.__suppress_context__
