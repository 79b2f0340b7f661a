"""Rejected inputs on CUDA tensors raise ValueError, never crash (absparse/decode_cuda.h).

Every validation case of test_validation.py is replayed on the CUDA path. Cases whose bad value
lives in device memory (seq_lens, page-table entries, start_pos, block lists) cannot be checked
without a sync: there the kernels clamp or skip (decode_cuda.h), so the call must not raise a
ValueError. Every other case must raise the CPU path's ValueError (same argument named), and so
must the configurations the kernels do not run (head dims, groups, dtypes, strides, capacities).

Two ways to reach the CUDA path:
- without a GPU (CI), in a build with the kernels: tensors that say they live on cuda:0 (a torch
  subclass) go straight to the binding. Host checks must fire before anything touches the device;
  an input that passes them reaches the device guard, which raises RuntimeError on a machine
  without a driver. So every expected ValueError is proven to come before any CUDA call.
- on a GPU: real CUDA tensors through the public wrappers, all cases in one subprocess, so that a
  crash fails the test instead of ending the run.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_validation import CASES, _base

# Cases whose bad value is in device memory: computed as documented (clamped / skipped).
DEVICE_VALUE_CASES = ("page_table-used-", "seq_lens-negative", "seq_lens-beyond-capacity",
                      "start_pos-negative", "start_pos-past-length", "block_index-",
                      "block_count-")
# Inputs the CPU accepts but the kernels do not run: (id, op, edit of the base arguments, regex).
GPU_ONLY_CASES = [
    ("float32", "dense", "fp32", r"dtype float32 is not supported on the GPU"),
    ("head_dim-40", "dense", "d40", r"head_dim 40 is not supported on the GPU"),
    ("head_dim-96", "dense", "d96", r"head_dim 96 is not supported on the GPU"),
    ("group-32", "dense", "g32", r"q: 32 query heads per KV head are not supported"),
    ("select-max_blocks-1", "select", "max_blocks1", r"max_blocks"),
    ("select-summaries-of-mean-layout", "select", "mean_summaries", r"summaries"),
    ("select-fp16-summaries", "select", "fp16_summaries", r"summaries"),
    ("k-last-dim-stride-2", "dense", "k_stride2", r"k_cache"),
    ("k-unaligned-rows", "dense", "k_unaligned", r"k_cache: the CUDA kernels read 16-byte rows"),
]


def _device_value_case(name: str) -> bool:
    return name.startswith(DEVICE_VALUE_CASES)


def _gpu_only_edit(ab, a, what):
    """Applies one GPU_ONLY_CASES edit to the base arguments (CPU tensors); returns extra kwargs."""
    B, HQ, HK, D = a["q"].shape[0], a["q"].shape[1], a["k_cache"].shape[2], a["q"].shape[2]
    g = torch.Generator().manual_seed(1)
    if what == "fp32":
        for name in ("q", "k_cache", "v_cache"):
            a[name] = a[name].float()
    elif what in ("d40", "d96"):
        dim = 40 if what == "d40" else 96
        a["q"] = torch.randn(B, HQ, dim, generator=g).half()
        a["k_cache"] = torch.randn(*a["k_cache"].shape[:3], dim, generator=g).half()
        a["v_cache"] = torch.randn_like(a["k_cache"])
    elif what == "g32":
        a["q"] = torch.randn(B, 32, D, generator=g).half()
        a["k_cache"] = a["k_cache"][:, :, :1].contiguous()
        a["v_cache"] = a["v_cache"][:, :, :1].contiguous()
    elif what == "max_blocks1":
        return {"max_blocks": 1}
    elif what == "mean_summaries":  # mean / fp16 summaries given to a minmax / int8 layout
        a["summaries"], a["scales"] = ab.LayerLayout([8, 16], 32, "mean", "fp16").new_summary_cache(
            a["k_cache"].shape[0], D)
    elif what == "fp16_summaries":
        a["summaries"] = a["summaries"].half()
    elif what == "k_stride2":
        wide = torch.zeros(*a["k_cache"].shape[:3], 2 * D, dtype=a["k_cache"].dtype)
        wide[..., ::2] = a["k_cache"]
        a["k_cache"] = wide[..., ::2]
    elif what == "k_unaligned":  # rows 4 elements (8 bytes) apart from 16-byte boundaries
        flat = torch.zeros(a["k_cache"].numel() + 4, dtype=a["k_cache"].dtype)
        a["k_cache"] = flat[4:].view(a["k_cache"].shape)
    return {}


# ------------------------------------------------------------------------------------------------
# Without a GPU: tensors that claim cuda:0, straight to the binding
# ------------------------------------------------------------------------------------------------

class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that reports device cuda:0 to absparse's binding (is_cuda, get_device)."""

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0


def _claim(x):
    return x.as_subclass(_ClaimsCuda) if isinstance(x, torch.Tensor) else x


def _call_binding(ab, op, a, **kw):
    """The wrapper's call of the binding, with every tensor (outputs too) claiming cuda:0."""
    C = ab._C
    t = {k: (v if k == "block_sizes" else _claim(v)) for k, v in a.items()}
    layout = a["layout"]
    cs, cz = layout.channel_params("cpu")
    cs, cz = _claim(cs), _claim(cz)
    q = t["q"]
    if op == "update":
        return C.update_centroids(t["k_cache"], t["page_table"], t["seq_lens"], t["start_pos"],
                                  layout._native, t["summaries"], t["scales"], cs, cz)
    if op == "select":
        batch = q.shape[0] if q.dim() == 3 else 0
        max_blocks = kw.get("max_blocks", 64)
        idx = _claim(torch.empty(batch, layout.num_kv_heads, max_blocks, dtype=torch.int32))
        cnt = _claim(torch.empty(batch, layout.num_kv_heads, dtype=torch.int32))
        ws = _claim(torch.empty(1 << 20, dtype=torch.uint8))
        return C.select_blocks(q, t["summaries"], t["scales"], t["page_table"], t["seq_lens"],
                               layout._native, cs, cz, kw.get("token_budget", 32), 0.0, 16, 64,
                               "max", 0.125, idx, cnt, workspace=ws)
    out = _claim(torch.empty(q.shape, dtype=q.dtype))
    if op == "sparse":
        return C.decode_attention(q, t["k_cache"], t["v_cache"], t["page_table"], t["seq_lens"],
                                  a["block_sizes"], t["block_indices"], t["block_counts"], 0.125,
                                  out, None)
    return C.decode_attention(q, t["k_cache"], t["v_cache"], t["page_table"], t["seq_lens"], None,
                              None, None, 0.125, out, None)


def _host_only_build(ab):
    if not ab._C.has_cuda:
        pytest.skip("absparse was built without its CUDA kernels (no CUDA path to check)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the device-claiming tensors would reach real launches "
                    "(test_cases_on_the_gpu covers this machine)")


def _host_params():
    out = []
    for name, ops, edit, regex in CASES:
        for op in ops:
            out.append(pytest.param(op, edit, regex, _device_value_case(name), id=f"{op}-{name}"))
    return out


@pytest.mark.parametrize("op,edit,regex,device_value", _host_params())
def test_cases_raise_before_any_device_work(op, edit, regex, device_value):
    ab, a = _base()
    _host_only_build(ab)
    edit(a)
    if device_value:  # host checks pass: the call reaches the device (no driver here)
        with pytest.raises(RuntimeError, match="CUDA"):
            _call_binding(ab, op, a)
    else:
        with pytest.raises(ValueError, match=regex):
            _call_binding(ab, op, a)


@pytest.mark.parametrize("name,op,what,regex", GPU_ONLY_CASES, ids=[c[0] for c in GPU_ONLY_CASES])
def test_unsupported_configurations_raise_before_any_device_work(name, op, what, regex):
    ab, a = _base()
    _host_only_build(ab)
    kw = _gpu_only_edit(ab, a, what)
    with pytest.raises(ValueError, match=regex):
        _call_binding(ab, op, a, **kw)


def test_valid_calls_reach_the_device():
    """The base arguments pass every host check (the device guard is what stops them here)."""
    ab, a = _base()
    _host_only_build(ab)
    for op in ("update", "select", "sparse", "dense"):
        with pytest.raises(RuntimeError, match="CUDA"):
            _call_binding(ab, op, a, max_blocks=64)


def test_prefill_kernel_choice_is_checked_before_any_device_work():
    """sparse_prefill's `kernel`: what the chosen kernel cannot run raises ValueError (naming the
    argument) before any CUDA call; what it can run reaches the device."""
    from test_sparse_prefill import _base as prefill_base
    import absparse as ab
    _host_only_build(ab)
    a = prefill_base()  # blocks of 64, D 64, float16, lists per KV head

    def call(kernel, q_block=64, k_block=64, lists=None):
        idx, cnt = lists or (a["block_indices"], a["block_counts"])
        t = [_claim(a[n]) for n in ("q", "k", "v", "cu_seqlens")] + [_claim(idx), _claim(cnt)]
        out = _claim(torch.empty_like(a["q"]))
        return ab._C.sparse_prefill(*t, q_block, k_block, None, 0.125, out, None, 0, kernel)

    for kernel in ("auto", "fa2"):
        with pytest.raises(RuntimeError, match="CUDA"):
            call(kernel)
    lists128 = ab.dense_causal_block_lists(a["cu_seqlens"], 128, 128, 2)
    if ab._C.has_sm90_prefill:
        with pytest.raises(ValueError, match=r"q_block: 64 is not supported by the sm90 kernel"):
            call("sm90")
        with pytest.raises(RuntimeError, match="CUDA"):
            call("sm90", 128, 128, lists128)
    else:
        with pytest.raises(ValueError, match=r"kernel: the sm90 kernel is not in this build"):
            call("sm90", 128, 128, lists128)


def test_select_names_q_for_a_head_dim_that_does_not_match_the_summaries():
    """A query of the wrong head dim is q's error, not the summaries' (issue 10, item 5)."""
    ab, a = _base()
    a["q"] = torch.randn(a["q"].shape[0], a["q"].shape[1], 32).half()
    with pytest.raises(ValueError, match=r"select_blocks: q\.shape\[2\]: expected the head dim of "
                                         r"the summaries .* got 32"):
        ab.select_blocks(a["q"], a["summaries"], a["scales"], a["page_table"], a["seq_lens"],
                         a["layout"], 32)


def test_messages_name_no_build_path():
    ab, a = _base()
    a["q"] = a["q"][:, :3]
    with pytest.raises(ValueError) as info:
        ab.dense_decode(a["q"], a["k_cache"], a["v_cache"], a["page_table"], a["seq_lens"])
    message = str(info.value)
    assert message.startswith("dense_decode: q:")
    assert "/" not in message.split("[")[-1], message  # [file.cpp:line], no directories


# ------------------------------------------------------------------------------------------------
# On a GPU: real CUDA tensors, every case in one subprocess
# ------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, re, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_validation import CASES, _base, OPS
    from test_cuda_validation import GPU_ONLY_CASES, _device_value_case, _gpu_only_edit

    def cuda_like(t):
        # Same strides and storage offset on the GPU (t.cuda() would make strided views dense).
        storage = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
        return torch.as_strided(storage.cuda(), t.shape, t.stride(), t.storage_offset())

    def to_cuda(a):
        return {{k: (cuda_like(v) if isinstance(v, torch.Tensor) and k != "block_sizes" else v)
                 for k, v in a.items()}}

    def run(op, a, kw, regex):
        try:
            OPS[op](ab, a, **kw)
            torch.cuda.synchronize()
            return "ok"
        except ValueError as exc:
            return "ValueError" if re.search(regex, str(exc)) else "wrong message: " + str(exc)
        except Exception as exc:
            return type(exc).__name__ + ": " + str(exc)

    results = {{}}
    for name, ops, edit, regex in CASES:
        for op in ops:
            ab, a = _base()
            edit(a)
            results[op + "-" + name] = (run(op, to_cuda(a), {{}}, regex), _device_value_case(name))
            print(op, name, results[op + "-" + name], flush=True)
    for name, op, what, regex in GPU_ONLY_CASES:
        ab, a = _base()
        kw = _gpu_only_edit(ab, a, what)
        results[name] = (run(op, to_cuda(a), kw, regex), False)
        print(name, results[name], flush=True)
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cases_on_the_gpu(ab):
    if not ab._C.has_cuda:
        pytest.skip("absparse was built without its CUDA kernels")
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (f"the child process died (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS "):])
    wrong = {name: got for name, (got, device_value) in results.items()
             if got != ("ok" if device_value else "ValueError")}
    assert not wrong, f"{len(wrong)} of {len(results)} cases: {wrong}"
