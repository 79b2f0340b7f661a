"""Every validation error of docs/decode.md is a ValueError naming the argument.

One valid call per op is built first (`_base`); each negative case changes one thing and expects
`pytest.raises(ValueError, match=<argument name>)`. Wrong-device errors need a CUDA device and are
skipped on CPU-only machines.
"""
import math

import pytest
import torch

B, HQ, HK, D, P, NUM_PAGES = 2, 4, 2, 64, 32, 6
BLOCK_SIZES = [8, 16]


def _base(fmt="int8", summary="minmax", dtype=torch.float16):
    """Valid arguments of every op: sequences of 40 and 70 tokens in pages [3, 1] and [0, 5, 2]."""
    import absparse as ab

    g = torch.Generator().manual_seed(0)
    kw = {}
    if fmt in ("int8c", "int4c"):
        kw = dict(channel_scale=torch.full((HK, D), 0.05), channel_zero=torch.full((HK, D), -3.0))
    layout = ab.LayerLayout(BLOCK_SIZES, P, summary, fmt, **kw)
    summaries, scales = layout.new_summary_cache(NUM_PAGES, D)
    a = dict(
        q=torch.randn(B, HQ, D, generator=g).to(dtype),
        k_cache=torch.randn(NUM_PAGES, P, HK, D, generator=g).to(dtype),
        v_cache=torch.randn(NUM_PAGES, P, HK, D, generator=g).to(dtype),
        page_table=torch.tensor([[3, 1, -1], [0, 5, 2]], dtype=torch.int32),
        seq_lens=torch.tensor([40, 70], dtype=torch.int32),
        start_pos=torch.tensor([0, 0], dtype=torch.int32),
        layout=layout,
        summaries=summaries,
        scales=scales,
        block_sizes=torch.tensor(BLOCK_SIZES, dtype=torch.int32),
        # head 0 (bs 8): 5 / 8 complete blocks; head 1 (bs 16): 2 / 4
        block_indices=torch.tensor([[[0, 2, 4, -1], [1, -1, -1, -1]],
                                    [[0, 1, 7, -1], [0, 3, -1, -1]]], dtype=torch.int32),
        block_counts=torch.tensor([[3, 1], [3, 2]], dtype=torch.int32),
    )
    return ab, a


def _update(ab, a):
    ab.update_centroids(a["k_cache"], a["page_table"], a["seq_lens"], a["start_pos"], a["layout"],
                        a["summaries"], a["scales"])


def _select(ab, a, **kw):
    return ab.select_blocks(a["q"], a["summaries"], a["scales"], a["page_table"], a["seq_lens"],
                            a["layout"], kw.pop("token_budget", 32), **kw)


def _sparse(ab, a, **kw):
    return ab.sparse_decode(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seq_lens"],
                            a["block_sizes"], a["block_indices"], a["block_counts"], **kw)


def _dense(ab, a, **kw):
    return ab.dense_decode(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seq_lens"], **kw)


OPS = {"update": _update, "select": _select, "sparse": _sparse, "dense": _dense}


def test_base_calls_are_valid():
    for fmt in ("int8", "int4c", "fp16"):
        ab, a = _base(fmt)
        for op in OPS.values():
            op(ab, a)


def _strided_last(t):
    """Same values, last-dimension stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _set(name, value):
    return lambda a: a.__setitem__(name, value(a[name]) if callable(value) else value)


def _entry(name, index, value):
    def edit(a):
        t = a[name].clone()
        t[index] = value
        a[name] = t
    return edit


# (id, ops, edit of the valid arguments, regex the message must match)
CASES = [
    # dtype
    ("q-float64", ["select", "sparse", "dense"], _set("q", lambda t: t.double()), r"\bq\b"),
    ("k-dtype-mismatch", ["sparse", "dense"], _set("k_cache", lambda t: t.float()), "k_cache"),
    ("v-dtype-mismatch", ["sparse", "dense"], _set("v_cache", lambda t: t.bfloat16()), "v_cache"),
    ("k-int-dtype", ["update"], _set("k_cache", lambda t: t.to(torch.int32)), "k_cache"),
    ("page_table-int64", list(OPS), _set("page_table", lambda t: t.long()), "page_table"),
    ("seq_lens-int64", list(OPS), _set("seq_lens", lambda t: t.long()), "seq_lens"),
    ("start_pos-int64", ["update"], _set("start_pos", lambda t: t.long()), "start_pos"),
    ("summaries-dtype", ["update", "select"], _set("summaries", lambda t: t.to(torch.uint8)),
     "summaries"),
    ("scales-float64", ["update", "select"], _set("scales", lambda t: t.double()), "scales"),
    ("block_indices-int64", ["sparse"], _set("block_indices", lambda t: t.long()), "block_indices"),
    ("block_counts-int64", ["sparse"], _set("block_counts", lambda t: t.long()), "block_counts"),
    ("block_sizes-int64", ["sparse"], _set("block_sizes", lambda t: t.long()), "block_sizes"),
    # ndim
    ("q-2d", ["select", "sparse", "dense"], _set("q", lambda t: t[0]), r"\bq\b"),
    ("k-3d", list(OPS.keys() - {"select"}), _set("k_cache", lambda t: t[0]), "k_cache"),
    ("page_table-1d", list(OPS), _set("page_table", lambda t: t.flatten()), "page_table"),
    ("seq_lens-2d", list(OPS), _set("seq_lens", lambda t: t[None]), "seq_lens"),
    ("summaries-3d", ["update", "select"], _set("summaries", lambda t: t[0]), "summaries"),
    ("block_indices-2d", ["sparse"], _set("block_indices", lambda t: t[0]), "block_indices"),
    # shapes that disagree
    ("v-shape", ["sparse", "dense"], _set("v_cache", lambda t: t[:-1]), "v_cache"),
    ("k-head-dim", ["sparse", "dense"], _set("k_cache", lambda t: t[..., :32]), "k_cache"),
    ("k-num-kv-heads", ["update"], _set("k_cache", lambda t: t[:, :, :1]), "k_cache"),
    ("k-page-size-vs-layout", ["update"], _set("k_cache", lambda t: t[:, :16]), "k_cache"),
    ("hq-not-multiple", ["select", "sparse", "dense"], _set("q", lambda t: t[:, :3]), r"\bq\b"),
    ("page_table-batch", list(OPS), _set("page_table", lambda t: t[:1]), "page_table"),
    ("seq_lens-batch", list(OPS), _set("seq_lens", lambda t: t[:1]), "seq_lens"),
    ("summaries-slots", ["update", "select"], _set("summaries", lambda t: t[:, :-1]), "summaries"),
    ("summaries-R", ["update", "select"], _set("summaries", lambda t: t[:, :, :1]), "summaries"),
    ("summaries-W", ["update", "select"], _set("summaries", lambda t: t[..., :32]), "summaries"),
    ("summaries-pages", ["update"],
     lambda a: (_set("summaries", lambda t: t[:-1])(a), _set("scales", lambda t: t[:-1])(a)),
     "summaries"),
    ("scales-shape", ["update", "select"], _set("scales", lambda t: t[:, :-1]), "scales"),
    ("block_counts-shape", ["sparse"], _set("block_counts", lambda t: t[:, :1]), "block_counts"),
    ("block_indices-heads", ["sparse"], _set("block_indices", lambda t: t[:, :1]), "block_indices"),
    ("block_sizes-heads", ["sparse"], _set("block_sizes", lambda t: t[:1]), "block_sizes"),
    # non-contiguous last dimension of float tensors
    ("q-strided-last", ["select", "sparse", "dense"], _set("q", _strided_last), r"\bq\b"),
    ("k-strided-last", list(OPS.keys() - {"select"}), _set("k_cache", _strided_last), "k_cache"),
    ("v-strided-last", ["sparse", "dense"], _set("v_cache", _strided_last), "v_cache"),
    ("summaries-strided-last", ["update", "select"], _set("summaries", _strided_last), "summaries"),
    # block sizes
    ("block_size-not-pow2", ["sparse"], _set("block_sizes", torch.tensor([8, 12], dtype=torch.int32)),
     "block_sizes"),
    ("block_size-above-page", ["sparse"],
     _set("block_sizes", torch.tensor([8, 64], dtype=torch.int32)), "block_sizes"),
    ("block_size-zero", ["sparse"], _set("block_sizes", torch.tensor([8, 0], dtype=torch.int32)),
     "block_sizes"),
    # page size
    ("page-size-not-pow2", ["sparse", "dense"],
     lambda a: (_set("k_cache", lambda t: t[:, :24])(a), _set("v_cache", lambda t: t[:, :24])(a)),
     "page_size"),
    # page table: used pages must be in [0, num_pages)
    ("page_table-used-minus-one", list(OPS), _entry("page_table", (0, 1), -1), "page_table"),
    ("page_table-used-too-big", list(OPS), _entry("page_table", (1, 2), NUM_PAGES), "page_table"),
    # seq_lens
    ("seq_lens-negative", list(OPS), _entry("seq_lens", 1, -1), "seq_lens"),
    ("seq_lens-beyond-capacity", list(OPS), _entry("seq_lens", 1, 3 * P + 1), "seq_lens"),
    # start_pos
    ("start_pos-negative", ["update"], _entry("start_pos", 0, -1), "start_pos"),
    ("start_pos-past-length", ["update"], _entry("start_pos", 1, 71), "start_pos"),
    ("start_pos-batch", ["update"], _set("start_pos", lambda t: t[:1]), "start_pos|page_table|seq_lens"),
    # block lists
    ("block_index-out-of-range", ["sparse"], _entry("block_indices", (0, 1, 0), 2), "block_indices"),
    ("block_index-negative", ["sparse"], _entry("block_indices", (0, 0, 0), -1), "block_indices"),
    ("block_index-not-ascending", ["sparse"], _entry("block_indices", (1, 0, 2), 0), "block_indices"),
    ("block_index-duplicate", ["sparse"], _entry("block_indices", (1, 1, 1), 0), "block_indices"),
    ("block_count-above-capacity", ["sparse"], _entry("block_counts", (0, 0), 5), "block_counts"),
    ("block_count-above-blocks", ["sparse"],
     lambda a: (a.__setitem__("block_indices", torch.tensor(
         [[[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1, 2, 3], [0, 1, 2, 3]]], dtype=torch.int32)),
         a.__setitem__("block_counts", torch.tensor([[4, 3], [4, 4]], dtype=torch.int32))),
     "block_counts"),
    ("block_count-negative", ["sparse"], _entry("block_counts", (1, 1), -1), "block_counts"),
    # missing format-specific summaries
    ("scales-missing", ["update", "select"], _set("scales", None), "scales"),
]


def _params():
    out = []
    for name, ops, edit, regex in CASES:
        for op in ops:
            out.append(pytest.param(op, edit, regex, id=f"{op}-{name}"))
    return out


@pytest.mark.parametrize("op,edit,regex", _params())
def test_rejects(op, edit, regex):
    ab, a = _base()
    edit(a)
    with pytest.raises(ValueError, match=regex):
        OPS[op](ab, a)


@pytest.mark.parametrize("budget", [-1, 1.0, 1.5, 0.0, -0.25, float("nan"), True, "64", None])
def test_bad_token_budget(budget):
    ab, a = _base()
    with pytest.raises(ValueError, match="token_budget"):
        _select(ab, a, token_budget=budget)


@pytest.mark.parametrize("arg,value", [("group_reduce", "mean"), ("group_reduce", "MAX"),
                                       ("sink_tokens", -1), ("local_tokens", -16),
                                       ("max_blocks", -1), ("scale", float("inf")),
                                       ("scale", float("nan"))])
def test_bad_select_arguments(arg, value):
    ab, a = _base()
    with pytest.raises(ValueError, match=arg):
        _select(ab, a, **{arg: value})


def test_max_blocks_too_small():
    ab, a = _base()
    _, cnt = _select(ab, a, token_budget=48)
    tight = int(cnt.max())
    _select(ab, a, token_budget=48, max_blocks=tight)            # exactly enough is fine
    with pytest.raises(ValueError, match="max_blocks"):
        _select(ab, a, token_budget=48, max_blocks=tight - 1)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_bad_attention_scale(scale):
    ab, a = _base()
    for op in (_sparse, _dense):
        with pytest.raises(ValueError, match="scale"):
            op(ab, a, scale=scale)


def test_out_argument_checks():
    ab, a = _base()
    for op in (_sparse, _dense):
        for bad in (torch.empty(B, HQ, D, dtype=torch.float32),      # dtype
                    torch.empty(B, HQ + 1, D, dtype=torch.float16),  # shape
                    _strided_last(torch.empty(B, HQ, D, dtype=torch.float16))):  # last-dim stride
            with pytest.raises(ValueError, match="out"):
                op(ab, a, out=bad)


def test_unused_page_table_entries_are_accepted():
    """-1 and out-of-range garbage past a sequence's last used page are never read or checked."""
    ab, a = _base()
    for junk in (-1, NUM_PAGES, 2**31 - 1, -(2**31)):
        a["page_table"] = torch.tensor([[3, 1, junk], [0, 5, 2]], dtype=torch.int32)
        for op in OPS.values():
            op(ab, a)
    a["seq_lens"] = torch.tensor([0, 64], dtype=torch.int32)       # no page of sequence 0 is used
    a["page_table"] = torch.tensor([[-1, -1, -1], [0, 5, -1]], dtype=torch.int32)
    a["block_counts"] = torch.tensor([[0, 0], [3, 2]], dtype=torch.int32)
    for op in OPS.values():
        op(ab, a)


def test_errors_raise_before_any_write():
    """A bad entry in the last sequence leaves every output untouched (validation runs first)."""
    ab, a = _base(fmt="fp32")
    a["summaries"].fill_(42.0)
    a["page_table"] = torch.tensor([[3, 1, -1], [0, 5, 99]], dtype=torch.int32)
    with pytest.raises(ValueError, match="page_table"):
        _update(ab, a)
    assert (a["summaries"] == 42.0).all()
    ab, a = _base()
    out = torch.full((B, HQ, D), 7.0, dtype=torch.float16)
    a["block_indices"] = a["block_indices"].clone()
    a["block_indices"][1, 1, 1] = 9
    with pytest.raises(ValueError, match="block_indices"):
        _sparse(ab, a, out=out)
    assert (out == 7.0).all()


# ------------------------------------------------------------------------------------------------
# Layout, format and quantization arguments
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_sizes,page_size,regex", [
    ([8, 12], 32, "block_sizes"),        # not a power of two
    ([8, 64], 32, "block_sizes"),        # does not divide the page
    ([0], 32, "block_sizes"),
    ([-8], 32, "block_sizes"),
    ([], 32, "block_sizes"),
    ([8], 48, "page_size"),              # page size not a power of two
    ([8], 0, "page_size"),
])
def test_layout_rejects_bad_sizes(block_sizes, page_size, regex):
    import absparse as ab

    with pytest.raises(ValueError, match=regex):
        ab.LayerLayout(block_sizes, page_size)


def test_layout_rejects_bad_names_and_channels():
    import absparse as ab

    with pytest.raises(ValueError, match="summary"):
        ab.LayerLayout([8], 32, summary="centroid")
    with pytest.raises(ValueError, match="format"):
        ab.LayerLayout([8], 32, format="int2")
    for fmt in ("int8c", "int4c"):
        with pytest.raises(ValueError, match="channel_scale|channel_zero"):
            ab.LayerLayout([8], 32, format=fmt)                  # missing channel parameters
    good = torch.ones(1, 64)
    for scale, zero, regex in ((good * 0, good, "channel_scale"), (-good, good, "channel_scale"),
                               (good * math.inf, good, "channel_scale"),
                               (good, good * math.nan, "channel_zero"),
                               (good, torch.ones(1, 32), "channel_zero"),
                               (torch.ones(2, 64), torch.ones(2, 64), "channel_scale")):
        with pytest.raises(ValueError, match=regex):
            ab.LayerLayout([8], 32, format="int8c", channel_scale=scale, channel_zero=zero)


def test_summary_cache_head_dim():
    import absparse as ab

    layout = ab.LayerLayout([8], 32, format="int4")
    for d in (36, 0, 12):                                        # not a positive multiple of 8
        with pytest.raises(ValueError, match="head_dim"):
            layout.new_summary_cache(2, d)
    layout = ab.LayerLayout([8], 32, format="int8c", channel_scale=torch.ones(1, 64),
                            channel_zero=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="head_dim"):
        layout.new_summary_cache(2, 128)                         # D of the channel parameters


def test_quantize_arguments():
    import absparse as ab

    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="format"):
        ab.quantize(x, "int2")
    with pytest.raises(ValueError, match=r"\bx\b"):
        ab.quantize(x.double(), "int8")
    with pytest.raises(ValueError, match=r"\bx\b"):
        ab.quantize(torch.randn(3, 7), "int4")                   # odd length for a 4-bit format
    with pytest.raises(ValueError, match=r"\bx\b"):
        ab.quantize(torch.randn(3, 7), "int4c", torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match=r"\bx\b"):
        ab.quantize(_strided_last(x), "int8")
    for fmt in ("int8c", "int4c"):
        with pytest.raises(ValueError, match="channel_scale|channel_zero"):
            ab.quantize(x, fmt)
        with pytest.raises(ValueError, match="channel_zero"):
            ab.quantize(x, fmt, torch.ones(8), None)
        with pytest.raises(ValueError, match="channel_scale"):
            ab.quantize(x, fmt, torch.zeros(8), torch.zeros(8))  # scale must be > 0
        with pytest.raises(ValueError, match="channel_scale"):
            ab.quantize(x, fmt, torch.ones(5), torch.zeros(8))   # not broadcastable
    codes, scales = ab.quantize(x, "int8")
    with pytest.raises(ValueError, match="scales"):
        ab.dequantize(codes, "int8")                             # missing scales
    with pytest.raises(ValueError, match="scales"):
        ab.dequantize(codes, "int8", scales[:2])
    with pytest.raises(ValueError, match="codes"):
        ab.dequantize(codes.to(torch.uint8), "int8", scales)
    with pytest.raises(ValueError, match="channel_scale|channel_zero"):
        ab.dequantize(codes.to(torch.uint8), "int8c")


def test_layout_argument_type():
    ab, a = _base()
    a["layout"] = "minmax"
    with pytest.raises(ValueError, match="layout"):
        _update(ab, a)
    with pytest.raises(ValueError, match="layout"):
        _select(ab, a)


def test_layout_mismatch_with_tensors():
    """A layout with another Hk / P / format than the tensors it is used with."""
    import absparse as ab

    _, a = _base()
    a["layout"] = ab.LayerLayout([8, 16, 16], P)                 # three heads, cache has two
    with pytest.raises(ValueError, match="k_cache|summaries|layout"):
        _update(ab, a)
    with pytest.raises(ValueError, match="summaries|layout|q"):
        _select(ab, a)
    _, a = _base()
    a["layout"] = ab.LayerLayout(BLOCK_SIZES, P, format="int4")  # int8 cache, int4 layout
    with pytest.raises(ValueError, match="summaries"):
        _update(ab, a)
    with pytest.raises(ValueError, match="summaries"):
        _select(ab, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="wrong-device errors need a CUDA device")
def test_wrong_device():
    ab, a = _base()
    a["q"] = a["q"].cuda()
    with pytest.raises(ValueError, match=r"\bq\b|k_cache|device"):
        _dense(ab, a)


@pytest.mark.parametrize("arg,value", [("token_budget", 2**63), ("token_budget", 2**70),
                                       ("sink_tokens", 2**63 - 1), ("local_tokens", 2**63 - 1),
                                       ("sink_tokens", 2**64)])
def test_huge_counts_select_everything_or_raise_value_error(arg, value):
    """A huge (valid, >= 0) token count means "everything": either that result, or a ValueError
    naming the argument (out of the supported range); never a TypeError, overflow or crash."""
    ab, a = _base()
    kw = dict(token_budget=32)
    kw[arg] = value
    try:
        idx, cnt = _select(ab, a, **kw)
    except ValueError as e:
        assert arg in str(e)
        return
    if arg == "token_budget":
        expect = _select(ab, a, token_budget=10**9)
    else:
        expect = _select(ab, a, token_budget=32, **{arg: 10**9})
    assert torch.equal(cnt, expect[1])
    assert torch.equal(idx[..., :expect[0].shape[-1]], expect[0])


@pytest.mark.parametrize("op,name", [(op, name) for op in ("update", "select", "sparse", "dense")
                                     for name in ("q", "k_cache", "page_table", "seq_lens",
                                                  "summaries")
                                     if not (op == "update" and name == "q")
                                     and not (op == "select" and name == "k_cache")
                                     and not (op in ("sparse", "dense") and name == "summaries")])
def test_non_tensor_arguments(op, name):
    """A list where a tensor is expected: ValueError naming the argument (not AttributeError)."""
    ab, a = _base()
    a[name] = a[name].tolist()
    with pytest.raises(ValueError, match=name):
        OPS[op](ab, a)


@pytest.mark.parametrize("block_sizes,page_size,regex", [([8.5], 32, "block_sizes"),
                                                         ([8], 32.5, "page_size"),
                                                         ([2**40], 32, "block_sizes")])
def test_layout_rejects_non_int32_sizes(block_sizes, page_size, regex):
    """Sizes are ints: a fractional or out-of-int32 size is a ValueError, never silently
    truncated (LayerLayout([8.5], 32) must not become block size 8)."""
    import absparse as ab

    with pytest.raises(ValueError, match=regex):
        ab.LayerLayout(block_sizes, page_size)
