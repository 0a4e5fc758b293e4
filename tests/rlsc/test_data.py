"""The one loader: every shared eval set, builtin sets, JSONL errors."""
from __future__ import annotations

import json

import pytest

from rlsc.data import BUILTINS, last_boxed, load_problems, normalise_row

from conftest import SHARED_DATA

# rows per file as documented in ../shared/data/README.md, and the first row's gold answer
SHARED_SETS = {
    "aime24.jsonl": (30, "204"),
    "amc23.jsonl": (40, "27"),
    "math500.jsonl": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "minerva_math.jsonl": (272, "1.6"),
    "olympiadbench.jsonl": (675, "2"),
    "gsm8k.jsonl": (1319, "18"),
    "svamp.jsonl": (1000, "145"),
    "mawps.jsonl": (2065, "43"),
}


@pytest.mark.parametrize("name", sorted(SHARED_SETS))
def test_every_shared_eval_set_loads_with_a_question_and_gold_answer_per_row(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (shared/ is expected beside the clone)")
    rows, first_answer = SHARED_SETS[name]
    problems = load_problems(str(path))
    assert len(problems) == rows
    assert all(p.question.strip() for p in problems)
    assert all(p.answer.strip() for p in problems), [p.id for p in problems if not p.answer.strip()][:5]
    assert problems[0].answer == first_answer
    assert len({p.id for p in problems}) == rows


def test_svamp_question_joins_body_and_question():
    p = normalise_row({"Body": "There are 3 apples.", "Question": "How many?", "Answer": 3.0}, 0, "svamp")
    assert p.question == "There are 3 apples. How many?" and p.answer == "3"


def test_gsm8k_answer_is_the_text_after_the_hashes():
    p = normalise_row({"question": "q", "answer": "work <<1+1=2>>\n#### 1,234"}, 0, "gsm8k")
    assert p.answer == "1234"


def test_minerva_answer_is_the_last_boxed_of_the_solution():
    p = normalise_row({"problem": "q", "solution": "so \\boxed{1} then \\boxed{\\frac{a}{b}}."}, 0, "m")
    assert p.answer == "\\frac{a}{b}"


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


def test_bad_jsonl_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_problems(str(path))


def test_row_without_question_is_a_clear_error(tmp_path):
    path = tmp_path / "noq.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"noq\.jsonl: row 1 has no question field"):
        load_problems(str(path))


def test_missing_file_and_unknown_builtin_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown builtin task set 'nope'"):
        load_problems("builtin:nope")


def test_builtin_demo_train_and_test_splits_are_disjoint_and_deterministic():
    train, test = load_problems("builtin:demo", "train"), load_problems("builtin:demo", "test")
    assert len(test) == 24 and len(train) == 29 * 10 - 24
    assert not {p.question for p in train} & {p.question for p in test}
    assert [p.id for p in test] == [p.id for p in load_problems("builtin:demo", "test")]
    for p in test:
        a, b = (int(x) for x in p.question[len("What is "):-1].split(" * "))
        assert int(p.answer) == a * b


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_set_has_right_answers_and_disjoint_splits(name):
    import operator

    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
    every = load_problems(f"builtin:{name}", "all")
    for p in every:
        a, op, b = p.question[len("What is "):-1].split(" ")
        assert float(p.answer) == ops[op](int(a), int(b)) and p.answer == str(int(p.answer)), p
    train, test = (load_problems(f"builtin:{name}", split) for split in ("train", "test"))
    assert len(test) == BUILTINS[name][1] and not {p.question for p in train} & {p.question for p in test}
    assert sorted(p.question for p in train + test) == sorted(p.question for p in every)


def test_limit_takes_the_first_rows(tiny_prompts):
    assert [p.answer for p in load_problems(str(tiny_prompts), limit=2)] == ["0", "2"]


def test_hugging_face_dataset_source_goes_through_the_same_normalisation(monkeypatch):
    import sys
    import types

    calls = {}

    def load_dataset(name, config, split):
        calls.update(name=name, config=config, split=split)
        return [{"question": "Q?", "answer": "work\n#### 42"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_problems("openai/gsm8k:main", split="test")
    assert calls == {"name": "openai/gsm8k", "config": "main", "split": "test"}
    assert problems[0].answer == "42" and problems[0].source == "openai/gsm8k:main"


def test_hugging_face_source_without_datasets_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_problems("some-org/some-set")
