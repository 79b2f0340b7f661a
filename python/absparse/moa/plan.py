"""MoA span rules: the (alpha, beta) grid, the exact multiple-choice knapsack, and the plan.

A head's span at context length ``L`` is ``S(L) = clamp(floor((c + s * L) / d), 0, L)`` with
integers ``c, s, d``; a grid point ``(alpha, beta = k / 8)`` is ``c = 8 * alpha, s = k, d = 8``.
Integers keep every span exact on the host and on the device (no float rounding in the window).
The uniform window at the same average span as a plan is ``c = sum c_h, s = sum s_h,
d = 8 * H``: it attends ``floor(mean_h (alpha_h + beta_h L))`` tokens at every ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..layout import LayerLayout, ModelLayout

__all__ = ["SINK_TOKENS", "BLOCK", "span_grid", "solve_spans", "MoAPlan", "moa_plan",
           "outside_influence"]

SINK_TOKENS = 64   # MoA's global (sink) block
BLOCK = 64         # decode block size of the windows (divides the page size 64)
_COST_GRID = 2.0 ** -40


def span_grid(lengths: Sequence[int], alpha_step: int = 1024,
              beta_steps: int = 8) -> List[Tuple[int, int]]:
    """MoA's (alpha, beta) grid as ``(alpha, k)`` pairs, ``beta = k / beta_steps``.

    ``alpha`` runs from ``-min(lengths)`` to ``max(lengths)`` every ``alpha_step`` tokens and ``k``
    from 0 to ``beta_steps``; a pair is kept when its span is positive at the shortest length and
    at most the longest length there (MoA's ``0 < S(min_len)``, ``S(max_len) <= max_len``); at
    shorter lengths a span above the length is clipped to it (``S(L) <= L`` always). Sorted by
    (alpha, k).

    Example
    -------
    >>> span_grid([1024, 2048])[:3], len(span_grid([1024, 2048]))
    ([(0, 1), (0, 2), (0, 3)], 14)
    """
    lengths = sorted(int(n) for n in lengths)
    if not lengths or lengths[0] <= 0:
        raise ValueError(f"span_grid: lengths: expected positive token counts, got {lengths}")
    lo, hi = lengths[0], lengths[-1]
    out = []
    for alpha in range(-lo, hi + 1, alpha_step):
        for k in range(beta_steps + 1):
            spans = [alpha * beta_steps + k * n for n in lengths]     # beta_steps * S(n)
            if spans[0] > 0 and spans[-1] <= beta_steps * hi:
                out.append((alpha, k))
    return out


def _weights_units(weights: np.ndarray, capacities: np.ndarray):
    """Divide each capacity dimension by the gcd of its weights (exact: ``sum w <= C`` iff
    ``sum w/g <= floor(C/g)``)."""
    w = weights.copy()
    cap = capacities.copy()
    for m in range(w.shape[-1]):
        g = int(np.gcd.reduce(w[..., m].ravel())) if w[..., m].any() else 1
        w[..., m] //= g
        cap[m] //= g
    return w, cap


def solve_spans(costs, weights, capacities) -> torch.Tensor:
    """Exact multiple-choice knapsack with several capacities: one option per head minimising the
    summed cost subject to ``sum_h weights[h, o_h, m] <= capacities[m]`` for every ``m``.

    Exact dynamic program over the integer weights (each dimension divided by the gcd of its
    weights, which keeps the constraint exact), ``O(H * O * prod_m (C_m + 1))``. Costs are summed
    exactly on a grid of ``2^-40 * max|cost|`` (Python/NumPy int64), so objectives that agree to
    ~1e-12 relative are ties. Tie rule, in order: (1) the smallest total weight
    ``sum_{h,m} weights[h, o_h, m]``; (2) the lexicographically smallest option vector
    ``(o_0, o_1, ...)`` in head order. Infeasible options: cost ``+inf``.

    Parameters
    ----------
    costs : float [H, O]; finite or +inf (option unusable for that head)
    weights : int >= 0 [O, M] (shared by all heads) or [H, O, M]
    capacities : int >= 0 [M]

    Returns
    -------
    choice : int64 [H], the option of every head

    Example
    -------
    >>> costs = torch.tensor([[3.0, 0.0], [1.0, 0.0]])   # option 0 short (loses 3 / 1), 1 long
    >>> weights = torch.tensor([[1, 1], [2, 2]])           # tokens at two lengths
    >>> solve_spans(costs, weights, torch.tensor([3, 3])).tolist()  # one long span fits: head 0's
    [1, 0]
    """
    fn = "solve_spans"
    c = torch.as_tensor(costs, dtype=torch.float64).numpy()
    w = torch.as_tensor(weights).numpy()
    cap = torch.as_tensor(capacities).numpy()
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"{fn}: costs: expected [H, O] with O >= 1, got shape {list(c.shape)}")
    H, O = c.shape
    if np.isnan(c).any() or np.isneginf(c).any():
        raise ValueError(f"{fn}: costs: expected finite values or +inf, got NaN or -inf")
    if w.ndim == 2:
        w = np.broadcast_to(w, (H,) + w.shape)
    if w.ndim != 3 or w.shape[:2] != (H, O) or not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"{fn}: weights: expected integer [O={O}, M] or [H={H}, O={O}, M], got "
                         f"{w.dtype} shape {list(w.shape)}")
    if (w < 0).any():
        raise ValueError(f"{fn}: weights: expected values >= 0, got min {w.min()}")
    M = w.shape[2]
    if cap.shape != (M,) or not np.issubdtype(cap.dtype, np.integer) or (cap < 0).any():
        raise ValueError(f"{fn}: capacities: expected int >= 0 [M={M}], got {cap.dtype} "
                         f"{cap.tolist()}")
    w = w.astype(np.int64)
    tie = w.sum(-1)                                                     # [H, O] tokens
    w, units = _weights_units(w, cap.astype(np.int64))
    cells = int(np.prod(units + 1))
    if cells * H > 2 ** 31:
        raise ValueError(f"{fn}: capacities: the DP table has {cells} cells per head (after "
                         f"dividing by the weights' gcd), too many")
    finite = np.isfinite(c)
    top = float(np.abs(c[finite]).max()) if finite.any() else 0.0
    unit = _COST_GRID * top if top > 0 else 1.0
    q = np.where(finite, np.round(np.where(finite, c, 0.0) / unit), 0).astype(np.int64)
    INF = np.int64(2 ** 62)
    shape = tuple(int(u) + 1 for u in units)
    # f_cost/f_tie[r]: best (cost, tie) of the heads after h within capacity r (vector).
    f_cost = np.zeros(shape, dtype=np.int64)
    f_tie = np.zeros(shape, dtype=np.int64)
    choice_tab = np.empty((H,) + shape, dtype=np.int16)
    for h in range(H - 1, -1, -1):
        best_c = np.full(shape, INF)
        best_t = np.full(shape, INF)
        arg = np.full(shape, -1, dtype=np.int16)
        for o in range(O):
            if not finite[h, o] or (w[h, o] > units).any():
                continue
            dst = tuple(slice(int(x), None) for x in w[h, o])
            src = tuple(slice(0, n - int(x)) for n, x in zip(shape, w[h, o]))
            cand_c = np.full(shape, INF)
            cand_t = np.full(shape, INF)
            ok = f_cost[src] < INF
            cand_c[dst] = np.where(ok, f_cost[src] + q[h, o], INF)
            cand_t[dst] = np.where(ok, f_tie[src] + tie[h, o], INF)
            # Strictly better only: among equal (cost, tie) the smallest option index stays.
            better = (cand_c < best_c) | ((cand_c == best_c) & (cand_t < best_t))
            best_c = np.where(better, cand_c, best_c)
            best_t = np.where(better, cand_t, best_t)
            arg = np.where(better, np.int16(o), arg)
        f_cost, f_tie = best_c, best_t
        choice_tab[h] = arg
    r = tuple(int(u) for u in units)
    if f_cost[r] >= INF:
        raise ValueError(f"{fn}: capacities: no option per head fits {cap.tolist()} (the "
                         f"smallest options need {w.min(1).sum(0).tolist()} in gcd units)")
    choice = np.empty(H, dtype=np.int64)
    for h in range(H):
        o = int(choice_tab[h][r])
        choice[h] = o
        r = tuple(ri - int(x) for ri, x in zip(r, w[h, o]))
    return torch.from_numpy(choice)


def _span_tokens(c: torch.Tensor, s: torch.Tensor, d: int, length: int) -> torch.Tensor:
    """S(L) of rules (c, s, d) at one length (int64, same shape as c)."""
    return torch.clamp(torch.div(c + s * length, d, rounding_mode="floor"), 0, length)


def outside_influence(influence: torch.Tensor, span: int, block: int = BLOCK,
                      sink_tokens: int = SINK_TOKENS) -> torch.Tensor:
    """Summed influence of the (query block, key block) pairs a window of ``span`` leaves out.

    influence : [..., nb, nb] block-pooled (query block, key block), causal part used.
    A window keeps, for query block ``i``, the sink blocks ``j < ceil(sink/block)`` and the band
    ``i - j < ceil(span / block)`` (the blocks holding the last ``span`` tokens of the block's last
    row, as served); the diagonal block is always kept (the decode tail).
    """
    nb = influence.shape[-1]
    i = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    band = max(1, -(-span // block))
    keep = (j <= i) & ((j < -(-sink_tokens // block)) | (i - j < band))
    causal = j <= i
    return (influence * (causal & ~keep)).sum((-2, -1))


@dataclass
class MoAPlan:
    """Per layer and KV head span rules ``S(L) = clamp(floor((const + slope L) / den), 0, L)``.

    const, slope : int64 [num_layers, Hk]; den : int > 0; sink_tokens and block (the decode
    block size; a power of two dividing the page size) are shared. ``meta`` holds the profile and
    search settings. Saved inside a :class:`ModelLayout` (``to_layout`` / ``from_layout``), whose
    LayerLayouts carry the window block size of every KV head.
    """
    const: torch.Tensor
    slope: torch.Tensor
    den: int = 8
    sink_tokens: int = SINK_TOKENS
    block: int = BLOCK
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        self.const = torch.as_tensor(self.const, dtype=torch.int64)
        self.slope = torch.as_tensor(self.slope, dtype=torch.int64)
        if self.const.dim() != 2 or self.const.shape != self.slope.shape:
            raise ValueError(f"MoAPlan: const, slope: expected equal shapes [num_layers, Hk], got "
                             f"{list(self.const.shape)} and {list(self.slope.shape)}")
        if (self.slope < 0).any():
            raise ValueError("MoAPlan: slope: expected values >= 0 (spans never shrink)")
        if not isinstance(self.den, int) or self.den <= 0:
            raise ValueError(f"MoAPlan: den: expected an int > 0, got {self.den!r}")
        b = self.block
        if not isinstance(b, int) or b < 1 or b & (b - 1):
            raise ValueError(f"MoAPlan: block: expected a power of two, got {b!r}")

    @property
    def num_layers(self) -> int:
        return self.const.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.const.shape[1]

    def spans(self, length: int) -> torch.Tensor:
        """int64 [num_layers, Hk]: S(length) of every head."""
        return _span_tokens(self.const, self.slope, self.den, int(length))

    def tokens_read(self, length: int) -> float:
        """Mean keys attended per KV head at ``length`` (sink blocks, window blocks, tail)."""
        L, b = int(length), self.block
        nb = L // b
        start = torch.div(L - self.spans(L), b, rounding_mode="floor")
        sink = min(-(-self.sink_tokens // b), nb)
        start = torch.clamp(start, min=sink)
        return float(((sink + nb - start) * b + (L - nb * b)).double().mean())

    def uniform(self) -> "MoAPlan":
        """The uniform window with this plan's average span at every length (StreamingLLM-style)."""
        n = self.const.numel()
        ones = torch.ones_like(self.const)
        return MoAPlan(ones * int(self.const.sum()), ones * int(self.slope.sum()), self.den * n,
                       self.sink_tokens, self.block, dict(self.meta, uniform=True))

    def to_layout(self, page_size: int = 64) -> ModelLayout:
        layers = [LayerLayout([self.block] * self.num_kv_heads, page_size, "mean", "bf16")
                  for _ in range(self.num_layers)]
        moa = {"const": self.const.tolist(), "slope": self.slope.tolist(), "den": self.den,
               "sink_tokens": self.sink_tokens, "block": self.block, "meta": self.meta}
        return ModelLayout(layers, {"moa": moa})

    @classmethod
    def from_layout(cls, layout: ModelLayout) -> "MoAPlan":
        d = layout.meta.get("moa")
        if d is None:
            raise ValueError("MoAPlan.from_layout: layout: expected meta['moa'] (a layout saved "
                             "by MoAPlan.save), got none")
        return cls(torch.tensor(d["const"]), torch.tensor(d["slope"]), int(d["den"]),
                   int(d["sink_tokens"]), int(d["block"]), dict(d.get("meta", {})))

    def save(self, path: Union[str, Path], page_size: int = 64) -> None:
        self.to_layout(page_size).save(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MoAPlan":
        return cls.from_layout(ModelLayout.load(path))

    def __eq__(self, other) -> bool:
        if not isinstance(other, MoAPlan):
            return NotImplemented
        return (torch.equal(self.const, other.const) and torch.equal(self.slope, other.slope) and
                (self.den, self.sink_tokens, self.block, self.meta) ==
                (other.den, other.sink_tokens, other.block, other.meta))


def moa_plan(influence: Dict[int, torch.Tensor], span_budget: Dict[int, int],
             alpha_step: int = 1024, beta_steps: int = 8, block: int = BLOCK,
             sink_tokens: int = SINK_TOKENS, meta: Optional[dict] = None) -> MoAPlan:
    """The exact MoA plan: one (alpha, beta) per layer and KV head.

    Minimises the influence left outside the windows, summed over the profiled lengths, subject
    to ``sum_heads min(S_h(N), N) <= H * span_budget[N]`` at every profiled length ``N``
    (the average span; the sink is on top of it), over :func:`span_grid` of the lengths, solved by
    :func:`solve_spans` (exact; ties as documented there, options in grid order).

    Parameters
    ----------
    influence : {N: float [num_layers, Hk, nb, nb]} block-pooled influence at length ``N``
        (``nb = ceil(N / block)``; see :mod:`absparse.moa.profile`)
    span_budget : {N: average span in tokens} for the same lengths

    Example
    -------
    >>> g = torch.Generator().manual_seed(0)
    >>> inf = {n: torch.rand(2, 2, n // 64, n // 64, generator=g) for n in (1024, 2048)}
    >>> p = moa_plan(inf, {1024: 256, 2048: 512})
    >>> p.spans(2048).float().mean().item() <= 512, p.spans(1024).float().mean().item() <= 256
    (True, True)
    """
    fn = "moa_plan"
    lengths = sorted(influence)
    if sorted(span_budget) != lengths:
        raise ValueError(f"{fn}: span_budget: expected the profiled lengths {lengths}, got "
                         f"{sorted(span_budget)}")
    grid = span_grid(lengths, alpha_step, beta_steps)
    shape = None
    for n in lengths:
        t = influence[n]
        if t.dim() != 4 or t.shape[2] != t.shape[3] or t.shape[2] != -(-n // block):
            raise ValueError(f"{fn}: influence[{n}]: expected [num_layers, Hk, {-(-n // block)}, "
                             f"{-(-n // block)}], got {list(t.shape)}")
        if shape is not None and t.shape[:2] != shape:
            raise ValueError(f"{fn}: influence[{n}]: expected {list(shape)} heads, got "
                             f"{list(t.shape[:2])}")
        shape = t.shape[:2]
    layers, hk = shape
    H = layers * hk
    const = torch.tensor([beta_steps * a for a, _ in grid], dtype=torch.int64)
    slope = torch.tensor([k for _, k in grid], dtype=torch.int64)
    costs = torch.zeros(H, len(grid), dtype=torch.float64)
    weights = torch.zeros(len(grid), len(lengths), dtype=torch.int64)
    caps = torch.zeros(len(lengths), dtype=torch.int64)
    for m, n in enumerate(lengths):
        spans = _span_tokens(const, slope, beta_steps, n)                   # [O]
        weights[:, m] = spans
        caps[m] = H * int(span_budget[n])
        flat = influence[n].double().reshape(H, *influence[n].shape[2:])
        for o, s in enumerate(spans.tolist()):
            costs[:, o] += outside_influence(flat, s, block, sink_tokens)
    choice = solve_spans(costs, weights, caps)
    info = dict(meta or {}, lengths=lengths, span_budget={str(n): int(span_budget[n])
                                                          for n in lengths},
                grid=[list(g) for g in grid], predicted_loss=float(costs.gather(
                    1, choice[:, None]).sum()))
    return MoAPlan(const[choice].view(layers, hk), slope[choice].view(layers, hk), beta_steps,
                   sink_tokens, block, info)
