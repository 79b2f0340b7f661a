"""Seeded test configurations, generated once and tiered (quick: default run, full: -m full).

A Case fixes everything about one decode step (shapes, dtypes, layout, lengths, budget); make_inputs
turns it into tensors. Lists are built deterministically from fixed seeds so that a failing case id
can be rerun alone (pytest -k <id>).

Cases are built to rank: lengths leave every head several candidates beyond its sink and local
blocks and the budget is chosen so that most (sequence, KV head) pairs select some but not all of
them (0 < k < candidates), since a pair that keeps everything or nothing never reads a score.
test_select_blocks.py::test_case_lists_rank checks this across summary x format, group size x
reduction, dtype and budget kind.
"""
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

from reference import FORMATS, QMAX, SUMMARIES, RefLayout, plan_selection

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128, 256, 40)
GROUPS = (1, 2, 3, 4, 8, 16)
PAGE_SIZES = (16, 32, 64, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128)
DTYPE_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    seed: int
    dtype: torch.dtype
    head_dim: int
    group: int                      # G = Hq / Hk
    block_sizes: Tuple[int, ...]    # [Hk]
    page_size: int
    seq_lens: Tuple[int, ...]       # [B]
    summary: str = "minmax"
    format: str = "int8"
    budget: Union[int, float] = 128
    sink: int = 16
    local: int = 64
    group_reduce: str = "max"
    noncontig: bool = False         # strided q / caches / page table / seq_lens
    stale_entries: bool = False     # unused page-table entries hold garbage instead of -1
    extra_pages: int = 2            # pool pages that no sequence uses (poisoned with NaN)
    extra_cols: int = 1             # page-table columns beyond the longest sequence
    tier: str = "quick"

    @property
    def num_kv_heads(self) -> int:
        return len(self.block_sizes)

    @property
    def num_q_heads(self) -> int:
        return self.group * self.num_kv_heads

    @property
    def id(self) -> str:
        bs = "-".join(map(str, self.block_sizes))
        return (f"s{self.seed}-{DTYPE_NAME[self.dtype]}-D{self.head_dim}-G{self.group}"
                f"-P{self.page_size}-bs{bs}-B{len(self.seq_lens)}-{self.summary}-{self.format}"
                f"-{self.group_reduce}{'-nc' if self.noncontig else ''}")


@dataclass
class Inputs:
    q: torch.Tensor                 # [B, Hq, D]
    k_cache: torch.Tensor           # [num_pages, P, Hk, D]
    v_cache: torch.Tensor           # [num_pages, P, Hk, D]
    page_table: torch.Tensor        # int32 [B, max_pages]
    seq_lens: torch.Tensor          # int32 [B]
    ref_layout: RefLayout
    num_pages: int
    channel_scale: Optional[torch.Tensor] = None  # float32 [Hk, D]
    channel_zero: Optional[torch.Tensor] = None   # float32 [Hk, D]
    keep: list = field(default_factory=list)      # base tensors the strided views point into


# (sink_tokens, local_tokens) pairs; every one leaves candidates to rank in long enough sequences.
WINDOWS = ((16, 64), (16, 64), (0, 0), (0, 64), (32, 0), (8, 128), (64, 16))


def _kept_blocks(bs: int, sink: int, local: int) -> int:
    """Sink plus local blocks of a long sequence (docs/decode.md: ceil(sink/bs) + ceil(local/bs))."""
    return -(-sink // bs) + -(-local // bs)


def ranks(seq_len: int, block_size: int, budget, sink: int, local: int) -> bool:
    """Whether selection has a choice to make: 0 < k < candidates (else nothing is scored)."""
    plan = plan_selection(seq_len, block_size, budget, sink, local)
    return 0 < plan.num_selected < len(plan.candidates)


def ranking_share(case: "Case") -> float:
    """Share of the case's (sequence, KV head) pairs that rank."""
    pairs = [(L, bs) for L in case.seq_lens for bs in case.block_sizes]
    return sum(ranks(L, bs, case.budget, case.sink, case.local) for L, bs in pairs) / len(pairs)


def _block_sizes(rng: random.Random, hk: int, page_size: int):
    """Hk block sizes <= page_size, within a factor 8 of each other (so one length ranks them
    all without hundreds of blocks at the smallest size)."""
    allowed = [bs for bs in BLOCK_SIZES if bs <= page_size]
    while True:
        sizes = tuple(rng.choice(allowed) for _ in range(hk))
        if max(sizes) <= 8 * min(sizes):
            return sizes


def _seq_lens(rng: random.Random, block_sizes, page_size: int, sink: int, local: int, batch: int):
    """`batch` long lengths (every head keeps >= 6 candidates beyond sink and local) at random
    offsets within blocks and pages, and in half the cases one more sequence of an edge length
    (0, 1, around a block or page boundary, or 0/1 candidates left)."""
    shortest = max((_kept_blocks(bs, sink, local) + 6) * bs for bs in block_sizes)
    span = rng.choice([1, 2, 4]) * max(block_sizes)
    lens = [rng.randint(shortest, shortest + span) for _ in range(batch)]
    if rng.random() < 0.5:
        bs = rng.choice(block_sizes)
        few = (_kept_blocks(bs, sink, local) + 1) * bs           # one candidate left
        lens.insert(rng.randrange(batch + 1), rng.choice([0, 1, bs - 1, bs + 1, page_size,
                                                          page_size + 1, few - 1, few]))
    return tuple(lens)


def _budget(rng: random.Random, seq_lens, block_sizes, sink: int, local: int):
    """A token count or a fraction of L: of 12 random draws, the one under which most pairs rank,
    and among those the one that selects closest to half the candidates (the sharpest test)."""
    if rng.random() < 0.5:
        draws = [rng.randint(1, max(seq_lens)) for _ in range(12)]
    else:
        draws = [round(rng.uniform(0.05, 0.95), 2) for _ in range(12)]

    def merit(budget):
        plans = [plan_selection(L, bs, budget, sink, local) for L in seq_lens for bs in block_sizes]
        ranking = [p.num_selected / len(p.candidates) for p in plans
                   if 0 < p.num_selected < len(p.candidates)]
        half = sum(abs(f - 0.5) for f in ranking) / max(len(ranking), 1)
        return len(ranking), -half

    return max(draws, key=merit)                                 # the first best draw


def _make_case(seed: int, summary: str, fmt: str, group: int, reduce: str, tier: str,
               max_batch: int) -> Case:
    rng = random.Random(seed)
    hk = rng.choice([1, 2]) if group >= 8 else rng.choice([1, 2, 3, 4])
    page_size = rng.choice(PAGE_SIZES)
    block_sizes = _block_sizes(rng, hk, page_size)
    sink, local = rng.choice(WINDOWS)
    seq_lens = _seq_lens(rng, block_sizes, page_size, sink, local, rng.randint(1, max_batch))
    return Case(
        seed=seed,
        dtype=DTYPES[(seed // 3) % len(DTYPES)],
        head_dim=HEAD_DIMS[(seed // 2) % len(HEAD_DIMS)],
        group=group,
        block_sizes=block_sizes,
        page_size=page_size,
        seq_lens=seq_lens,
        summary=summary,
        format=fmt,
        budget=_budget(rng, seq_lens, block_sizes, sink, local),
        sink=sink,
        local=local,
        group_reduce=reduce,
        noncontig=rng.random() < 0.5,
        stale_entries=rng.random() < 0.5,
        extra_pages=rng.choice([0, 1, 3]),
        extra_cols=rng.choice([0, 1, 2]),
        tier=tier,
    )


def _generate():
    """Quick: every (summary, format) pair once, group sizes in turn, each group with both
    reductions. Full: every pair three more times, each time with another group size (so a pair
    meets four of the six), reductions alternating in pairs."""
    combos = list(itertools.product(SUMMARIES, FORMATS))        # 21
    reduces = ("max", "softmax_sum")
    quick = [_make_case(1000 + i, summary, fmt, GROUPS[i % len(GROUPS)],
                        reduces[(i // len(GROUPS)) % 2], "quick", max_batch=3)
             for i, (summary, fmt) in enumerate(combos)]
    full = []
    for rep in range(3):
        for i, (summary, fmt) in enumerate(combos):
            full.append(_make_case(5000 + 100 * rep + i, summary, fmt,
                                   GROUPS[(i + rep + 1) % len(GROUPS)], reduces[(i // 2) % 2],
                                   "full", max_batch=4))
    return quick, full


QUICK_CASES, FULL_CASES = _generate()


def case_params(cases=None):
    """pytest.param list: quick cases unmarked, full cases marked `full`."""
    import pytest

    if cases is None:
        cases = QUICK_CASES + FULL_CASES
    return [pytest.param(c, id=c.id, marks=(pytest.mark.full,) if c.tier == "full" else ())
            for c in cases]


# ------------------------------------------------------------------------------------------------
# Tensor construction
# ------------------------------------------------------------------------------------------------

def make_channel_params(gen: torch.Generator, hk: int, d: int, fmt: str, chan_mean, chan_std):
    """Calibration-like per-channel scale/zero float32 [Hk, D]: a range of about +-2.5 std around
    the channel mean, so box summaries (which reach further) saturate now and then."""
    qmax = QMAX[fmt]
    jitter = 0.8 + 0.4 * torch.rand(hk, d, generator=gen)       # [Hk, D]
    lo = chan_mean - 2.5 * chan_std * jitter                     # [Hk, D]
    hi = chan_mean + 2.5 * chan_std * jitter                     # [Hk, D]
    scale = ((hi - lo) / qmax).to(torch.float32)                 # [Hk, D] > 0
    zero = lo.to(torch.float32)                                  # [Hk, D]
    return scale.contiguous(), zero.contiguous()


def make_inputs(case: Case, poison: bool = True) -> Inputs:
    """Random paged decode inputs for a case.

    Pages are a shuffled pool; unused page-table entries hold -1 (or garbage when
    case.stale_entries). With poison, every cache element outside tokens [0, L_b) of some sequence
    is NaN, so reading it shows up in the results.
    """
    gen = torch.Generator().manual_seed(case.seed)
    rng = random.Random(case.seed * 7919 + 1)
    B, Hk, G, D, P = len(case.seq_lens), case.num_kv_heads, case.group, case.head_dim, case.page_size
    Hq = Hk * G
    used = [-(-L // P) for L in case.seq_lens]                   # pages per sequence
    num_pages = sum(used) + case.extra_pages
    max_pages = max(used + [0]) + case.extra_cols
    max_pages = max(max_pages, 1)

    # Keys with per-channel offsets and spreads (like post-RoPE keys), values plain normal.
    chan_mean = torch.randn(Hk, D, generator=gen, dtype=torch.float64) * 0.5  # [Hk, D]
    chan_std = 0.5 + torch.rand(Hk, D, generator=gen, dtype=torch.float64)    # [Hk, D]
    kv = torch.randn(num_pages, 2, P, Hk, D, generator=gen, dtype=torch.float64)  # [N, 2, P, Hk, D]
    kv[:, 0] = kv[:, 0] * chan_std + chan_mean
    kv = kv.to(case.dtype)

    perm = torch.randperm(num_pages, generator=gen).tolist()
    page_table = torch.full((B, max_pages), -1, dtype=torch.int32)  # [B, max_pages]
    live = torch.zeros(num_pages, P, dtype=torch.bool)           # [N, P] tokens some sequence holds
    nxt = 0
    for b, L in enumerate(case.seq_lens):
        for i in range(used[b]):
            page = perm[nxt]
            nxt += 1
            page_table[b, i] = page
            live[page, :min(P, L - i * P)] = True
        if case.stale_entries:
            for i in range(used[b], max_pages):
                page_table[b, i] = rng.choice([-7, num_pages, num_pages + 1000, 2**31 - 1,
                                               perm[rng.randrange(num_pages)] if num_pages else 0])
    if poison:
        kv.transpose(1, 2)[~live] = float("nan")                 # [N, P, 2, Hk, D] view: dead tokens

    q_full = torch.randn(B, Hq, D, generator=gen, dtype=torch.float64).to(case.dtype)  # [B, Hq, D]
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32)    # [B]

    keep = []
    if case.noncontig:
        k_cache, v_cache = kv[:, 0], kv[:, 1]                    # [N, P, Hk, D] strided views
        wide = torch.zeros(Hq, B, D + 8, dtype=case.dtype)       # [Hq, B, D + 8]
        wide[:, :, :D] = q_full.transpose(0, 1)
        q = wide[:, :, :D].transpose(0, 1)                       # [B, Hq, D] strides (D+8, B*(D+8), 1)
        pt_t = page_table.t().contiguous()                       # [max_pages, B]
        page_table = pt_t.t()                                    # [B, max_pages] column-major
        sl2 = torch.stack([seq_lens, torch.full_like(seq_lens, -5)], dim=1)  # [B, 2]
        seq_lens = sl2[:, 0]                                     # [B] stride 2
        keep += [kv, wide, pt_t, sl2]
    else:
        k_cache, v_cache = kv[:, 0].contiguous(), kv[:, 1].contiguous()
        q = q_full.contiguous()

    cs = cz = None
    if case.format in ("int8c", "int4c"):
        cs, cz = make_channel_params(gen, Hk, D, case.format, chan_mean, chan_std)
    layout = RefLayout(list(case.block_sizes), P, case.summary, case.format, cs, cz)
    return Inputs(q, k_cache, v_cache, page_table, seq_lens, layout, num_pages, cs, cz, keep)


def start_positions(case: Case, mode: str) -> torch.Tensor:
    """int32 [B] start positions: 'zero' (after prefill), 'last' (L-1 after one append, 0 if L=0),
    'full' (L: nothing to do) or 'random' in [0, L]."""
    rng = random.Random(case.seed + 17)
    out = []
    for L in case.seq_lens:
        if mode == "zero":
            out.append(0)
        elif mode == "last":
            out.append(max(L - 1, 0))
        elif mode == "full":
            out.append(L)
        else:
            out.append(rng.randint(0, L))
    return torch.tensor(out, dtype=torch.int32)


def default_max_blocks(max_pages: int, page_size: int, block_sizes) -> int:
    return math.ceil(max_pages * page_size / min(block_sizes))


# ------------------------------------------------------------------------------------------------
# Summary caches and block lists
# ------------------------------------------------------------------------------------------------

SENTINEL_FLOAT = -1234.5      # exactly representable in fp32 / fp16 / bf16
SENTINEL_BYTE = 0xA5          # int8 storage reads it as -91
SENTINEL_SCALE = -3.25


def sentinel_summary_cache(layout: RefLayout, num_pages: int, head_dim: int, nan: bool = False):
    """(summaries [num_pages, S, R, W], scales [num_pages, S, R] | None) filled with sentinels
    (NaN instead for the float formats and the scales when nan=True)."""
    from reference import summary_storage_dtype, summary_width

    shape = (num_pages, layout.slots_per_page, layout.summary_vectors)
    dtype = summary_storage_dtype(layout.format)
    width = summary_width(layout.format, head_dim)
    if dtype.is_floating_point:
        summaries = torch.full(shape + (width,), math.nan if nan else SENTINEL_FLOAT, dtype=dtype)
    else:
        summaries = torch.full(shape + (width,), SENTINEL_BYTE, dtype=torch.uint8).view(dtype)
    scales = None
    if layout.format in ("int8", "int4"):
        scales = torch.full(shape, math.nan if nan else SENTINEL_SCALE, dtype=torch.float32)
    return summaries, scales


def random_block_lists(case: Case, seed: int, max_blocks: int, fill: str = "random"):
    """Any valid block lists: int32 [B, Hk, max_blocks] ascending, padded -1, and counts [B, Hk].

    fill: 'random' (random subsets), 'all' (every complete block), 'none' (empty lists).
    """
    gen = torch.Generator().manual_seed(seed)
    B, Hk = len(case.seq_lens), case.num_kv_heads
    indices = torch.full((B, Hk, max_blocks), -1, dtype=torch.int32)  # [B, Hk, M]
    counts = torch.zeros(B, Hk, dtype=torch.int32)                    # [B, Hk]
    for b, L in enumerate(case.seq_lens):
        for h, bs in enumerate(case.block_sizes):
            n = L // bs
            if fill == "all":
                chosen = list(range(n))
            elif fill == "none":
                chosen = []
            else:
                keep = torch.rand(n, generator=gen) < float(torch.rand(1, generator=gen))
                chosen = torch.nonzero(keep).flatten().tolist()
            chosen = chosen[:max_blocks]
            counts[b, h] = len(chosen)
            indices[b, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return indices, counts


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (reversed dimension order in memory)."""
    base = t.permute(*reversed(range(t.dim()))).contiguous()
    return base.permute(*reversed(range(t.dim())))


def strided_summary_cache(summaries: torch.Tensor, scales):
    """The same summary cache in non-contiguous views: summaries [N, S, R, W] inside a
    [S, N, R, W + 3] buffer (last dim stays contiguous, as docs/decode.md requires), scales
    [N, S, R] with fully reversed strides (integer/scale tensors take any strides)."""
    N, S, R, W = summaries.shape
    buf = torch.zeros(S, N, R, W + 3, dtype=summaries.dtype)     # [S, N, R, W + 3]
    view = buf.transpose(0, 1)[..., :W]                          # [N, S, R, W]
    view.copy_(summaries)
    sview = None if scales is None else strided_copy(scales)     # [N, S, R] strides (1, N, N*S)
    return view, sview
