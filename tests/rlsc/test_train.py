"""The training loop on a tiny random Llama: outputs, resume == uninterrupted, atomic checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import rlsc.checkpoint as ckpt
import rlsc.train as train_mod
from rlsc.config import RLSCConfig
from rlsc.train import prompts_for_step, train

from conftest import train_killed_at_step

TIMING_FIELDS = {"gen_seconds", "train_seconds", "peak_memory_mb"}


def tiny_config(model_dir, prompts, out, **kw) -> RLSCConfig:
    base = dict(model=str(model_dir), prompts=str(prompts), num_prompts=2, num_samples=3, max_new_tokens=8,
                steps=3, lr=1e-3, micro_batch_size=2, device="cpu", precision="fp32", output_dir=str(out),
                checkpoint_every=1, save_final_model=False, seed=7, backend="auto", filter_eps="exact")
    base.update(kw)
    return RLSCConfig(**base)


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in open(path) if line.strip()]


def test_train_writes_metrics_checkpoint_plot_and_final_model(tiny_model_dir, tiny_prompts, tmp_path):
    cfg = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "run", steps=2, save_final_model=True)
    summary = train(cfg, log=lambda m: None)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    required = {"step", "loss", "mean_seq_logp", "mean_weight", "frac_weight_underflow", "mean_completion_tokens",
                "mean_token_entropy", "gen_seconds", "train_seconds", "peak_memory_mb"}
    assert required <= set(rows[0])
    assert all(r["samples"] == 6 and 0.0 <= r["frac_weight_underflow"] <= 1.0 for r in rows)
    assert (out / "training_curves.png").stat().st_size > 1000
    payload = ckpt.load_checkpoint(out)
    assert payload["step"] == 2 and payload["config"]["steps"] == 2
    assert {"model", "optimizer", "rng"} <= set(payload)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    AutoTokenizer.from_pretrained(summary["final_model"])
    assert torch.equal(final.model.embed_tokens.weight, payload["model"]["model.embed_tokens.weight"])


def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    full = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "full")
    train(full, log=lambda m: None)

    # the same run killed during step 3 (after step 2's checkpoint), then resumed
    cut = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "cut")
    train_killed_at_step(cut, 3, monkeypatch)
    assert ckpt.load_checkpoint(tmp_path / "cut")["step"] == 2
    train(cut.updated({"resume": True}), log=lambda m: None)

    a, b = ckpt.load_checkpoint(tmp_path / "full"), ckpt.load_checkpoint(tmp_path / "cut")
    assert a["step"] == b["step"] == 3
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert _rows(tmp_path / "full" / "metrics.jsonl") == _rows(tmp_path / "cut" / "metrics.jsonl")


def test_resume_auto_without_checkpoint_starts_from_scratch(tiny_model_dir, tiny_prompts, tmp_path):
    cfg = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "r", steps=1, resume="auto")
    train(cfg, log=lambda m: None)
    assert ckpt.load_checkpoint(tmp_path / "r")["step"] == 1


def test_resume_without_checkpoint_is_an_error_before_anything_is_loaded_or_written(tiny_prompts, tmp_path):
    cfg = tiny_config(tmp_path / "no-model-needed", tiny_prompts, tmp_path / "r", resume="yes")
    with pytest.raises(FileNotFoundError, match="--resume: there is no checkpoint in .*--resume auto"):
        train(cfg, log=lambda m: None)
    assert not (tmp_path / "r").exists()


def test_consecutive_non_finite_steps_stop_the_run_and_are_counted(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    real_step = train_mod.rlsc_step

    def poisoned_step(*args, **kwargs):  # steps 2, 3, 4 have a non-finite gradient
        stats, g, t = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:
            stats.skipped, stats.loss = True, float("nan")
        return stats, g, t

    calls = []
    monkeypatch.setattr(train_mod, "rlsc_step", poisoned_step)
    cfg = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "nan", steps=6, max_consecutive_skips=3)
    with pytest.raises(train_mod.NonFiniteSteps, match=r"3 steps in a row \(up to step 4\)"):
        train(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in open(tmp_path / "nan" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] is None


def test_checkpoint_without_optimizer_state_is_smaller_and_resumes(tiny_model_dir, tiny_prompts, tmp_path):
    full = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "a", steps=1)
    lean = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "b", steps=1, save_optimizer_state=False)
    train(full, log=lambda m: None)
    train(lean, log=lambda m: None)
    size = lambda d: (d / "checkpoint.pt").stat().st_size  # noqa: E731
    assert size(tmp_path / "b") < 0.5 * size(tmp_path / "a")
    assert "optimizer" not in ckpt.load_checkpoint(tmp_path / "b")
    train(lean.updated({"steps": 2, "resume": "yes"}), log=lambda m: None)
    assert ckpt.load_checkpoint(tmp_path / "b")["step"] == 2


def test_a_run_shorter_than_the_checkpoint_interval_keeps_only_its_final_model(tiny_model_dir, tiny_prompts, tmp_path):
    """A smoke run (1 step, --checkpoint-every 5) writes final/ and no checkpoint (the demo's 1-step run
    wrote 2.1 GB: 1.6 GB of checkpoint with AdamW's moments plus 0.5 GB of final model); without
    final/ it keeps its checkpoint, and a run as long as the interval gets one after its last step."""
    smoke = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "smoke", steps=1, checkpoint_every=5,
                        save_final_model=True)
    train(smoke, log=lambda m: None)
    assert (tmp_path / "smoke" / "final" / "config.json").is_file()
    assert not (tmp_path / "smoke" / "checkpoint.pt").exists()
    with pytest.raises(FileNotFoundError, match="shorter than --checkpoint-every"):
        train(smoke.updated({"steps": 2, "resume": "yes"}), log=lambda m: None)
    kept = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "kept", steps=1, checkpoint_every=5)
    train(kept, log=lambda m: None)  # save_final_model=False: the checkpoint is all the run leaves
    assert ckpt.load_checkpoint(tmp_path / "kept")["step"] == 1
    full = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "full", steps=3, checkpoint_every=2,
                       save_final_model=True)
    train(full, log=lambda m: None)
    assert ckpt.load_checkpoint(tmp_path / "full")["step"] == 3


def test_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, config={"a": 1})
    good = {k: v.clone() for k, v in ckpt.load_checkpoint(tmp_path)["model"].items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def torn_save(obj, fh):
        fh.write(b"partial garbage")
        raise OSError("disk full / killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=2, config={"a": 1})
    monkeypatch.undo()
    payload = ckpt.load_checkpoint(tmp_path)
    assert payload["step"] == 1
    assert all(torch.equal(payload["model"][k], good[k]) for k in good)
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))


def test_stale_temporary_from_a_killed_process_is_ignored_and_removed(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=4, config={})
    (tmp_path / ".checkpoint.pt.tmp-99999").write_bytes(b"torn")
    assert ckpt.load_checkpoint(tmp_path)["step"] == 4
    ckpt.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".checkpoint.pt.tmp-99999").exists()


def test_prompts_for_step_walks_seeded_epochs_and_covers_every_question():
    problems = list(range(5))
    seen = [p for s in range(5) for p in prompts_for_step(problems, s, 2, seed=1)]
    assert sorted(seen[:5]) == problems and sorted(seen[5:10]) == problems
    assert prompts_for_step(problems, 3, 2, seed=1) == prompts_for_step(problems, 3, 2, seed=1)
    assert prompts_for_step(problems, 0, 5, seed=1) != prompts_for_step(problems, 0, 5, seed=2)


def test_metrics_line_torn_by_a_kill_is_dropped_but_a_bad_middle_line_is_an_error(tmp_path):
    from rlsc.plot import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_demo_writes_the_table_and_plots_the_before_after_evaluation(tiny_model_dir, tiny_prompts, tmp_path, capsys):
    from rlsc.demo import demo

    cfg = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / "demo", steps=1, num_prompts=1, num_samples=2,
                      max_new_tokens=4, k=2, save_final_model=False, checkpoint_every=0)
    result = demo(cfg, log=lambda m: None)
    out = tmp_path / "demo"
    assert set(result["before"]) == set(result["after"]) == {"tiny"}
    assert (out / "before_after.png").stat().st_size > 1000 and (out / "training_curves.png").is_file()
    assert "->" in (out / "results.md").read_text()
    assert "before_after.png" in capsys.readouterr().out


def test_the_optimizer_is_adamw_foreach_and_bitwise_the_per_parameter_loop(tiny_tokenizer):
    """build_optimizer takes AdamW's multi-tensor implementation on a CPU too (torch's default there
    is the per-parameter loop); three steps with weight decay give the loop's weights bit for bit."""
    import copy

    from conftest import make_model
    from rlsc.train import build_optimizer

    cfg = RLSCConfig(lr=1e-3, weight_decay=0.01)
    a = make_model(tiny_tokenizer, seed=2)
    b = copy.deepcopy(a)
    opt_a = build_optimizer(a, cfg)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=cfg.lr, eps=cfg.adam_eps,
                              betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, foreach=False)
    assert opt_a.defaults["foreach"] is True and isinstance(opt_a, torch.optim.AdamW)
    torch.manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(a.parameters()), next(make_model(tiny_tokenizer, seed=2).parameters()))


def test_share_prompts_flag_reaches_the_step_and_is_refused_for_the_trl_engine(tiny_model_dir, tiny_prompts, tmp_path,
                                                                                monkeypatch):
    """--share-prompts: the thin engine's step scores through the shared-prompt forward (two body
    calls where a micro-batch repeats a prompt), with the same loss and log-probs as without it to
    fp32 rounding on the first step (same rollouts); --engine trl refuses it."""
    import rlsc.step as step_mod

    seen = []
    real = step_mod._shared_prompt_hidden_states
    monkeypatch.setattr(step_mod, "_shared_prompt_hidden_states", lambda *a: seen.append(1) or real(*a))
    rows = {}
    for share in (False, True):
        cfg = tiny_config(tiny_model_dir, tiny_prompts, tmp_path / str(share), steps=1, share_prompts=share)
        train(cfg, log=lambda m: None)
        rows[share] = _rows(tmp_path / str(share) / "metrics.jsonl")[0]
    assert len(seen) == 3   # one call per micro-batch with share_prompts, none without
    for key in ("loss", "mean_seq_logp", "mean_weight", "mean_token_entropy"):
        assert rows[True][key] == pytest.approx(rows[False][key], rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match="--share-prompts"):
        RLSCConfig(engine="trl", share_prompts=True).validate("train")
