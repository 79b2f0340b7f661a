"""MoA profiling: block-pooled attention influence on the model's own answers, per KV head.

For every calibration sample (chronicle filler with retrieval needles, seeds disjoint from the
evaluation; :func:`absparse.eval.tasks.calibration_texts`) the dense model first answers greedily;
the loss ``L`` is the NLL of that answer given the prompt (MoA's "model alignment" with a response
mask). One forward/backward in float32 through an eager attention function that keeps the
attention matrix ``A [Hq, T, T]`` of each layer and, in a gradient hook on ``A``, reduces
``dL/dA`` at once to MoA's first-order influence of masking each entry

    E_ij = -A_ij (dL/dA_ij - sum_n A_in dL/dA_in) / (1 - A_ij)

(softmax renormalisation included; ``1 - A`` clamped at 1e-6, where the numerator vanishes too),
then to ``sum |E|`` over 64 x 64 (query block, key block) tiles and the max over the query heads of
each KV head. Only the pooled ``[Hk, nb, nb]`` survives the hook; autograd still holds every
layer's ``A`` until the backward reaches it, which bounds the sample length on a CPU.

``mode="mass"`` is the gradient-free proxy: the same pooling of ``A`` itself (attention mass).
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from typing import Dict, Optional, Sequence

import torch

__all__ = ["profile_influence", "spearman", "compare_profiles"]

_IMPL = "absparse_moa_profile"
_state: Optional[dict] = None


def _pool(x: torch.Tensor, block: int, hk: int) -> torch.Tensor:
    """[Hq, T, T] -> float64 [Hk, nb, nb]: tile sums, max over each KV head's query heads."""
    hq, T, _ = x.shape
    nb = -(-T // block)
    pad = nb * block - T
    if pad:
        x = torch.nn.functional.pad(x, (0, pad, 0, pad))
    tiles = x.view(hq, nb, block, nb, block).sum((2, 4), dtype=torch.float64)   # [Hq, nb, nb]
    return tiles.view(hk, hq // hk, nb, nb).amax(1)


def _accumulate(layer: int, pooled: torch.Tensor) -> None:
    acc = _state["acc"]
    acc[layer] = pooled if layer not in acc else acc[layer] + pooled


def _grad_hook(a: torch.Tensor, layer: int, hk: int):
    def hook(g: torch.Tensor):
        with torch.no_grad():
            A, g = a[0], g[0].float()                                        # [Hq, T, T]
            row = (A * g).sum(-1, keepdim=True)                              # [Hq, T, 1]
            E = (A * (g - row) / torch.clamp(1.0 - A, min=1e-6)).abs_()
            _accumulate(layer, _pool(E, _state["block"], hk))
    return hook


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention of one unpadded sequence; query [1, Hq, T, D], key [1, Hk, T, D]."""
    _, hq, T, d = query.shape
    hk = key.shape[1]
    scaling = 1.0 / math.sqrt(d) if scaling is None else scaling
    k = key.repeat_interleave(hq // hk, dim=1)                               # [1, Hq, T, D]
    v = value.repeat_interleave(hq // hk, dim=1)
    scores = (query.float() @ k.float().transpose(-1, -2)) * scaling         # [1, Hq, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=query.device).triu(1)
    A = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    if _state["mode"] == "gradient" and A.requires_grad:
        A.register_hook(_grad_hook(A.detach(), module.layer_idx, hk))
    elif _state["mode"] == "mass":
        _accumulate(module.layer_idx, _pool(A[0].detach(), _state["block"], hk))
    out = (A.to(value.dtype) @ v).transpose(1, 2).contiguous()               # [1, T, Hq, D]
    return out, None


@contextlib.contextmanager
def _profiling(model, mode: str, block: int):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _state
    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, sdpa_mask)
    old = model.config._attn_implementation
    model.set_attn_implementation(_IMPL)
    _state = {"mode": mode, "block": block, "acc": {}}
    try:
        yield _state
    finally:
        _state = None
        model.set_attn_implementation(old)


def _answer(model, ids: torch.Tensor, max_new_tokens: int, eos: Optional[int]) -> torch.Tensor:
    """The dense model's greedy answer [R] (stops after EOS, which is kept)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=eos)[0, ids.shape[1]:]
    if eos is not None and (out == eos).any():
        out = out[:int((out == eos).nonzero()[0]) + 1]
    return out


def _one_sample(model, full: torch.Tensor, answer_len: int, mode: str, block: int):
    """Pooled influence (or mass) of every layer for ids ``full [1, T]`` -> [layers, Hk, nb, nb]."""
    with _profiling(model, mode, block) as st:
        if mode == "gradient":
            emb = model.get_input_embeddings()(full).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False,
                           logits_to_keep=answer_len + 1).logits[0, :-1]     # [R, V]
            loss = torch.nn.functional.cross_entropy(logits.float(), full[0, -answer_len:],
                                                     reduction="sum")
            loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=full, use_cache=False, logits_to_keep=1)
        acc = st["acc"]
    return torch.stack([acc[i] for i in range(len(acc))])


def profile_influence(model, tokenizer, lengths: Sequence[int] = (1024, 2048),
                      num_samples: int = 2, mode: str = "gradient", block: int = 64,
                      max_new_tokens: int = 16, seed: int = 0, progress=None,
                      tasks: Optional[Sequence[str]] = None):
    """Block-pooled influence per layer and KV head at every length, averaged over samples.

    Returns ``(profile, meta)``: profile ``{N: float64 [num_layers, Hk, nb, nb]}`` with
    ``nb = ceil(N / block)`` (a sample of ``N`` tokens, answer included), and meta with the
    seconds and the peak resident memory (MiB) of the run. ``tasks``: the calibration tasks
    (default: all of :data:`absparse.eval.tasks.CALIBRATION_TASKS`, cycled).
    """
    from ..eval.tasks import CALIBRATION_TASKS, calibration_texts, check_calibration_tasks

    tasks = check_calibration_tasks(CALIBRATION_TASKS if tasks is None else tasks)
    if mode not in ("gradient", "mass"):
        raise ValueError(f"profile_influence: mode: expected 'gradient' or 'mass', got {mode!r}")
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)           # gradients w.r.t. the attention only
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)
    out: Dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    try:
        for n in lengths:
            texts = calibration_texts(count, num_samples, n, seed, tasks)
            for sample in texts:
                ids = tokenizer(sample.prompt, return_tensors="pt",
                                add_special_tokens=False).input_ids
                ids = ids[:, :n - max_new_tokens].to(model.device)
                ans = _answer(model, ids, max_new_tokens, tokenizer.eos_token_id)
                full = torch.cat([ids, ans[None]], dim=1)                  # [1, <= N]
                pooled = _one_sample(model, full, ans.numel(), mode, block)
                nb = -(-n // block)
                pooled = torch.nn.functional.pad(pooled, (0, nb - pooled.shape[-1],
                                                          0, nb - pooled.shape[-2]))
                out[n] = out.get(n, 0) + pooled / len(texts)
                if progress is not None:
                    progress(n, sample)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    meta = {"mode": mode, "lengths": list(lengths), "samples": num_samples, "seed": seed,
            "tasks": list(tasks),
            "block": block, "max_new_tokens": max_new_tokens,
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    return out, meta


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (average ranks for ties)."""
    def ranks(v):
        v = v.double()
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        # average ranks over ties
        uniq, inv = torch.unique(v, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
        cnt = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / cnt)[inv]
    a, b = ranks(x.flatten()), ranks(y.flatten())
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def compare_profiles(grad: torch.Tensor, mass: torch.Tensor, sink_blocks: int = 1) -> dict:
    """Per-head Spearman correlation of gradient influence vs attention mass over the causal
    blocks a window can drop (below the diagonal, right of the sink): mean, min, max."""
    nb = grad.shape[-1]
    i = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    droppable = (j < i) & (j >= sink_blocks)
    rhos = [spearman(g[droppable], m[droppable])
            for g, m in zip(grad.reshape(-1, nb, nb), mass.reshape(-1, nb, nb))]
    rhos = [r for r in rhos if not math.isnan(r)]
    return {"heads": len(rhos), "mean": sum(rhos) / len(rhos), "min": min(rhos),
            "max": max(rhos)}
