"""`rlsc train --engine trl`: one RLSC step through TRL equals the thin trainer's (1 and 2
processes, gloo on CPU), the command line end to end (metrics, checkpoints, exact resume, final
model), sampling from softmax(logits / T) only, and the engine's argument checks."""
from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")
pytest.importorskip("datasets")

from rlsc.config import RLSCConfig  # noqa: E402
from rlsc.trl_engine import StepSampler, accumulation_steps, train_trl  # noqa: E402

WORKER = Path(__file__).with_name("trl_worker.py")
ROOT = Path(__file__).resolve().parents[2]
ALL_WEIGHTINGS = ("rlsc", "rlsc-l1", "entropy", "length", "group")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


def thin_metric_fields() -> set[str]:
    """The keys of the thin trainer's metrics row, read from rlsc.train.train's source."""
    from rlsc import train

    src = inspect.getsource(train.train)
    block = src[src.index("row = {"): src.index("}", src.index("row = {"))]
    return set(re.findall(r'"(\w+)":', block))


def _check_report(out: Path, weightings, distributed: str):
    report = json.loads((out / "report.json").read_text())
    assert set(report) == set(weightings)
    for w, r in report.items():
        assert set(r["fields"]) == thin_metric_fields(), w
        assert r["distributed"] == distributed, r
        assert r["grad_rel_err"] < 1e-5 and r["update_err_over_lr"] < 1e-3, (w, r)


def test_one_step_through_trl_equals_the_thin_trainer_one_process(tmp_path):
    """Fixed samples (EOS-terminated, EOS alone, capped; two prompt lengths): every weighting's
    gradient (rel. 1e-4) and AdamW update match rlsc_update (also with LoRA), and the metrics row
    matches its stats (also with --mask-truncated)."""
    runs = (*ALL_WEIGHTINGS, "rlsc+lora", "rlsc+mask", "group+mask")  # + LoRA (peft) on every linear layer;
    # + --mask-truncated (the capped completions leave the loss in both engines alike)
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), ",".join(runs)], env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert (tmp_path / "ok-0").read_text() == "TRL ENGINE OK"
    _check_report(tmp_path, runs, "DistributedType.NO")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_one_step_through_trl_equals_the_thin_trainer_two_processes(tmp_path, launcher):
    """2 processes, gloo on CPU (DDP), started by torchrun or by accelerate launch: each process
    scores half the samples; after the all-reduce its gradient and update equal the thin
    trainer's on all of them. Group weights need the other process's samples (gathered)."""
    if launcher == "torchrun":
        weightings = ("rlsc", "group")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port())]
    else:
        weightings = ("length",)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu_gloo.yaml"), "--main_process_port", str(_free_port())]
    proc = subprocess.run(cmd + [str(WORKER), str(tmp_path), ",".join(weightings)], env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert all((tmp_path / f"ok-{rank}").read_text() == "TRL ENGINE OK" for rank in (0, 1))
    _check_report(tmp_path, weightings, "DistributedType.MULTI_CPU")  # DDP on gloo


@pytest.mark.parametrize("processes", [1, 2])
def test_label_free_objectives_through_trl_equal_the_thin_trainer(tmp_path, processes):
    """--objective intuitor / em-rl / rent / em-ft on the TRL engine: rewards from every process, GRPO
    advantages over each question's samples (em-ft: the entropy over every process's tokens), the
    same gradient and update as the thin trainer (rlsc/objectives.py). ttrl shares the path (its rewards come from texts; the fixed samples
    here give no majority, hence no gradient to compare)."""
    runs = (("objective=intuitor", "objective=em-rl", "objective=rent", "objective=em-ft") if processes == 1
            else ("objective=intuitor", "objective=em-ft"))
    cmd = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                   "2", "--master_port", str(_free_port())]
    proc = subprocess.run(cmd + [str(WORKER), str(tmp_path), ",".join(runs)], env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    _check_report(tmp_path, runs, "DistributedType.NO" if processes == 1 else "DistributedType.MULTI_CPU")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mode", ["fsdp", "fsdp-head"], ids=["root-unit-head", "head-own-unit"])
def test_engine_loss_under_fully_shard_matches_the_thin_trainer(tmp_path, mode):
    """FSDP2 cannot run through accelerate on CPU (accelerate turns FSDP on CPU into DDP), so the
    engine's loss (the model(rlsc=...) forward) runs under fully_shard directly: 2 gloo ranks,
    half the samples each; the head either in the root unit or in its own (its weight a DTensor,
    scored inside the owner's forward). Gathered gradients equal the thin trainer's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(WORKER), str(tmp_path), mode]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert all((tmp_path / f"ok-{rank}").read_text() == "FSDP2 LOSS OK" for rank in (0, 1))


@pytest.fixture(scope="module")
def greedy_configured_model(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama (tied head, the chat-template tokenizer of conftest) whose
    generation_config asks for top-k 1, top-p 0.5 and a repetition penalty: the engine must
    ignore all three (they would change the distribution the samples come from)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.update(do_sample=True, top_k=1, top_p=0.5, repetition_penalty=3.0,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-greedy-config")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cli(args, tmp_path):
    cmd = [sys.executable, "-m", "rlsc", "train", "--engine", "trl", *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_cli_trains_checkpoints_resumes_exactly_and_saves_the_final_model(tmp_path, greedy_configured_model,
                                                                           tiny_prompts):
    common = ["--model", greedy_configured_model, "--prompts", tiny_prompts, "--num-prompts", 2, "--num-samples", 4,
              "--micro-batch-size", 4, "--device", "cpu", "--max-new-tokens", 5, "--temperature", 1.3,
              "--lr", 1e-3, "--seed", 1]
    run, straight = tmp_path / "run", tmp_path / "straight"
    _cli(common + ["--steps", 2, "--checkpoint-every", 1, "--output-dir", run], tmp_path)
    assert (run / "checkpoint-2").is_dir() and not (run / "checkpoint-1").exists()  # the last one kept
    _cli(common + ["--steps", 3, "--checkpoint-every", 1, "--output-dir", run, "--resume"], tmp_path)
    _cli(common + ["--steps", 3, "--checkpoint-every", 0, "--output-dir", straight], tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    volatile = {"gen_seconds", "train_seconds", "peak_memory_mb"}
    for r, e in zip(rows, ref):
        assert set(r) == thin_metric_fields()
        assert {k: v for k, v in r.items() if k not in volatile} == {k: v for k, v in e.items() if k not in volatile}
    from rlsc.train import prompts_for_step
    from rlsc.data import load_problems

    problems = load_problems(str(tiny_prompts))
    assert [r["questions"] for r in rows] == [[p.id for p in prompts_for_step(problems, s, 2, 1)] for s in range(3)]
    assert all(r["samples"] == 8 and not r["skipped"] and r["grad_norm"] > 0 for r in rows)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    start = AutoModelForCausalLM.from_pretrained(greedy_configured_model)
    moved = max(float((a - b).abs().max()) for a, b in zip(final.parameters(), start.parameters()))
    assert moved > 1e-4  # three AdamW steps at lr 1e-3
    assert (run / "final" / "tokenizer.json").is_file()


def test_generation_samples_from_softmax_over_temperature_only(tmp_path, greedy_configured_model):
    """TRL's generate path with the engine's GenerationConfig: the only logits processor is the
    temperature, and with the model's own top-k 1 ignored, copies of one prompt differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TemperatureLogitsWarper

    from rlsc.trl_engine import _trainer_class, grpo_config, prompt_dataset
    from rlsc.data import Problem

    tok = AutoTokenizer.from_pretrained(greedy_configured_model)
    model = AutoModelForCausalLM.from_pretrained(greedy_configured_model)
    cfg = RLSCConfig(model="x", prompts="x", num_prompts=1, num_samples=8, micro_batch_size=8, max_new_tokens=8,
                     temperature=1.7, device="cpu", output_dir=str(tmp_path), engine="trl")
    problems = [Problem("a", "What is 2 + 2?", "4", "t")]
    trainer = _trainer_class()(model=model, args=grpo_config(cfg, 1, "fp32"), processing_class=tok,
                               train_dataset=prompt_dataset(problems, tok, "{question}"), rlsc=cfg)
    gc = trainer.generation_config
    processors = model._get_logits_processor(generation_config=gc, input_ids_seq_length=4, encoder_input_ids=None,
                                             prefix_allowed_tokens_fn=None, logits_processor=None,
                                             device="cpu", model_kwargs={})
    assert [type(p) for p in processors] == [TemperatureLogitsWarper] and processors[0].temperature == 1.7
    torch.manual_seed(0)
    prompt = prompt_dataset(problems, tok, "{question}")[0]["prompt"]
    completions = trainer._generate([prompt] * 8)[1]
    assert len({tuple(c) for c in completions}) > 1, completions


def test_engine_arguments_are_checked():
    cfg = RLSCConfig(num_prompts=3, num_samples=5, micro_batch_size=4)
    with pytest.raises(ValueError, match="micro_batch_size x processes"):
        accumulation_steps(cfg, 1)
    assert accumulation_steps(RLSCConfig(num_prompts=2, num_samples=16, micro_batch_size=4), 2) == 4
    with pytest.raises(ValueError, match="--vllm-mode"):
        RLSCConfig(vllm_mode="colocate").validate("train")  # the thin engine has no vLLM
    with pytest.raises(ValueError, match="--engine"):
        RLSCConfig(engine="deepspeed").validate("train")
    with pytest.raises(ValueError, match="micro_batch_size x processes"):
        train_trl(RLSCConfig(engine="trl", device="cpu", num_prompts=3, num_samples=5, micro_batch_size=4))
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="needs vLLM"):
            train_trl(RLSCConfig(engine="trl", device="cpu", vllm_mode="colocate"))


def test_step_sampler_poses_the_thin_trainers_questions():
    from rlsc.train import prompts_for_step

    order = list(StepSampler(7, steps=3, num_prompts=2, num_samples=3, repeats=2, seed=4))
    assert len(order) == 3 * 2 * 2 * 3
    for step in range(3):
        block = [q for q in prompts_for_step(list(range(7)), step, 2, 4) for _ in range(3)]
        assert order[step * 12: step * 12 + 12] == block * 2


@pytest.mark.parametrize("vllm_mode", ["off", "colocate", "server"])
def test_grpo_config_maps_the_flags(vllm_mode):
    """The flags as TRL/HF settings: neutral sampling for each generator, constant lr, no TRL
    clipping (the engine clips and logs the pre-clip norm), one generation per optimizer step."""
    from rlsc.trl_engine import NEUTRAL_SAMPLING, grpo_config

    cfg = RLSCConfig(engine="trl", vllm_mode=vllm_mode, num_prompts=2, num_samples=16, micro_batch_size=4,
                     temperature=0.5, max_new_tokens=3072, lr=1e-5, steps=20, max_grad_norm=1.0, device="cpu")
    args = grpo_config(cfg, 1, "bf16-autocast")  # this process alone: 32 samples = 4 x 8 micro-batches
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.steps_per_generation) == (4, 8, 8)
    assert args.generation_batch_size == 32
    assert (args.num_generations, args.max_completion_length, args.temperature) == (16, 3072, 0.5)
    assert (args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.beta) == (0, 1.0, None, 1.0, 0.0)
    assert args.lr_scheduler_type == "constant" and args.max_grad_norm == 0.0 and args.max_steps == 20
    assert args.bf16 and args.num_iterations == 1 and not args.vllm_importance_sampling_correction
    assert args.use_vllm == (vllm_mode != "off")
    # vLLM builds SamplingParams(**generation_kwargs): transformers' processor names must not go there
    assert args.generation_kwargs == (NEUTRAL_SAMPLING if vllm_mode == "off" else None)


def test_guarded_adamw_skips_when_told():
    """The engine's optimizer: a True guard (non-finite loss or gradient) leaves weights and
    AdamW's moments untouched; a False one steps as torch's AdamW."""
    from rlsc.trl_engine import GuardedAdamW

    w = torch.nn.Parameter(torch.ones(3))
    ref = torch.nn.Parameter(torch.ones(3))
    opt, ref_opt = GuardedAdamW([w], lr=0.1), torch.optim.AdamW([ref], lr=0.1)
    seen = []
    opt.guard = lambda params: seen.append(len(params)) or True
    w.grad = torch.tensor([1.0, float("nan"), 2.0])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state and seen == [1]
    opt.guard = lambda params: False
    w.grad = ref.grad = torch.tensor([1.0, -1.0, 2.0])
    opt.step()
    ref_opt.step()
    assert torch.equal(w.detach(), ref.detach()) and not torch.equal(w.detach(), torch.ones(3))


def test_generation_ignores_every_knob_of_the_checkpoints_generation_config(tmp_path, tiny_tokenizer):
    """The thin trainer's requirement and test, for TRL's generate path: a checkpoint whose
    generation_config sets every sampling knob transformers has (test_sampling's model). The
    logits processors transformers actually builds (after merging the checkpoint's config) are the
    temperature alone, one-token samples pass the thin trainer's chi-square test against
    softmax(logits / T), and the model keeps its generation_config afterwards."""
    from transformers import TemperatureLogitsWarper

    from rlsc.data import Problem
    from rlsc.trl_engine import _trainer_class, grpo_config, prompt_dataset
    from test_sampling import _model_with_every_generation_knob, _prompt_ids, chi2_upper_quantile

    tok = tiny_tokenizer
    model = _model_with_every_generation_knob(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    knobs = model.generation_config.to_dict()
    T, n = 0.8, 3000
    cfg = RLSCConfig(model="x", prompts="x", num_prompts=1, num_samples=8, micro_batch_size=8, max_new_tokens=1,
                     temperature=T, device="cpu", output_dir=str(tmp_path), engine="trl")
    problems = [Problem("a", "Hi", "", "t")]
    trainer = _trainer_class()(model=model, args=grpo_config(cfg, 1, "fp32"), processing_class=tok,
                               train_dataset=prompt_dataset(problems, tok, "{question}"), rlsc=cfg)
    built = []
    real = type(model)._get_logits_processor

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        built.append([type(p) for p in out])
        return out

    type(model)._get_logits_processor = spy
    try:
        torch.manual_seed(0)
        prompt = prompt_dataset(problems, tok, "{question}")[0]["prompt"]
        completions = trainer._generate([prompt] * n)[1]
    finally:
        type(model)._get_logits_processor = real
    assert built and all(b == [TemperatureLogitsWarper] for b in built), built
    assert model.generation_config.to_dict() == knobs
    first = torch.tensor([c[0] for c in completions])
    with torch.no_grad():
        logits = model(input_ids=_prompt_ids(tok, "Hi")).logits[0, -1].double()
    p = torch.softmax(logits / T, -1)
    counts = torch.bincount(first, minlength=p.numel()).double()
    expected = n * p
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:
        obs, exp = torch.cat([obs[:-2], obs[-2:].sum()[None]]), torch.cat([exp[:-2], exp[-2:].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < chi2_upper_quantile(obs.numel() - 1, z=3.719), (chi2, obs.numel() - 1)


def test_engine_runs_the_start_of_run_head_check(tmp_path, tiny_tokenizer, tiny_prompts):
    """As the thin trainer: a model that transforms its logits in a way the fused head does not know
    is refused before training (rather than trained on another distribution)."""
    from types import SimpleNamespace

    from conftest import make_model

    model = make_model(tiny_tokenizer, seed=1)
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 1.5)
    cfg = RLSCConfig(model="x", prompts=str(tiny_prompts), num_prompts=1, num_samples=2, micro_batch_size=2,
                     max_new_tokens=3, device="cpu", output_dir=str(tmp_path / "out"), engine="trl", steps=1)
    with pytest.raises(NotImplementedError, match="transforms its logits"):
        train_trl(cfg, loaded=SimpleNamespace(model=model, tokenizer=tiny_tokenizer))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
