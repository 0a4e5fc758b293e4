"""Answer grading with math-verify (a maintained verifier), \\boxed{} answers first, and the
pass@k / maj@k arithmetic."""
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


def extract_answer(completion: str):
    """math-verify's parse of the last \\boxed{} content if there is one, else of the whole text."""
    from math_verify import parse

    boxed = last_boxed(completion)
    if boxed is not None:
        parsed = parse(f"\\boxed{{{boxed}}}")
        if parsed:
            return parsed
    return parse(completion)


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


def is_correct(completion: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred = extract_answer(completion)
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
