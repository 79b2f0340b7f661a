"""absparse.eval.quality on synthetic q/k/v: recall, relative L2 error and Jaccard against an
independent float64 computation from the selected block lists; probe positions, documents and
the comparisons of the study (no model needed); and the study on the embedded model in one and in
two worker processes."""
import math

import pytest
import torch

from absparse import LayerLayout
from absparse.ops import select_blocks
from absparse.eval.quality import (_attended, layer_quality, quality_documents, quality_pairs,
                                   quality_probe_positions)

T, HK, HQ, D, P = 301, 2, 6, 16, 32              # awkward T: a partial last page and block


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, HK, D, generator=g)
    v = torch.randn(T, HK, D, generator=g)
    k[100:108] += 2.0                                               # a few keys that stand out
    q = torch.randn(5, HQ, D, generator=g)
    positions = torch.tensor([120, 150, 211, 299, 300], dtype=torch.int32)
    return q, k, v, positions


def _reference(q, k, v, positions, idx, cnt, sizes, scale):
    """float64 recall [N, Hq] and relative L2 [N, Hq] of attending exactly the listed blocks plus
    the partial tail, written from scratch (loops, no shared helper)."""
    n, hq, _ = q.shape
    group = hq // HK
    recall = torch.zeros(n, hq, dtype=torch.float64)
    l2 = torch.zeros(n, hq, dtype=torch.float64)
    for i in range(n):
        L = int(positions[i]) + 1
        for h in range(hq):
            kh = h // group
            bs = int(sizes[kh])
            keep = set()
            for j in idx[i, kh, :int(cnt[i, kh])].tolist():
                keep.update(range(j * bs, (j + 1) * bs))
            keep.update(range((L // bs) * bs, L))
            sel = torch.tensor(sorted(keep))
            logits = (k[:L, kh].double() @ q[i, h].double()) * scale     # [L]
            p = torch.softmax(logits, 0)
            recall[i, h] = p[sel].sum()
            dense = p @ v[:L, kh].double()                                # [D]
            ps = torch.softmax(logits[sel], 0)
            sparse = ps @ v[sel, kh].double()
            l2[i, h] = (sparse - dense).norm() / dense.norm()
    return recall, l2


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int4"])
def test_recall_and_l2_match_a_float64_reference(fmt):
    q, k, v, positions = _qkv()
    scale = 0.3
    lay = LayerLayout([8, 16], P, "minmax", fmt)
    res = layer_quality(q, k, v, positions, {"m": lay}, 64, sink_tokens=8, local_tokens=16,
                        scale=scale)
    # The selection is the op's own (tested elsewhere); recompute it to know the attended set.
    from absparse.eval.quality import _paged
    from absparse.ops import update_centroids

    kp = _paged(k, P)
    table = torch.arange(kp.shape[0], dtype=torch.int32)[None].expand(5, -1).contiguous()
    s, sc = lay.new_summary_cache(kp.shape[0], D)
    update_centroids(kp, table[:1], torch.tensor([T], dtype=torch.int32),
                     torch.zeros(1, dtype=torch.int32), lay, s, sc)
    idx, cnt = select_blocks(q, s, sc, table, positions + 1, lay, 64, sink_tokens=8,
                             local_tokens=16, scale=scale)
    ref_recall, ref_l2 = _reference(q, k, v, positions, idx, cnt, lay.block_sizes, scale)
    # recall: float64 softmax both sides, summation order only -> 1e-12
    assert torch.allclose(res["m"]["recall"], ref_recall, atol=1e-12, rtol=0)
    # l2: the ops' outputs are float32 (rounded once from float64), |out| ~ 1: the difference
    # carries ~2 ulp / |dense| of rounding -> 1e-6 absolute on a relative error
    assert torch.allclose(res["m"]["l2"], ref_l2, atol=1e-6, rtol=0)
    assert (ref_recall < 1 - 1e-3).any()                              # the budget binds


def test_full_budget_is_exact_and_identical_formats_agree():
    q, k, v, positions = _qkv(1)
    a = LayerLayout([8, 16], P, "minmax", "fp32")
    b = LayerLayout([8, 16], P, "minmax", "fp32")
    res = layer_quality(q, k, v, positions, {"a": a, "b": b}, 512, {"b": "a"})
    assert torch.allclose(res["a"]["recall"], torch.ones(5, HQ, dtype=torch.float64),
                          atol=1e-12, rtol=0)
    assert float(res["a"]["l2"].max()) < 1e-6                         # float32 outputs
    assert torch.equal(res["b"]["jaccard"], torch.ones(5, HK, dtype=torch.float64))
    assert "jaccard" not in res["a"]


def test_attended_mask_by_hand():
    # one probe, L = 45, heads of block 8 and 16: blocks [0, 3] and [1] listed (count 2 of 3
    # slots for head 0: the third entry is ignored)
    idx = torch.tensor([[[0, 3, 4], [1, -1, -1]]], dtype=torch.int32)
    cnt = torch.tensor([[2, 1]], dtype=torch.int32)
    m = _attended(idx, cnt, torch.tensor([8, 16]), torch.tensor([45]), 50)
    want0 = set(range(0, 8)) | set(range(24, 32)) | set(range(40, 45))   # tail from 5 * 8 = 40
    want1 = set(range(16, 32)) | set(range(32, 45))                      # tail from 2 * 16 = 32
    assert set(m[0, 0].nonzero().flatten().tolist()) == want0
    assert set(m[0, 1].nonzero().flatten().tolist()) == want1


def test_probe_positions():
    pos = quality_probe_positions(4096, 64)
    assert pos.dtype == torch.int32 and pos.numel() == 64
    assert int(pos[-1]) == 4095 and int(pos[0]) == 1024
    assert bool((pos[1:] > pos[:-1]).all())
    assert quality_probe_positions(10, 64).tolist() == list(range(2, 10))   # distinct only


class _CharTokenizer:
    """One token per character."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Out([ord(c) % 5000 for c in text])


def test_documents_are_exact_length_and_deterministic():
    tok = _CharTokenizer()
    docs = quality_documents(tok, ["essay", "noise", "prose", "code"], 2, 700)
    assert [d["kind"] for d in docs] == ["essay"] * 2 + ["noise"] * 2 + ["prose"] * 2 + ["code"] * 2
    assert all(tuple(d["ids"].shape) == (1, 700) for d in docs)
    again = quality_documents(tok, ["essay", "prose"], 2, 700)
    assert torch.equal(again[0]["ids"], docs[0]["ids"]) and torch.equal(again[2]["ids"],
                                                                        docs[4]["ids"])
    assert not torch.equal(docs[0]["ids"], docs[1]["ids"])            # seeds differ
    with pytest.raises(ValueError, match="kinds: expected kinds from"):
        quality_documents(tok, ["chronicle"], 1, 100)                  # calibration text


def test_pairs_of_the_study():
    methods = ["quest", "quest-int4c", "ab-quest", "ab-quest-int4c", "ab-quest-int4c-mem",
               "ab-mean-int8c"]
    assert quality_pairs(methods) == {
        "format": {"quest-int4c": "quest", "ab-quest-int4c": "ab-quest"},
        "adaptive": {"ab-quest": "quest"},
        "memory": {"ab-quest-int4c-mem": "quest"}}


def test_report_json_and_plot_on_hand_values(tmp_path):
    """QualityResult aggregation: a document's value is its mean over layers (NaN layers
    skipped); the paired difference is the mean of per-document differences."""
    import json

    from absparse.eval.quality import QualityResult, plot_recall, write_quality_report

    nan = math.nan
    # 3 documents x 2 layers; quest recall per doc = 0.5, 0.6, 0.7; ab-quest = quest + 0.1
    quest = torch.tensor([[0.4, 0.6], [0.6, 0.6], [0.7, nan]], dtype=torch.float64)
    values = {"quest": {"4%": {"recall": quest, "l2": quest / 10,
                               "jaccard": torch.full((3, 2), nan, dtype=torch.float64)}},
              "ab-quest": {"4%": {"recall": quest + 0.1, "l2": quest / 20,
                                  "jaccard": torch.full((3, 2), nan, dtype=torch.float64)}}}
    docs = [{"kind": "essay", "seed": i} for i in range(3)]
    res = QualityResult(["quest", "ab-quest"], [0.04], docs, values,
                        quality_pairs(["quest", "ab-quest"]),
                        {"num_docs": 3, "doc_length": 512, "probes_per_doc": 4, "probes_total": 12,
                         "num_layers": 2})
    assert res.doc_means("quest", "4%", "recall").tolist() == pytest.approx([0.5, 0.6, 0.7])
    d = res.diff("ab-quest", "quest", "4%")
    assert d["delta"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1)   # constant diff
    text = write_quality_report(res, tmp_path / "quality.md")
    assert "| quest | 60.00 [" in text and "| ab-quest - quest | AB-Sparse bf16" in text
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["summary"]["ab-quest"]["4%"]["recall"]["mean"] == pytest.approx(0.7)
    assert data["differences"]["adaptive"]["ab-quest - quest"]["4%"]["delta"] == \
        pytest.approx(0.1)
    back = QualityResult.from_json(data)
    assert back.budgets == [0.04] and back.diff("ab-quest", "quest", "4%") == d
    colors = plot_recall(res, tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    # every method its own colour (methods of one base used to share one)
    assert set(colors) == {"quest", "ab-quest", "ab-quest - quest"}
    assert colors["quest"] != colors["ab-quest"]


@pytest.mark.full
def test_measure_quality_does_not_depend_on_the_workers(lm):
    """The study on the embedded model, in one process and in two forked workers (one document
    each): the same per-document, per-layer values bit for bit, NaN where a metric does not
    apply."""
    from absparse.eval.model_calibration import calibrate
    from absparse.eval.quality import measure_quality

    model, tok = lm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cal = calibrate(model, tok, 1, 256, [64], num_probes=8)
        docs = quality_documents(tok, ["essay", "code"], 1, 256)
        methods = ["quest", "ab-quest", "ab-quest-int4c"]
        runs = [measure_quality(model, tok, cal, docs, [64], methods, num_probes=6,
                                workers=w) for w in (1, 2)]
    finally:
        torch.set_num_threads(threads)
    assert [r.meta["workers"] for r in runs] == [1, 2]
    for m in methods:
        for metric in ("recall", "l2", "jaccard"):
            a, b = (r.values[m]["64"][metric] for r in runs)
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
                torch.nan_to_num(a), torch.nan_to_num(b)), (m, metric)
    recall = runs[0].values["ab-quest"]["64"]["recall"]
    assert 0 < recall.min() <= recall.max() <= 1                   # a share of the softmax mass
    assert not torch.isnan(runs[0].values["ab-quest-int4c"]["64"]["jaccard"]).any()
