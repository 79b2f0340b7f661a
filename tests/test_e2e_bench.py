"""bench/e2e_bench.py --tiny on the CPU: every mode of every shape runs, the table and the JSON
hold what the benchmark promises (a smoke test: no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ["sdpa", "absparse-dense", "uniform16", "ab-mixed"]


def test_tiny_run_reports_every_mode(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_bench.py"), "--tiny",
                           "--reps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("| B/ctx | mode | budget | step ms | attn ms |"), proc.stdout
    data = json.loads(out.read_text())
    assert {"device", "date", "torch", "command", "model"} <= set(data["meta"])
    rows = data["rows"]
    cfg = data["meta"]["model"]
    shapes = {(r["batch"], r["context"]) for r in rows}
    assert shapes == {(1, 1024), (2, 2048)}
    assert data["meta"]["dtype"] == "torch.float32"
    per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 4
    for batch, context in shapes:
        got = [(r["mode"], r["budget"]) for r in rows
               if (r["batch"], r["context"]) == (batch, context)]
        assert got == [("sdpa", None), ("absparse-dense", None), ("uniform16", 128),
                       ("ab-mixed", 128), ("uniform16", 0.04), ("ab-mixed", 0.04)]
    for r in rows:
        assert r["step_us"] > 0 and r["attention_us"] > 0 and r["tokens_per_s"] > 0
        assert r["kv_bytes"] == r["batch"] * r["context"] * per_token
        if r["budget"] is None:       # dense: every token of the context plus the new one
            assert r["attended_tokens_per_head"] == r["context"] + 1 and r["ideal_ratio"] == 1
            assert r["summary_bytes"] == 0
        else:                         # sparse: within the budget (+ a partial tail < 64 tokens)
            budget = r["budget"] if isinstance(r["budget"], int) else r["budget"] * r["context"]
            assert 0 < r["attended_tokens_per_head"] <= max(budget, 16 + 64) + 64
            assert r["summary_bytes"] > 0 and r["ideal_ratio"] > 1
        if r["mode"] == "ab-mixed":
            assert r["step_vs_uniform"] > 0
