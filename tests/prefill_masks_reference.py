"""Readable float64 PyTorch reference of the prefill mask builders (docs/prefill_masks.md).

Independent of absparse: nothing here imports the library. One sequence and one head at a time,
written the obvious way with torch ops (stable sorts for the tie rule), so it can be read against
the documented algorithm line by line.

Shapes: a packed batch, sequence b owning rows [cu[b], cu[b + 1]) of q [T, Hq, D], k, v [T, Hk, D];
G = Hq // Hk; bs the block size; nb = ceil(L / bs) blocks of a sequence.
"""
import math
from typing import List, Optional, Set

import torch

F64 = torch.float64


def lengths(cu) -> List[int]:
    return [int(cu[b + 1] - cu[b]) for b in range(len(cu) - 1)]


def block_means(x: torch.Tensor, bs: int) -> torch.Tensor:
    """[L, D] -> [nb, D], a partial last block averaged over its actual rows."""
    return torch.stack([x[j:j + bs].mean(0) for j in range(0, x.shape[0], bs)]) if len(x) else \
        x.new_zeros(0, x.shape[1])


def last_block_probs(q: torch.Tensor, k: torch.Tensor, bs: int, scale: float) -> torch.Tensor:
    """q, k [L, D] float64 of one head -> [n, L] causal softmax rows of the last n = min(bs, L)
    queries (row r is position L - n + r)."""
    L = q.shape[0]
    n = min(bs, L)
    t = torch.arange(L - n, L)                                     # [n] query positions
    logits = scale * q[t] @ k.T                                    # [n, L]
    logits = logits.masked_fill(torch.arange(L)[None, :] > t[:, None], -math.inf)
    return torch.softmax(logits, dim=-1)


def vertical_slash(P: torch.Tensor, L: int):
    """[n, L] last-block probabilities -> vertical [L] and slash [L] means over the n rows."""
    n = P.shape[0]
    vertical = P.sum(0) / n
    slash = torch.zeros(L, dtype=P.dtype)
    for r in range(n):
        t = L - n + r
        d = torch.arange(t + 1)                                    # distance behind query t
        slash[d] += P[r, t - d] / n
    return vertical, slash


def pooled_softmax(qbar: torch.Tensor, kbar: torch.Tensor, scale: float, per_segment: int):
    """[nb, D] x [nb, D] -> [nb, nb]: row i softmax over j <= i (per_segment 0) or over the blocks
    of earlier segments; 0 elsewhere and in rows without an allowed block."""
    nb = qbar.shape[0]
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    allowed = j <= i if per_segment == 0 else (j // per_segment) < (i // per_segment)
    logits = (scale * qbar @ kbar.T).masked_fill(~allowed, -math.inf)
    out = torch.softmax(logits, dim=-1)
    return torch.where(allowed, out, torch.zeros_like(out))        # empty rows: NaN -> 0


def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    term = lambda x: torch.where(x > 0, x * torch.log(x / m), torch.zeros_like(x)).sum()
    return math.sqrt(float(0.5 * term(p) + 0.5 * term(q)))


def ranked(x: torch.Tensor, first: Optional[int] = None) -> torch.Tensor:
    """Indices by descending x, ties to the lower index, NaN last, `first` ranked first."""
    key = torch.nan_to_num(x.to(F64), nan=-math.inf)
    if first is not None:
        key = key.clone()
        key[first] = math.inf
    return torch.sort(key, descending=True, stable=True).indices


def coverage(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The shortest prefix of ranked(x) whose running sum reaches gamma (all if never)."""
    if gamma <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = ranked(x)
    running = torch.cumsum(torch.nan_to_num(x.to(F64)[order], nan=0.0), 0)
    hit = torch.nonzero(running >= gamma)
    k = int(hit[0]) + 1 if len(hit) else len(x)
    return order[:k]


def flexprefill(q, k, cu, bs, gamma, tau, min_budget, max_budget, scale):
    """Per (b, query head): (lists [nb sets], pattern, vertical budget, slash budget)."""
    Hq, Hk = q.shape[1], k.shape[1]
    G = Hq // Hk
    min_blocks = -(-min_budget // bs)
    out = []
    for b, L in enumerate(lengths(cu)):
        s, nb = int(cu[b]), -(-L // bs)
        heads = []
        for h in range(Hq):
            if L <= max(2 * bs, min_blocks * bs):                  # short: dense
                heads.append(([set(range(i + 1)) for i in range(nb)], 2, 0, 0))
                continue
            qs, ks = q[s:s + L, h].to(F64), k[s:s + L, h // G].to(F64)
            P = last_block_probs(qs, ks, bs, scale)
            vertical, slash = vertical_slash(P, L)
            max_blocks = min(-(-max_budget // bs), nb)
            budget = lambda x: min(max(len(coverage(x, gamma)) // bs + 1, min_blocks), max_blocks)
            nv, ns = budget(vertical), budget(slash)
            vb = torch.stack([vertical[j:j + bs].sum() for j in range(0, L, bs)])  # [nb]
            sb = torch.stack([slash[d:d + bs].sum() for d in range(0, L, bs)])     # [nb] bands
            kbar = block_means(ks, bs)
            n = min(bs, L)
            estimate = torch.softmax(scale * kbar @ qs[L - n:].mean(0), dim=0)
            pattern = 1 if js_distance(estimate, vb) < tau else 0
            if pattern == 1:
                nv = ns = max(min(min_blocks, nb), 1)
            rows = [set() for _ in range(nb)]
            for j in ranked(vb, first=0)[:nv].tolist():
                for i in range(j, nb):
                    rows[i].add(j)
            for d in ranked(sb, first=0)[:ns].tolist():
                for i in range(d, nb):
                    rows[i].add(i - d)
            if pattern == 1:
                A = pooled_softmax(block_means(qs, bs), kbar, scale, 0)
                cells = [(i, j) for i in range(nb) for j in range(i + 1)]
                flat = torch.stack([A[i, j] for i, j in cells])
                for e in coverage(flat, gamma * nb).tolist():
                    rows[cells[e][0]].add(cells[e][1])
            heads.append((rows, pattern, nv, ns))
        out.append(heads)
    return out


def pbs_positions(q, k, cu, bs, segment, scale) -> torch.Tensor:
    """int64 [T, Hk]: original position of each stored row after PBS-Attn's permutation."""
    Hq, Hk = q.shape[1], k.shape[1]
    G = Hq // Hk
    pos = torch.zeros(k.shape[0], Hk, dtype=torch.long)
    for b, L in enumerate(lengths(cu)):
        s = int(cu[b])
        complete = L // segment
        for h in range(Hk):
            p = torch.arange(L)
            if complete > 1 or (complete == 1 and L > segment):
                ks = k[s:s + L, h].to(F64)
                score = sum(last_block_probs(q[s:s + L, g].to(F64), ks, bs, scale).mean(0)
                            for g in range(h * G, (h + 1) * G)) / G
                for c in range(complete):
                    p[c * segment:(c + 1) * segment] = c * segment + ranked(
                        score[c * segment:(c + 1) * segment])
            pos[s:s + L, h] = p
    return pos


def pbs_mask(q, k_perm, cu, pos, bs, segment, threshold, force_first, scale):
    """Per (b, KV head): lists [nb sets]."""
    Hq, Hk = q.shape[1], k_perm.shape[1]
    G, per_segment = Hq // Hk, segment // bs
    out = []
    for b, L in enumerate(lengths(cu)):
        s, nb = int(cu[b]), -(-L // bs)
        heads = []
        for h in range(Hk):
            p = pos[s:s + L, h]
            kbar = block_means(k_perm[s:s + L, h].to(F64), bs)
            A = sum(pooled_softmax(block_means(q[s:s + L, g].to(F64), bs), kbar, scale,
                                   per_segment) for g in range(h * G, (h + 1) * G)) / G
            min_pos = [int(p[j * bs:(j + 1) * bs].min()) for j in range(nb)]
            rows = []
            for i in range(nb):
                last = min((i + 1) * bs, L) - 1
                off = [j for j in range(nb) if j // per_segment < i // per_segment]
                row = {off[e] for e in coverage(A[i, off], threshold).tolist()} if off else set()
                row |= {j for j in range(nb) if j // per_segment == i // per_segment
                        and min_pos[j] <= last}
                if force_first and L > 0:
                    row.add(int(torch.nonzero(p == 0)[0]) // bs)
                rows.append(row)
            heads.append(rows)
        out.append(heads)
    return out


def lists_as_sets(indices: torch.Tensor, counts: torch.Tensor) -> List[List[List[Set[int]]]]:
    return [[[set(indices[b, h, i, :counts[b, h, i]].tolist()) for i in range(indices.shape[2])]
             for h in range(indices.shape[1])] for b in range(indices.shape[0])]


def masked_attention(q, k, v, cu, indices, counts, bs, scale, key_positions=None):
    """float64 [T, Hq, D]: each query row attends the stored key rows r of its sequence in a block
    listed for its query block with position(r) <= its position (position = key_positions or r);
    a row with nothing to attend gives 0. H of the lists is Hq or Hk."""
    Hq, Hk = q.shape[1], k.shape[1]
    G, H = Hq // Hk, indices.shape[1]
    out = torch.zeros(q.shape, dtype=F64)
    for b, L in enumerate(lengths(cu)):
        s = int(cu[b])
        for h in range(Hq):
            hl, hk = (h if H == Hq else h // G), h // G
            allowed = token_mask(indices[b, hl], counts[b, hl], L, bs)      # [L, L] (t, row)
            p = torch.arange(L) if key_positions is None else key_positions[s:s + L, hk].long()
            allowed &= p[None, :] <= torch.arange(L)[:, None]
            logits = (scale * q[s:s + L, h].to(F64) @ k[s:s + L, hk].to(F64).T)
            w = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
            out[s:s + L, h] = w @ v[s:s + L, hk].to(F64)
    return out


def token_mask(indices, counts, L: int, bs: int) -> torch.Tensor:
    """bool [L, L]: query t may use stored key row r (block lists only, no causality)."""
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(-(-L // bs)):
        for j in indices[i, :counts[i]].tolist():
            mask[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    return mask
