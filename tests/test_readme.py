"""The README and docs/ stay true: their Python examples run as written, the generated tables match
the code, every file they point to exists, and the README stays a ten-minute read."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
# The reference moved out of the README into these (README, "Documentation").
REFERENCE_DOCS = ("api.md", "cli.md", "multi-gpu.md", "benchmarks.md", "design.md")


def _markdown_files():
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_python_examples_run(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    if path == README:
        assert len(blocks) >= 3, "the README should show the op, add_fused_lm_head and TRL with runnable examples"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {})


def test_flag_table_matches_the_config():
    from rlsc.cli import flags_markdown

    assert flags_markdown() in CLI_DOC.read_text(), "regenerate docs/cli.md's flags table with rlsc.cli.flags_markdown()"


def test_builtin_task_sets_listed_in_the_readme_are_the_clis():
    from rlsc.cli import builtin_markdown
    from rlsc.data import BUILTINS

    text = README.read_text()
    assert builtin_markdown() in text, "regenerate the README's builtin table with rlsc.cli.builtin_markdown()"
    assert all(f"`builtin:{name}`" in text for name in BUILTINS)


def test_the_demo_time_is_one_number_from_the_recorded_run():
    from rlsc.cli import DEMO_TIME, DESCRIPTIONS, EXAMPLES

    recorded = json.loads((ROOT / "benchmarks" / "results" / "demo-cpu.json").read_text())
    seconds = recorded["after"]["timings"]["total_seconds"]
    assert DEMO_TIME == f"about {round(seconds / 60)} minutes on 2 CPU cores"
    assert DEMO_TIME in README.read_text() and DEMO_TIME in DESCRIPTIONS["demo"] and DEMO_TIME in EXAMPLES["demo"]
    for path in (README, CLI_DOC, ROOT / "Makefile"):
        text = " ".join(path.read_text().split())
        for other in ("about 10 minutes", "~6 min", "7 min 29", "7:29"):
            assert other not in text, f"{path.name} gives the demo's time as {other!r}; say {DEMO_TIME!r}"


def test_readme_is_a_ten_minute_read_and_points_at_the_reference():
    text = README.read_text()
    prose = [line for line in text.splitlines() if not line.startswith("|")]  # generated tables aside
    assert len(prose) <= 260, "keep the README short: reference material goes to docs/"
    for name in REFERENCE_DOCS:
        assert f"(docs/{name})" in text, f"the README should link docs/{name}"
    assert "| flag | train | eval | demo |" not in text, "the flags table lives in docs/cli.md"


def test_readme_says_how_to_run_rlsc_after_make():
    text = " ".join(README.read_text().split())
    assert ".venv/bin/rlsc" in text and "source .venv/bin/activate" in text


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_every_repository_path_the_docs_name_exists(path):
    """Links, images and `code` paths into the repository (docs/, examples/, benchmarks/results/,
    configs/, ...) point at files that are there: no data/aime24.jsonl a user does not have."""
    text = path.read_text()
    named = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text))
    named |= {m for m in re.findall(r"`([\w./-]+\.(?:md|jsonl|json|png|yaml|py|sh))`", text) if "/" in m}
    named |= set(re.findall(r"--prompts ([\w./-]+\.jsonl)", text))
    missing = []
    for ref in sorted(named):
        if ref.startswith(("http://", "https://", "runs/", "DIR/", "output_dir/")) or "*" in ref or "<" in ref:
            continue
        candidates = [path.parent / ref, ROOT / ref, ROOT / "rlsc_kernels" / ref]  # design.md: package-relative
        if not any(c.exists() for c in candidates):
            missing.append(ref)
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"


def test_the_example_prompts_load_and_their_answers_are_right():
    from rlsc.data import load_problems

    problems = load_problems(str(ROOT / "examples" / "arithmetic.jsonl"), split="test")
    assert len(problems) == 12 and all(p.question and p.answer for p in problems)
    checks = {"What is 3/4 of 64?": 48, "A shelf holds 7 rows of 12 books. How many books are on the shelf?": 7 * 12}
    for p in problems:
        if p.question in checks:
            assert int(p.answer) == checks[p.question]


def test_docs_point_only_inside_the_repository():
    """Users get the repository, not its authors' ../shared/ folder or a DESIGN.md that is not in it."""
    assert (DOCS / "design.md").is_file() and "docs/design.md" in README.read_text()
    texts = [*_markdown_files(), ROOT / "examples" / "README.md", *sorted((ROOT / "rlsc").glob("*.py")),
             *sorted((ROOT / "rlsc_kernels").rglob("*.py"))]
    for path in texts:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md (the design document is docs/design.md)"
        assert "../shared" not in text, f"{path} points at ../shared/, which users do not have"
