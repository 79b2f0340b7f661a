"""The runnable examples in the Python docstrings are checked here (they are part of the docs)."""
import doctest

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
