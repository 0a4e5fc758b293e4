"""Answer grading with math-verify (a maintained verifier), \\boxed{} answers first, and the
pass@k / maj@k arithmetic.

What counts as the answer of a completion (one rule for every source; extract_answer):
  1. the content of its last \\boxed{...} (or \\fbox{...}) when that one is balanced, parsed by
     math-verify (whether or not the completion finished);
  2. none when its last \\boxed{ is never closed: the answer being written was cut off;
  3. otherwise, for a finished completion (it emitted EOS before the token cap), math-verify's
     parse of the whole text (its own extraction: the last number or expression);
  4. otherwise none: a completion cut off at the cap without a boxed answer has not answered, even
     if it mentions numbers ("First, 3 * 4 = 12. Then we need to add the remaining" is wrong).
A completion without an answer is wrong and does not vote in maj@k.
Per source, that means: sources posed with the \\boxed instruction (every JSONL and Hugging Face
source by default, BOXED_INSTRUCTION) are graded on the boxed answer, falling back to the last
number of a finished completion that boxed nothing; the builtin task sets are posed plainly
("What is 7 * 8?"), so a finished completion's last number is its answer and a cut-off one has none.
RLSC changes completion lengths, so before/after comparisons would be biased if cut-off text were
graded as an answer.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

from .data import last_boxed


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    if not gold:
        return []
    sci = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)\s*", gold)
    if sci:  # 4.5e33: math-verify would read the 'e' as Euler's number
        gold = f"{sci.group(1)} \\times 10^{{{int(sci.group(2))}}}"
    # as LaTeX first (tuples, fractions, expressions), as plain text second
    return parse(f"${gold}$") or parse(gold)


def extract_answer(completion: str, finished: bool = True):
    """math-verify's parse of the completion's answer, or [] for none (rules in the module
    docstring). finished: the completion ended with EOS before the token cap."""
    from math_verify import parse

    boxed = last_boxed(completion)
    if boxed is not None:
        return parse(f"\\boxed{{{boxed}}}") or []
    if "\\boxed" in completion or "\\fbox" in completion:   # the last box is never closed: cut off mid-answer
        return []
    return parse(completion) if finished else []


def answer_key(parsed) -> str | None:
    """A hashable key for majority voting: the parsed answer's string form (None when nothing parsed)."""
    if not parsed:
        return None
    return str(parsed[-1]) if len(parsed) > 1 else str(parsed[0])


def _same_answer(a, b) -> bool:
    from math_verify import verify

    try:
        return bool(verify(a, b))
    except Exception:  # noqa: BLE001 - a verifier failure on odd input: not the same answer, never a crash
        return False


def answer_keys(parsed_answers: list) -> list[str | None]:
    """Majority-vote keys for one question's parsed answers: answers that math-verify finds equal
    ("12" and "12.0", "\\frac{1}{2}" and "0.5") share the key of the first of them; None when
    nothing parsed. Each answer is compared with one representative per distinct answer seen so far."""
    reps: list[tuple[object, str]] = []
    keys: list[str | None] = []
    for parsed in parsed_answers:
        key = answer_key(parsed)
        if key is None:
            keys.append(None)
            continue
        for rep, rep_key in reps:
            if rep_key == key or _same_answer(rep, parsed):
                key = rep_key
                break
        else:
            reps.append((parsed, key))
        keys.append(key)
    return keys


def is_correct(completion: str, gold: str, finished: bool = True) -> bool:
    """Does the completion's answer (extract_answer) equal the gold answer (math-verify)?"""
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred = extract_answer(completion, finished)
    if not pred:
        return False
    try:
        return bool(verify(gold_parsed, pred))
    except Exception:  # noqa: BLE001 - a verifier failure on odd input counts as wrong, never a crash
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(keys: list[str | None], correct: list[bool]) -> bool:
    """maj@k: is the most frequent answer correct? keys from answer_keys (numerically equal answers
    share one); unparsed answers do not vote; ties go to the answer seen first."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)
    return next(c for k, c in zip(keys, correct) if k == winner)
