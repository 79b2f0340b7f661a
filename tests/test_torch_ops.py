"""The torch.library custom ops (absparse/torch_ops.py): opcheck, equality with the public
functions, and torch.compile(fullgraph=True) through the public functions.

opcheck runs each op on real CPU tensors and checks its schema (declared mutations only), its
fake implementation (output shapes, dtypes and devices equal to the real ones, also with dynamic
shapes under AOT dispatch) and that it has no autograd formula it would silently break. The ops
must give the public functions' results bit for bit (same binding, same kernels). Cases: MHA with
one block size and int8 summaries (per-vector scales), GQA with mixed block sizes and int4c
summaries (per-channel parameters), GQA with a fraction budget, softmax_sum, a zero-length
sequence and bfloat16 strided tensors.
"""
import pytest
import torch

import absparse
from absparse import torch_ops
from cases import Case, make_inputs
from conftest import lib_layout

CASES = [
    Case(seed=1, dtype=torch.float32, head_dim=32, group=1, block_sizes=(16, 16), page_size=16,
         seq_lens=(150, 97), summary="minmax", format="int8", budget=48, sink=16, local=16),
    Case(seed=2, dtype=torch.float16, head_dim=64, group=4, block_sizes=(8, 16, 32),
         page_size=32, seq_lens=(300, 33, 170), summary="cuboid", format="int4c", budget=96,
         sink=8, local=32),
    Case(seed=3, dtype=torch.bfloat16, head_dim=40, group=3, block_sizes=(32, 8), page_size=64,
         seq_lens=(0, 260), summary="mean", format="bf16", budget=0.25, sink=16, local=64,
         group_reduce="softmax_sum", noncontig=True),
]
IDS = [c.id for c in CASES]


def _setup(case):
    """(inputs, layout, summary cache filled from the whole context, selection kwargs)."""
    inp = make_inputs(case, poison=False)
    layout = lib_layout(absparse, inp.ref_layout)
    s, sc = layout.new_summary_cache(inp.num_pages, case.head_dim)
    zero = torch.zeros_like(inp.seq_lens)
    absparse.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, zero, layout, s, sc)
    sel = dict(sink_tokens=case.sink, local_tokens=case.local, group_reduce=case.group_reduce)
    return inp, layout, s, sc, sel


def _fields(layout):
    return [layout.block_sizes.tolist(), layout.page_size, layout.summary, layout.format]


def _budget_args(budget):
    return (budget, 0.0) if isinstance(budget, int) else (0, budget)


def _select_args(case, inp, layout, s, sc):
    cs, cz = layout.channel_params("cpu")
    max_blocks = absparse.default_max_blocks(inp.page_table, layout, case.budget, case.sink,
                                             case.local)
    return (inp.q, s, sc, inp.page_table, inp.seq_lens, *_fields(layout), cs, cz,
            *_budget_args(case.budget), case.sink, case.local, case.group_reduce,
            case.head_dim ** -0.5, max_blocks)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck_every_op(case):
    inp, layout, s, sc, sel = _setup(case)
    cs, cz = layout.channel_params("cpu")
    # Zeroed caches: the update really writes summaries and scales (a check of the declared
    # mutations needs a visible change).
    fresh = layout.new_summary_cache(inp.num_pages, case.head_dim)
    torch.library.opcheck(torch.ops.absparse.update_centroids.default,
                          (inp.k_cache, inp.page_table, inp.seq_lens,
                           torch.zeros_like(inp.seq_lens), *_fields(layout), *fresh, cs, cz, 0))
    args = _select_args(case, inp, layout, s, sc)
    torch.library.opcheck(torch.ops.absparse.select_blocks.default, args)
    idx, cnt = torch.ops.absparse.select_blocks(*args)
    scale = case.head_dim ** -0.5
    for return_lse in (True, False):
        torch.library.opcheck(torch.ops.absparse.sparse_decode.default,
                              (inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                               layout.block_sizes, idx, cnt, scale, return_lse))
        torch.library.opcheck(torch.ops.absparse.dense_decode.default,
                              (inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens,
                               scale, return_lse))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ops_equal_the_public_functions(case):
    inp, layout, s, sc, sel = _setup(case)
    cs, cz = layout.channel_params("cpu")
    # update_centroids from nothing: the op and the function write the same summaries.
    s_op, sc_op = layout.new_summary_cache(inp.num_pages, case.head_dim)
    zero = torch.zeros_like(inp.seq_lens)
    torch.ops.absparse.update_centroids(inp.k_cache, inp.page_table, inp.seq_lens, zero,
                                        *_fields(layout), s_op, sc_op, cs, cz, 1)
    assert torch.equal(s_op, s) and (sc is None or torch.equal(sc_op, sc))

    idx, cnt = torch.ops.absparse.select_blocks(*_select_args(case, inp, layout, s, sc))
    want_idx, want_cnt = absparse.select_blocks(inp.q, s, sc, inp.page_table, inp.seq_lens,
                                                layout, case.budget, **sel)
    assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt)
    assert idx.shape[-1] == absparse.default_max_blocks(inp.page_table, layout, case.budget,
                                                        case.sink, case.local)
    scale = case.head_dim ** -0.5
    attn = (inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens)
    out, lse = torch.ops.absparse.sparse_decode(*attn, layout.block_sizes, idx, cnt, scale, True)
    want, want_lse = absparse.sparse_decode(*attn, layout, idx, cnt, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    out, no_lse = torch.ops.absparse.dense_decode(*attn, scale, False)
    assert torch.equal(out, absparse.dense_decode(*attn)) and no_lse.shape == (0,)


def _pipeline(q, k, v, pt, sl, start, s, sc, layout, case, out):
    """update -> select -> sparse attend (into out) and dense attend, as a user would write it."""
    absparse.update_centroids(k, pt, sl, start, layout, s, sc, max_new_tokens=8)
    idx, cnt = absparse.select_blocks(q, s, sc, pt, sl, layout, case.budget,
                                      sink_tokens=case.sink, local_tokens=case.local,
                                      group_reduce=case.group_reduce)
    sparse, lse = absparse.sparse_decode(q, k, v, pt, sl, layout, idx, cnt, out=out,
                                         return_lse=True)
    return idx, cnt, sparse, lse, absparse.dense_decode(q, k, v, pt, sl, scale=0.3)


@pytest.mark.parametrize("case", CASES[1:], ids=IDS[1:])
def test_compiled_pipeline_has_no_graph_break_and_equals_eager(case):
    """torch.compile(fullgraph=True) raises on any graph break; the compiled graph holds the four
    custom ops and its results and summary updates equal eager's bit for bit."""
    inp, layout, s, sc, sel = _setup(case)
    start = torch.clamp(inp.seq_lens - 8, min=0)       # the last <= 8 tokens are "new"
    tensors = (inp.q, inp.k_cache, inp.v_cache, inp.page_table, inp.seq_lens, start)

    def run(fn):
        s0, sc0 = layout.new_summary_cache(inp.num_pages, case.head_dim)
        absparse.update_centroids(inp.k_cache, inp.page_table, start, torch.zeros_like(start),
                                  layout, s0, sc0)          # summaries of the first L - 8 tokens
        out = torch.empty_like(inp.q, memory_format=torch.contiguous_format)
        results = fn(*tensors, s0, sc0, layout, case, out)
        assert results[2] is out
        return results, s0, sc0

    eager, s_e, sc_e = run(_pipeline)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled, s_c, sc_c = run(torch.compile(_pipeline, fullgraph=True, backend=backend))
    for name in ("update_centroids", "select_blocks", "sparse_decode", "dense_decode"):
        assert any(f"absparse.{name}" in t for t in seen), (name, seen)
    for name, a, b in zip(("idx", "cnt", "sparse", "lse", "dense"), compiled, eager):
        assert torch.equal(a, b), name
    assert torch.equal(s_c, s_e) and (sc_e is None or torch.equal(sc_c, sc_e))


def test_fake_shapes_follow_the_arguments():
    """The fake implementations alone (FakeTensorMode): select_blocks' capacity is max_blocks,
    lse is [B, Hq] only when asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(5, 12, 64, dtype=torch.bfloat16)
        s = torch.empty(9, 3, 2, 64, dtype=torch.bfloat16)
        pt = torch.empty(5, 3, dtype=torch.int32)
        sl = torch.empty(5, dtype=torch.int32)
        k = torch.empty(9, 64, 3, 64, dtype=torch.bfloat16)
        idx, cnt = torch.ops.absparse.select_blocks(q, s, None, pt, sl, [8, 16, 64], 64,
                                                    "minmax", "bf16", None, None, 100, 0.0, 16,
                                                    64, "max", 0.125, 37)
        sizes = torch.empty(3, dtype=torch.int32)
        out, lse = torch.ops.absparse.sparse_decode(q, k, k, pt, sl, sizes, idx, cnt, 0.125, True)
        dout, dlse = torch.ops.absparse.dense_decode(q, k, k, pt, sl, 0.125, False)
    assert (idx.shape, idx.dtype, cnt.shape, cnt.dtype) == ((5, 3, 37), torch.int32, (5, 3),
                                                            torch.int32)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((5, 12, 64), torch.bfloat16, (5, 12),
                                                            torch.float32)
    assert dout.shape == (5, 12, 64) and dlse.shape == (0,)


def test_native_layouts_are_cached():
    a = torch_ops.native_layout((8, 16), 32, "minmax", "int8")
    assert a is torch_ops.native_layout((8, 16), 32, "minmax", "int8")
    assert list(a.slot_offsets) == absparse.LayerLayout([8, 16], 32).slot_offsets.tolist()


def test_invalid_arguments_raise_value_error_through_the_op():
    """The binding validates inside the op: a wrong dtype is a ValueError naming the argument."""
    case = CASES[0]
    inp, layout, s, sc, sel = _setup(case)
    with pytest.raises(ValueError, match="seq_lens"):
        torch.ops.absparse.dense_decode(inp.q, inp.k_cache, inp.v_cache, inp.page_table,
                                        inp.seq_lens.long(), 0.1, False)
