"""Prompt sources and the seeded prompt stream."""

from __future__ import annotations

import json

import pytest

from rlctl.data import PromptStream, arithmetic, hf, jsonl, load_prompts
from rlctl.errors import DataError


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arithmetic_answers_and_disjoint_eval():
    train, evals = arithmetic(num_train=300, num_eval=50, max_operand=20, ops=["+", "-", "*"], seed=3)
    assert len(train) == 300 and len(evals) == 50
    assert not {p.text for p in train} & {p.text for p in evals}
    for p in train[:50]:
        a, op, b = p.text[:-1].replace("+", " + ").replace("-", " - ").replace("*", " * ").split()
        assert p.answer == str(eval(f"{a}{op}{b}")) == p.solution
    assert arithmetic(num_train=10, num_eval=0, seed=3)[0] == arithmetic(num_train=10, num_eval=0, seed=3)[0]


def test_arithmetic_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="only 4 distinct problems"):
        arithmetic(num_train=5, num_eval=0, max_operand=1)
    with pytest.raises(ValueError, match="ops = \\['/'\\]"):
        arithmetic(ops=["/"])


def test_jsonl_rows_keep_extra_keys(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"question": "q1", "answer": 3, "tests": "assert 1"},
                                             {"question": "q2", "answer": "4"}])
    train, evals = jsonl(str(path), prompt_key="question")
    assert [p.text for p in train] == ["q1", "q2"] and evals == []
    assert train[0].answer == "3" and train[0].info == {"tests": "assert 1"}


def test_jsonl_bad_rows_are_reported_with_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": 1}\n\n{"answer": 2}\n{"prompt": "  "}\n')
    with pytest.raises(DataError) as info:
        jsonl(str(path))
    msg = str(info.value)
    assert "2 bad row(s)" in msg
    assert "row 3: prompt key 'prompt' is missing (keys: answer)" in msg
    assert "row 4: prompt key 'prompt' is empty" in msg
    path.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        jsonl(str(path))


def test_eval_split_is_held_out(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(20)])
    train, evals = jsonl(str(path), eval_size=5, seed=1)
    assert len(train) == 15 and len(evals) == 5
    assert not {p.text for p in train} & {p.text for p in evals}
    with pytest.raises(DataError, match="eval_size = 20: only 20 rows"):
        jsonl(str(path), eval_size=20)


def test_hf_datasets_from_local_files(tmp_path):
    write_rows(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(6)])
    write_rows(tmp_path / "test.jsonl", [{"question": "t0", "answer": "0"}])
    train, evals = hf("json", data_files=str(tmp_path / "train.jsonl"), prompt_key="question")
    assert [p.text for p in train] == [f"q{i}" for i in range(6)] and evals == []
    with pytest.raises(DataError, match="split = 'validation': dataset has splits train"):
        hf("json", data_files=str(tmp_path / "train.jsonl"), split="validation", prompt_key="question")


def test_load_prompts_wraps_value_errors():
    with pytest.raises(DataError, match=r"^\[data\] num_train \+ num_eval"):
        load_prompts({"source": "arithmetic", "num_train": 10, "max_operand": 1})


def test_prompt_stream_is_seeded_covers_epochs_and_resumes():
    train, _ = arithmetic(num_train=10, num_eval=0, seed=0)
    a, b = PromptStream(train, seed=5), PromptStream(train, seed=5)
    first = a.next_batch(4) + a.next_batch(6)
    assert sorted(p.text for p in first) == sorted(p.text for p in train)  # one epoch = every prompt once
    assert [p.text for p in first] == [p.text for p in b.next_batch(10)]
    state = a.state_dict()
    resumed = PromptStream(train, seed=5)
    resumed.load_state_dict(state)
    assert [p.text for p in resumed.next_batch(7)] == [p.text for p in a.next_batch(7)]
    assert [p.text for p in PromptStream(train, seed=6).next_batch(10)] != [p.text for p in first]
