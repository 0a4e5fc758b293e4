"""`rlsc eval`: greedy accuracy, pass@1 (mean over k samples), unbiased pass@k and maj@k, per dataset."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .data import Problem, dataset_name, default_template, iter_batches
from .grading import answer_keys, extract_answer, is_correct, majority_correct, pass_at_k
from .sampling import decode_completions, sample
from .decoding import resolve_sampler


def evaluate_problems(model, tokenizer, problems: list[Problem], *, template: str, k: int, temperature: float,
                      max_new_tokens: int, batch_questions: int = 1, autocast_dtype=None,
                      log=print, samples_path: Path | None = None, label: str = "", sampler: str = "auto",
                      token_entropy: bool = False) -> dict:
    """Metrics for one dataset; per-question records go to `samples_path` (JSONL) if given.
    token_entropy=True adds "token_entropy": the mean entropy (nats) of the distributions the k
    samples' tokens were drawn from (softmax(logits / T), every generated position up to and
    including the EOS), measured by the sampler itself (None when k = 0)."""
    records = []
    t0 = time.perf_counter()
    n_gen_tokens = 0
    capped = 0
    entropy_total = 0.0
    # the compact sampler decodes the greedy answers in the same batch as the samples (same tokens, one loop)
    together = k > 0 and resolve_sampler(sampler, next(model.parameters()).device) == "compact"
    # a progress bar with an ETA on a terminal; elsewhere (logs, CI) one line per batch, with the ETA
    bar = tqdm(total=len(problems), desc=f"eval {label}", unit="question", file=sys.stderr, disable=None,
               dynamic_ncols=True)
    for batch in iter_batches(problems, max(batch_questions, 1)):
        if together:
            r, greedy = sample(model, tokenizer, batch, template=template, num_samples=k, max_new_tokens=max_new_tokens,
                               temperature=temperature, autocast_dtype=autocast_dtype, sampler=sampler, with_greedy=True,
                               entropy=token_entropy)
        else:
            greedy = sample(model, tokenizer, batch, template=template, num_samples=1, max_new_tokens=max_new_tokens,
                            temperature=temperature, greedy=True, autocast_dtype=autocast_dtype, sampler=sampler)
        greedy_text = decode_completions(tokenizer, greedy)
        greedy_finished = (~greedy.capped).tolist()
        sampled_text, sampled_len, sampled_finished = [[] for _ in batch], [[] for _ in batch], [[] for _ in batch]
        if k > 0:
            if not together:
                r = sample(model, tokenizer, batch, template=template, num_samples=k, max_new_tokens=max_new_tokens,
                           temperature=temperature, autocast_dtype=autocast_dtype, sampler=sampler, entropy=token_entropy)
            for q, text, n, cut in zip(r.question_index.tolist(), decode_completions(tokenizer, r),
                                       r.completion_lengths.tolist(), r.capped.tolist()):
                sampled_text[q].append(text)
                sampled_len[q].append(n)
                sampled_finished[q].append(not cut)
            n_gen_tokens += int(r.completion_lengths.sum())
            capped += int(r.capped.sum())
            if token_entropy:
                entropy_total += float(r.entropy_sum.sum())
        for i, p in enumerate(batch):
            # a completion cut off at the cap has an answer only if it boxed one (rlsc/grading.py)
            correct = [is_correct(t, p.answer, f) for t, f in zip(sampled_text[i], sampled_finished[i])]
            keys = answer_keys([extract_answer(t, f) for t, f in zip(sampled_text[i], sampled_finished[i])])
            records.append({
                "id": p.id, "question": p.question, "answer": p.answer,
                "greedy": greedy_text[i], "greedy_correct": is_correct(greedy_text[i], p.answer, greedy_finished[i]),
                "greedy_finished": greedy_finished[i],
                "samples": sampled_text[i], "correct": correct, "keys": keys, "lengths": sampled_len[i],
                "finished": sampled_finished[i],
            })
        done = len(records)
        bar.update(len(batch))
        if bar.disable:
            elapsed = time.perf_counter() - t0
            log(f"  eval {label}: {done}/{len(problems)} questions, {done * k} samples "
                f"({elapsed:.0f}s, ETA {_clock(elapsed / done * (len(problems) - done))})")
    bar.close()
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    extra = {"token_entropy": entropy_total / n_gen_tokens if k > 0 and n_gen_tokens else None} if token_entropy else {}
    return summarise(records, k) | {
        "seconds": round(time.perf_counter() - t0, 1),
        "mean_completion_tokens": n_gen_tokens / max(len(records) * k, 1),
        "frac_capped": capped / max(len(records) * k, 1),
    } | extra


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


def summarise(records: list[dict], k: int) -> dict:
    """Greedy accuracy, pass@1, pass@j for j = 2, 4, ... up to k, and maj@k over the records."""
    n_q = len(records)
    out = {"questions": n_q, "k": k,
           "greedy_accuracy": sum(r["greedy_correct"] for r in records) / max(n_q, 1)}
    if k > 0 and n_q:
        ks = sorted({j for j in (1, 2, 4, 8, 16, 32, 64) if j <= k} | {k})
        for j in ks:
            out[f"pass@{j}"] = sum(pass_at_k(len(r["correct"]), sum(r["correct"]), j) for r in records) / n_q
        out[f"maj@{k}"] = sum(majority_correct(r["keys"], r["correct"]) for r in records) / n_q
    return out


def evaluate_sources(model, tokenizer, sources: list[str], *, split: str, limit: int, template: str, k: int,
                     temperature: float, max_new_tokens: int, batch_questions: int = 1, autocast_dtype=None,
                     output_dir: Path | None = None, tag: str = "eval", log=print,
                     sampler: str = "auto", seed: int | None = None) -> dict[str, dict]:
    """Metrics per source. seed: torch's generator is seeded with it before each source, so a
    source's samples depend on the seed only (not on the sources before it); None leaves it as is."""
    import torch

    from .data import load_problems

    results = {}
    for source in sources:
        if seed is not None:
            torch.manual_seed(seed)
        problems = load_problems(source, split=split, limit=limit)
        name = dataset_name(source)
        log(f"evaluating {name}: {len(problems)} questions, greedy + {k} samples at T={temperature}")
        samples_path = output_dir / f"{tag}_samples_{Path(name).name.replace(':', '_')}.jsonl" if output_dir else None
        results[name] = evaluate_problems(
            model, tokenizer, problems, template=template or default_template(source), k=k, temperature=temperature,
            max_new_tokens=max_new_tokens, batch_questions=batch_questions, autocast_dtype=autocast_dtype,
            log=log, samples_path=samples_path, label=name, sampler=sampler)
    return results


def format_table(results: dict[str, dict], before: dict[str, dict] | None = None) -> str:
    """A Markdown table of the metrics; with `before`, one column per phase (before -> after)."""
    cols = []
    for res in results.values():
        for key in res:
            if key in ("greedy_accuracy",) or key.startswith(("pass@", "maj@")):
                if key not in cols:
                    cols.append(key)
    lines = ["| dataset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in results.items():
        cells = []
        for c in cols:
            after = res.get(c)
            if before is not None and name in before and c in before[name]:
                cells.append(f"{before[name][c]:.3f} -> {after:.3f}")
            else:
                cells.append("" if after is None else f"{after:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
