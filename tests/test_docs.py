"""The runnable examples in the Python docstrings (they are part of the docs) and the figures the
demo prints are checked here."""
import doctest
import re
from pathlib import Path

import pytest
import torch

import absparse
import absparse.allocation
import absparse.layout
import absparse.moa.experiment
import absparse.moa.plan
import absparse.moa.serve
import absparse.ops
import absparse.prefill
import absparse.runner
import absparse.torch_ops
import reference as ref


@pytest.mark.parametrize("module", [absparse.allocation, absparse.layout, absparse.ops,
                                    absparse.prefill, absparse.runner, absparse.torch_ops,
                                    absparse.moa.plan, absparse.moa.serve,
                                    absparse.moa.experiment], ids=lambda m: m.__name__)
def test_docstring_examples(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    globs = {"torch": torch, **{n: getattr(absparse, n) for n in absparse.__all__}}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0


def test_demo_figures_match_the_reference(capsys):
    """`absparse demo` prints the error of sparse vs dense attention, the attention recall and the
    KV bytes read: each figure recomputed here with the float64 reference on the demo's inputs
    (drawn as main() draws them; fp32 summaries, so the selection is exactly the reference's).
    Basis: out is bf16 = the float64 result rounded once, lse float32 (~1e-6); the figures are
    printed with 4 decimals, hence 2e-4."""
    from absparse.eval import demo

    args = dict(batch=2, min_len=100, max_len=700, q_heads=4, kv_heads=2, head_dim=64,
                budget=128, page_size=64, seed=3)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + ["--format=fp32"]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    num = lambda pattern: [float(x.replace(",", "")) for x in re.search(pattern, text).groups()]

    gen = torch.Generator().manual_seed(args["seed"])
    lens = torch.randint(args["min_len"], args["max_len"] + 1, (2,), generator=gen).tolist()
    q, k, v, pt, sl = demo.make_batch(lens, 4, 2, 64, 64, torch.bfloat16, gen)
    block_sizes = [8, 16]                                        # [8, 16, 32, 64][h % 4]
    assert f"seq_lens {lens}" in text and f"block sizes per KV head {block_sizes}" in text
    layout = ref.RefLayout(block_sizes, 64, "minmax", "fp32")
    init = torch.zeros(k.shape[0], layout.slots_per_page, 2, 64)
    s, _ = ref.update_centroids(k, pt, sl, torch.zeros_like(sl), layout, init)
    idx, cnt = ref.select_blocks(q, s, None, pt, sl, layout, 128)
    out, lse = ref.sparse_decode(q, k, v, pt, sl, block_sizes, idx, cnt)
    dense, lse_dense = ref.dense_decode(q, k, v, pt, sl)
    out, dense = out.to(torch.bfloat16).double(), dense.to(torch.bfloat16).double()
    err = float((out - dense).norm() / dense.norm())
    recall = torch.exp(lse - lse_dense)                          # [B, Hq] attended softmax mass
    assert num(r"output: ([\d.]+)") == pytest.approx([err], abs=2e-4)
    assert 0 < err < 1
    assert num(r"mean ([\d.]+), min ([\d.]+)") == pytest.approx(
        [float(recall.mean()), float(recall.min())], abs=2e-4)
    # Bytes: attended tokens (listed blocks + partial tail) x D x (K and V) x 2 bytes, plus one
    # fp32 minmax summary (2 x 64 x 4 bytes) per complete block, against all tokens densely.
    attended = sum(int(cnt[b, h]) * bs + L % bs for b, L in enumerate(lens)
                   for h, bs in enumerate(block_sizes))
    summaries = sum(L // bs * 512 for L in lens for bs in block_sizes)
    read, total = num(r"KV bytes read: ([\d,]+) of ([\d,]+)")
    assert (read, total) == (attended * 64 * 2 * 2 + summaries, sum(lens) * 2 * 64 * 2 * 2)
    assert read < total


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
