"""Grading through math-verify (\\boxed{} first) and the pass@k / maj@k arithmetic."""
from __future__ import annotations

import itertools
import math

import pytest

from rlsc.evaluate import summarise
from rlsc.grading import answer_key, extract_answer, is_correct, majority_correct, pass_at_k


@pytest.mark.parametrize("completion, gold, ok", [
    ("17 * 7 = 119", "119", True),
    ("17 * 7 = 124\n\nThe answer is 124.", "119", False),
    ("I think \\boxed{119}, not 120", "119", True),          # boxed answer wins over a later number
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("The answer is \\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{4.5\\times 10^{33}}", "4.5e33", True),
    ("", "3", False),
    ("no number here", "3", False),
    ("\\boxed{7}", "", False),
])
def test_is_correct_grades_with_math_verify(completion, gold, ok):
    assert is_correct(completion, gold) is ok


@pytest.mark.parametrize("completion, finished, gold, answered, ok", [
    ("First, 3 * 4 = 12. Then we need to add the remaining", False, "12", False, False),  # cut off: no answer
    ("First, 3 * 4 = 12. Then we need to add the remaining", True, "12", True, True),     # finished: last number
    ("3 * 4 = 12, so the answer is \\boxed{12}", False, "12", True, True),                # a boxed answer counts
    ("\\boxed{5} is wrong; it is \\boxed{1", True, "5", False, False),                    # unbalanced last box
    ("\\boxed{5} is wrong; it is \\boxed{1", True, "1", False, False),
    ("12 \\boxed{1", False, "12", False, False),
])
def test_what_counts_as_an_answer(completion, finished, gold, answered, ok):
    """rlsc/grading.py's rules: a cut-off completion answers only with a balanced box; an unbalanced
    last box is no answer; a finished one without a box answers with its last number."""
    assert bool(extract_answer(completion, finished)) is answered
    assert is_correct(completion, gold, finished) is ok


def test_pass_at_k_matches_brute_force_over_all_k_subsets():
    n = 7
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def test_majority_vote_ignores_unparsed_and_breaks_ties_by_first_seen():
    assert majority_correct(["5", "6", "6", None, None, None], [False, True, True, False, False, False])
    assert not majority_correct(["5", "6"], [False, True])            # tie: first seen ("5") wins
    assert not majority_correct([None, None], [False, False])


def test_equivalent_answers_vote_together():
    keys = [answer_key(extract_answer(t)) for t in ("= 119", "\\boxed{119}", "it is 119.")]
    assert len(set(keys)) == 1


def test_summarise_reports_greedy_pass_and_maj():
    records = [
        {"greedy_correct": True, "correct": [True, False, False, False], "keys": ["1", "2", "2", "3"]},
        {"greedy_correct": False, "correct": [False, True, True, True], "keys": ["9", "4", "4", "4"]},
    ]
    s = summarise(records, 4)
    assert s["greedy_accuracy"] == 0.5
    assert s["pass@1"] == pytest.approx((0.25 + 0.75) / 2)
    assert s["pass@4"] == 1.0
    assert s["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert s["maj@4"] == 0.5


def test_numerically_equal_answers_are_one_vote():
    from rlsc.grading import answer_keys

    texts = ["\\boxed{12}", "\\boxed{12.0}", "\\boxed{13}", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/2}",
             "no answer here at all", "\\boxed{13}"]
    keys = answer_keys([extract_answer(t) for t in texts])
    assert keys[0] == keys[1] and keys[3] == keys[4] == keys[5] and keys[2] == keys[7]
    assert len({k for k in keys if k is not None}) == 3
    correct = [t.endswith("{12}") or t.endswith("{12.0}") for t in texts]
    assert not majority_correct(keys, correct)               # 1/2 has three votes
    keys2 = answer_keys([extract_answer(t) for t in ("\\boxed{12}", "\\boxed{12.0}", "\\boxed{13}")])
    assert majority_correct(keys2, [True, True, False])      # two equal answers outvote one
    keys3 = answer_keys([extract_answer(t) for t in ("\\boxed{13}", "\\boxed{12}", "\\boxed{12.0}")])
    assert majority_correct(keys3, [False, True, True])      # as strings, 13 would have won the tie
