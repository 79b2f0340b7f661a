"""The runnable examples in the Python docstrings are checked here (they are part of the docs)."""
import doctest
from pathlib import Path

import pytest

import absparse
import absparse.calibration
import absparse.layout
import absparse.ops


@pytest.mark.parametrize("module", [absparse.calibration, absparse.layout, absparse.ops], ids=lambda m: m.__name__)
def test_docstring_examples(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    globs = {"torch": __import__("torch"), **{n: getattr(absparse, n) for n in absparse.__all__}}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_demo_runs(capsys):
    from absparse import demo
    assert demo.main(["--batch", "2", "--min-len", "100", "--max-len", "700", "--q-heads", "4",
                      "--kv-heads", "2", "--head-dim", "64", "--budget", "128"]) == 0
    out = capsys.readouterr().out
    assert "relative L2 error" in out and "KV bytes read" in out


def _readme_python_example():
    """The code block of README.md's "## Python example" and the README text after it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python example", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    return code, section.split("```python\n", 1)[1].split("```", 1)[1]


def test_readme_python_example(capsys):
    """The example runs and prints what the README says it prints."""
    code, text = _readme_python_example()
    exec(compile(code, "README.md (Python example)", "exec"), {})
    printed = " ".join(capsys.readouterr().out.split())
    assert printed, "the README example prints nothing"
    assert f"It prints `{printed}`" in " ".join(text.split()), (
        f"README.md quotes another output than the example prints: {printed}")
