"""LayerLayout properties and summary caches; ModelLayout JSON round trip."""
import json

import pytest
import torch

import reference as ref
from conftest import assert_bitwise_equal

LAYOUTS = [  # (block_sizes, page_size)
    ([16], 16),
    ([8, 16, 32, 64], 64),
    ([128, 8, 128], 128),
    ([16, 16, 64, 32, 8, 8, 128, 256], 256),
    ([8, 8], 8),
]
CODE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "int8": torch.int8, "int4": torch.uint8, "int8c": torch.uint8, "int4c": torch.uint8}


@pytest.mark.parametrize("block_sizes,page_size", LAYOUTS)
def test_slots_and_offsets(ab, block_sizes, page_size):
    layout = ab.LayerLayout(block_sizes, page_size)
    r = ref.RefLayout(block_sizes, page_size)
    assert layout.page_size == page_size
    assert layout.num_kv_heads == len(block_sizes)
    assert layout.block_sizes.dtype == torch.int32
    assert layout.block_sizes.tolist() == block_sizes
    assert layout.slots_per_page == r.slots_per_page
    assert layout.slot_offsets.dtype == torch.int32
    assert layout.slot_offsets.tolist() == r.slot_offsets
    assert layout.summary == "minmax" and layout.format == "int8"  # defaults
    assert layout.summary_vectors == 2


def test_worked_example(ab):
    # P = 64, bs = [16, 64]: head 0 owns 4 slots [0, 4), head 1 one slot [4, 5).
    layout = ab.LayerLayout([16, 64], page_size=64)
    assert layout.slots_per_page == 5
    assert layout.slot_offsets.tolist() == [0, 4]


def test_block_sizes_as_tensor(ab):
    layout = ab.LayerLayout(torch.tensor([32, 8], dtype=torch.int32), 32, "mean", "fp16")
    assert layout.block_sizes.tolist() == [32, 8]
    assert layout.slots_per_page == 1 + 4
    assert layout.summary_vectors == 1


@pytest.mark.parametrize("summary", ref.SUMMARIES)
@pytest.mark.parametrize("fmt", ref.FORMATS)
def test_new_summary_cache(ab, summary, fmt):
    d, hk = 40, 3
    kwargs = {}
    if fmt in ("int8c", "int4c"):
        kwargs = dict(channel_scale=torch.ones(hk, d), channel_zero=torch.zeros(hk, d))
    layout = ab.LayerLayout([8, 32, 16], 32, summary=summary, format=fmt, **kwargs)
    summaries, scales = layout.new_summary_cache(7, d)
    R = 1 if summary == "mean" else 2
    W = d // 2 if fmt in ("int4", "int4c") else d
    S = 4 + 1 + 2
    assert summaries.shape == (7, S, R, W)
    assert summaries.dtype == CODE_DTYPES[fmt]
    assert summaries.device.type == "cpu"
    if fmt in ("int8", "int4"):
        assert scales is not None and scales.shape == (7, S, R) and scales.dtype == torch.float32
    else:
        assert scales is None


def _channel(hk, d, seed):
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(hk, d, generator=g) * 0.1 + 1e-3).to(torch.float32)  # awkward float32s
    zero = (torch.randn(hk, d, generator=g) * 3).to(torch.float32)
    scale[0, 0] = 2.0**-126                                      # smallest normal
    zero[0, 1] = -0.0
    return scale, zero


def test_model_layout_json_round_trip(ab, tmp_path):
    cs, cz = _channel(2, 40, 1)
    layers = [
        None,
        None,
        ab.LayerLayout([16, 64], 64, "minmax", "int8"),
        ab.LayerLayout([8, 128], 128, "cuboid", "int4c", channel_scale=cs, channel_zero=cz),
        ab.LayerLayout([32], 32, "mean", "bf16"),
        None,
    ]
    meta = {"model": "llama-demo", "calibration": {"samples": 64, "budget": 0.125,
                                                  "datasets": ["a", "b"]}, "note": None}
    model = ab.ModelLayout(layers, meta=meta)
    path = tmp_path / "layout.json"
    model.save(path)
    json.loads(path.read_text())                                 # a valid JSON document
    loaded = ab.ModelLayout.load(path)
    assert len(loaded) == len(layers)
    assert loaded.meta == meta
    assert loaded == model
    for i, layer in enumerate(layers):
        got = loaded[i]
        if layer is None:
            assert got is None
            continue
        assert got.block_sizes.tolist() == layer.block_sizes.tolist()
        assert got.page_size == layer.page_size
        assert got.summary == layer.summary and got.format == layer.format
        assert got.slots_per_page == layer.slots_per_page
        assert got.slot_offsets.tolist() == layer.slot_offsets.tolist()
    got = loaded[3]
    assert got.channel_scale.dtype == torch.float32 and got.channel_zero.dtype == torch.float32
    assert_bitwise_equal(got.channel_scale, cs, "channel_scale")  # float32 exact (and -0.0 kept)
    assert_bitwise_equal(got.channel_zero, cz, "channel_zero")
    assert loaded[2].channel_scale is None
    again = ab.ModelLayout.from_dict(loaded.to_dict())
    assert again == model


def test_model_layout_all_dense_and_empty_meta(ab, tmp_path):
    model = ab.ModelLayout([None, None])
    path = tmp_path / "dense.json"
    model.save(path)
    loaded = ab.ModelLayout.load(str(path))
    assert len(loaded) == 2 and loaded[0] is None and loaded[1] is None
    assert loaded.meta == {}


def test_loaded_layout_runs_identically(ab, tmp_path):
    """A layout that went through JSON computes the same summaries as the original."""
    cs, cz = _channel(1, 64, 2)
    layout = ab.LayerLayout([16], 16, "cuboid", "int8c", channel_scale=cs, channel_zero=cz)
    ab.ModelLayout([layout]).save(tmp_path / "m.json")
    loaded = ab.ModelLayout.load(tmp_path / "m.json")[0]
    k = torch.randn(2, 16, 1, 64, generator=torch.Generator().manual_seed(0))
    pt = torch.tensor([[1, 0]], dtype=torch.int32)
    L, start = torch.tensor([32], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    outs = []
    for lay in (layout, loaded):
        s, sc = lay.new_summary_cache(2, 64)
        ab.update_centroids(k, pt, L, start, lay, s, sc)
        outs.append(s)
    assert_bitwise_equal(outs[0], outs[1], "summaries")
