"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README should show the API with a runnable example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_flag_table_matches_the_config():
    from rlsc.cli import flags_markdown

    assert flags_markdown() in README.read_text(), "regenerate the flags table with rlsc.cli.flags_markdown()"


def test_docs_point_only_inside_the_repository():
    """Users get the repository, not its authors' ../shared/ folder or a DESIGN.md that is not in it."""
    root = README.parent
    assert (root / "docs" / "design.md").is_file() and "docs/design.md" in README.read_text()
    texts = [README, *sorted((root / "docs").glob("*.md")), *sorted((root / "rlsc").glob("*.py")),
             *sorted((root / "rlsc_kernels").rglob("*.py"))]
    for path in texts:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md (the design document is docs/design.md)"
        assert "../shared" not in text, f"{path} points at ../shared/, which users do not have"
