"""One RLSC step through `--engine trl` and through the thin trainer's rlsc_update on the same
fixed samples, for each weighting named on the command line; run as one process or under
torchrun (gloo on CPU). Every process checks its own results and prints "TRL ENGINE OK".

    python trl_worker.py OUT_DIR rlsc,group
    python -m torch.distributed.run --nproc_per_node 2 trl_worker.py OUT_DIR rlsc,group
    python -m torch.distributed.run --nproc_per_node 2 trl_worker.py OUT_DIR fsdp|fsdp-head   (see fsdp_main)
"""
from __future__ import annotations

import copy
import json
import os
import string
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlsc.config import RLSCConfig  # noqa: E402
from rlsc.sampling import Rollouts, chat_prompt  # noqa: E402
from rlsc.objectives import make_update  # noqa: E402
from rlsc.step import LossOptions, rlsc_update, train_mode_without_dropout  # noqa: E402
from rlsc.train import build_optimizer  # noqa: E402
from tests.worker_exit import exit_after_success  # noqa: E402

K, N, MAX_NEW = 2, 4, 6   # questions, samples per question, generation cap
QUESTIONS = ["add 12 and 7", "hello there"]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.ascii_lowercase + string.digits + " ")))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    return model


def fixed_completions(tok) -> dict:
    """(question index, copy) -> completion ids: copy 0 and 3 end in EOS (random lengths), copy 1 is
    EOS alone, copy 2 is capped (MAX_NEW tokens, no EOS)."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for q in range(K):
        for c in range(N):
            n = {1: 1, 2: MAX_NEW}.get(c, int(torch.randint(2, MAX_NEW + 1, (1,), generator=gen)))
            ids = torch.randint(3, len(tok), (n,), generator=gen).tolist()  # 0-2 are the special tokens
            if c != 2:
                ids[-1] = tok.eos_token_id
            out[(q, c)] = ids
    return out


def thin_rollouts(tok, template, comps) -> Rollouts:
    prompts = [tok(chat_prompt(tok, QUESTIONS[q], template), add_special_tokens=False)["input_ids"] for q in range(K)]
    rows = [(q, c) for q in range(K) for c in range(N)]
    P, L = max(map(len, prompts)), MAX_NEW
    pid = torch.full((len(rows), P), tok.pad_token_id)
    pmask = torch.zeros(len(rows), P, dtype=torch.bool)
    cid = torch.full((len(rows), L), tok.pad_token_id)
    cmask = torch.zeros(len(rows), L, dtype=torch.bool)
    capped = torch.zeros(len(rows), dtype=torch.bool)
    for i, (q, c) in enumerate(rows):
        p, y = prompts[q], comps[(q, c)]
        pid[i, P - len(p):] = torch.tensor(p)
        pmask[i, P - len(p):] = True
        cid[i, :len(y)] = torch.tensor(y)
        cmask[i, :len(y)] = True
        capped[i] = y[-1] != tok.eos_token_id
    return Rollouts(pid, pmask, cid, cmask, capped, torch.tensor([q for q, _ in rows]))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (DTensor); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out_dir: str, weightings: list[str]) -> None:
    from transformers import TrainerCallback

    from rlsc.trl_engine import train_trl

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    tok = tokenizer()
    template = "{question}"
    comps = fixed_completions(tok)
    data = Path(out_dir) / "questions.jsonl"
    # every rank writes the same file (atomically): the config check reads it before any barrier
    data.parent.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(f".{rank}.tmp")
    tmp.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": "0"}) + "\n"
                           for i, q in enumerate(QUESTIONS)))
    os.replace(tmp, data)
    report = {}
    for label in weightings:
        # "W+lora": weighting W with LoRA adapters (rank 4, every linear layer) on the tiny model;
        # "W+mask": weighting W with --mask-truncated (the capped completions out of the loss)
        weighting, lora, mask = label.split("+")[0], label.endswith("+lora"), label.endswith("+mask")
        # "objective=O": the label-free objective O (rlsc/objectives.py) instead of an RLSC weighting
        objective = weighting.split("=")[1] if weighting.startswith("objective=") else "rlsc"
        weighting = "rlsc" if objective != "rlsc" else weighting
        cfg = RLSCConfig(model="tiny", prompts=str(data), prompt_template=template, num_prompts=K, num_samples=N,
                         micro_batch_size=2, max_new_tokens=MAX_NEW, temperature=0.7, alpha=0.1,
                         weighting=weighting, filter_eps="exact", backend="torch", steps=1, lr=1e-2,
                         weight_decay=0.0, device="cpu", output_dir=str(Path(out_dir) / label),
                         checkpoint_every=0, save_final_model=False, engine="trl", seed=0, mask_truncated=mask,
                         objective=objective)
        base = tiny_model(tok)
        if lora:
            from rlsc.models import apply_lora

            base = apply_lora(base, 4, 16.0, "all-linear")
            with torch.no_grad():  # B = 0 at init would leave A without gradient
                for n, p in base.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        # --- the thin trainer on every sample ---
        thin = copy.deepcopy(base)
        train_mode_without_dropout(thin)
        opt = build_optimizer(thin, cfg)
        thin_grads = {}
        opt.register_step_pre_hook(lambda o, a, k: thin_grads.update(
            {n: p.grad.detach().clone() for n, p in thin.named_parameters() if p.grad is not None}))
        update = rlsc_update if objective == "rlsc" else make_update(objective, tok)
        stats = update(thin, opt, thin_rollouts(tok, template, comps),
                       LossOptions(temperature=cfg.temperature, alpha=cfg.alpha, weighting=weighting,
                                   filter_eps=None, backend="torch", micro_batch_size=cfg.micro_batch_size,
                                   mask_truncated=mask))
        # --- the TRL engine: same initial weights, samples looked up by (question, copy) ---
        used = []

        def sample(trainer, inputs):
            pids, cids = [], []
            for i, x in enumerate(inputs):
                q, c = int(x["question_index"]), (trainer.accelerator.process_index * len(inputs) + i) % N
                used.append((q, c))
                pids.append(tok(x["prompt"], add_special_tokens=False)["input_ids"])
                cids.append(comps[(q, c)])
            return pids, cids

        captured = {}

        class Capture(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                captured["param_type"] = type(next(model.parameters())).__name__
                captured["grads"] = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                captured["params"] = {n: _full(p).detach().clone() for n, p in model.named_parameters()}

        ours = copy.deepcopy(base)
        train_trl(cfg, loaded=types.SimpleNamespace(model=ours, tokenizer=tok), log=lambda m: None, sample=sample,
                  callbacks=[Capture()])
        # every (question, copy) pair scored exactly once over all processes
        import torch.distributed as dist

        pairs = [None] * world
        if world > 1:
            dist.all_gather_object(pairs, used)
        else:
            pairs = [used]
        assert sorted(p for part in pairs for p in part) == sorted(comps), pairs
        # gradients of the step (after DDP's all-reduce) and the parameter update
        assert captured["grads"].keys() == thin_grads.keys(), (captured["grads"].keys() ^ thin_grads.keys())
        worst_g = worst_u = 0.0
        for name, g in thin_grads.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(captured["grads"][name], g, rtol=1e-4, atol=1e-6 * max(scale, 1e-3), msg=name)
            worst_g = max(worst_g, float((captured["grads"][name] - g).abs().max()) / max(scale, 1e-12))
        before = dict(base.named_parameters())
        for name, p in thin.named_parameters():
            upd_thin = p.detach() - before[name].detach()
            upd_ours = captured["params"][name] - before[name].detach()
            # AdamW's first step moves w by lr g / (|g| + eps): where |g| ~ eps = 1e-8 (em-ft reaches such
            # entries) a gradient difference within the tolerance above moves the update by up to
            # lr d eps / (|g| - d + eps)^2 (tests/rlsc/test_step.py: adamw_first_step_tolerance)
            g = thin_grads.get(name, torch.zeros_like(upd_thin))  # frozen under LoRA: no gradient
            d = 1e-6 * float(g.abs().max()) + 1e-4 * g.abs()
            near_eps = cfg.lr * d * 1e-8 / ((g.abs() - d).clamp(min=0) + 1e-8) ** 2
            bound = 1e-6 * cfg.lr + 1e-4 * upd_thin.abs() + near_eps
            assert ((upd_ours - upd_thin).abs() <= bound).all(), f"{name}: update beyond the derived bound"
            worst_u = max(worst_u, float((upd_ours - upd_thin).abs().max()) / cfg.lr)
        assert max(float(g.abs().max()) for g in thin_grads.values()) > 0
        rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        if rank == 0:
            assert len(rows) == 1 and rows[0]["step"] == 1 and rows[0]["samples"] == K * N, rows
            assert abs(rows[0]["loss"] - stats.loss) <= 1e-5 * max(1.0, abs(stats.loss)), (rows[0]["loss"], stats.loss)
            assert abs(rows[0]["mean_seq_logp"] - float(stats.seq_logp.mean())) <= 1e-4
            assert abs(rows[0]["mean_weight"] - float(stats.seq_weight.mean())) <= 1e-5
            assert abs(rows[0]["mean_token_entropy"] - stats.mean_token_entropy) <= 1e-4
            assert abs(rows[0]["grad_norm"] - stats.grad_norm) <= 1e-4 * stats.grad_norm
            assert abs(rows[0]["frac_capped"] - float(stats.capped.float().mean())) < 1e-9
        from accelerate import PartialState

        report[label] = {"grad_rel_err": worst_g, "update_err_over_lr": worst_u, "fields": sorted(rows[0]),
                             "distributed": str(PartialState().distributed_type), "param_type": captured["param_type"]}
    if rank == 0:
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    (Path(out_dir) / f"ok-{rank}").write_text("TRL ENGINE OK")  # stdout of the ranks may interleave
    print("TRL ENGINE OK", rank, json.dumps(report), flush=True)


def fsdp_main(out_dir: str, head_sharded: bool) -> None:
    """The engine's loss (model(rlsc=...)) on a model under FSDP2 (fully_shard per decoder layer
    and the root; head_sharded: the LM head in its own unit, so its weight is a DTensor when the
    loss reads it), 2 gloo ranks, each scoring half of the samples: the gathered gradients equal
    the thin trainer's on all samples. (accelerate maps FSDP on CPU to plain DDP, so this is
    fully_shard directly.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from rlsc.trl_engine import _Request, add_rlsc_forward

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tok = tokenizer()
    template = "{question}"
    rollouts = thin_rollouts(tok, template, fixed_completions(tok))
    base = tiny_model(tok)
    for weighting in ("rlsc", "length"):
        thin = copy.deepcopy(base)
        train_mode_without_dropout(thin)
        opt = torch.optim.SGD(thin.parameters(), lr=0.0)
        thin_grads = {}
        opt.register_step_pre_hook(lambda o, a, k: thin_grads.update(
            {n: p.grad.detach().clone() for n, p in thin.named_parameters() if p.grad is not None}))
        rlsc_update(thin, opt, rollouts, LossOptions(temperature=0.7, alpha=0.1, weighting=weighting,
                                                     filter_eps=None, backend="torch", micro_batch_size=2))
        ours = copy.deepcopy(base)
        train_mode_without_dropout(ours)
        for layer in ours.model.layers:
            fully_shard(layer)
        if head_sharded:
            fully_shard(ours.lm_head)
        fully_shard(ours)
        add_rlsc_forward(ours)
        mine = rollouts.select(torch.arange(rank, len(rollouts), world))
        settings = dict(temperature=0.7, alpha=0.1, backend="torch", filter_eps=None)
        out = ours(rlsc=_Request(mine, "loss", weighting=weighting, settings=settings))
        (out.loss / (len(rollouts) // world)).backward()  # FSDP averages the gradients over ranks
        if head_sharded:
            assert hasattr(ours.lm_head.weight, "full_tensor")
        for name, p in ours.named_parameters():
            g = _full(p.grad)
            ref = thin_grads[name]
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * max(float(ref.abs().max()), 1e-3), msg=name)
    dist.barrier()   # both ranks done before gloo is torn down
    dist.destroy_process_group()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"ok-{rank}").write_text("FSDP2 LOSS OK")
    print("FSDP2 LOSS OK", rank, flush=True)


if __name__ == "__main__":
    if sys.argv[2] in ("fsdp", "fsdp-head"):
        fsdp_main(sys.argv[1], sys.argv[2] == "fsdp-head")
    else:
        main(sys.argv[1], sys.argv[2].split(","))
    exit_after_success()
