"""A self-contained Llama decode loop on absparse: static paged cache, one CUDA graph per step.

    runner = LlamaRunner.from_hf(model, batch_size=1, max_context=4096, layout=layout,
                                 token_budget=2048)          # or LlamaRunner.from_config(cfg, ...)
    tokens = runner.generate(input_ids, max_new_tokens=64)  # [B, 64] greedy tokens

The model is the Llama architecture (RMSNorm, RoPE with Llama-3.1 "llama3" frequency scaling,
grouped-query attention, SwiGLU MLP; Llama-3.x, SmolLM2, TinyLlama, ...) with its weights as plain
tensors; transformers is needed only to copy weights from a ``LlamaForCausalLM`` (``from_hf``).

State, all preallocated on the model's device when the runner is built:
  k_pools[i], v_pools[i] : [num_pages, P, Hk, D] per layer, num_pages = B * ceil(max_context / P)
  page_table             : int32 [B, max_pages]; sequence b owns pages [b * max_pages, ...)
  seq_lens, start_pos    : int32 [B], advanced on the device by every decode step
  summaries[i], scales[i]: ``layout[i].new_summary_cache(num_pages, D)`` (sparse layers)
  tokens int64 [B] (the step's input), logits float32 [B, vocab] (its output)

``prefill(input_ids)`` attends densely (SDPA, causal), writes the pages and summarizes every
complete block. ``decode_step()`` appends one token per sequence and, per layer, runs the four
projections (torch matrix products), absparse's fused ``rope_append`` (RoPE of q and k, the K / V
append), ``rms_norm`` (with the residual add) and ``silu_mul`` (``absparse.model_ops``: 4 small
kernels per layer where framework ops take ~34; they round where transformers rounds), and
``update_centroids(max_new_tokens=1)`` -> ``select_blocks`` -> ``sparse_decode`` (``dense_decode``
for the layers whose layout is ``None`` and in mode "dense"): no host synchronization, no shape
that depends on a length, so on CUDA ``capture()`` records it once into a ``torch.cuda.CUDAGraph``
and ``step(tokens)`` replays it (on the CPU, and before ``capture()``, it runs eagerly).

All sequences of a batch are prefilled together with the same length (no padding); the budget and
windows are those of ``absparse.select_blocks``.

Example (a tiny random model on the CPU; layer 0 dense, layer 1 sparse):

>>> from absparse.runner import LlamaRunner
>>> cfg = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
>>> layout = ModelLayout([None, LayerLayout([8, 16], page_size=16, format="int8")])
>>> runner = LlamaRunner.from_config(cfg, torch.float32, "cpu", seed=0, batch_size=2,
...                                  max_context=128, layout=layout, token_budget=32)
>>> prompt = torch.randint(0, 100, (2, 50), generator=torch.Generator().manual_seed(0))
>>> tokens = runner.generate(prompt, max_new_tokens=8)
>>> tokens.shape, runner.seq_lens.tolist()
(torch.Size([2, 8]), [57, 57])
>>> full = runner.with_settings(layout, token_budget=4096)   # a budget >= context: all blocks
>>> dense = runner.with_settings(mode="dense")               # same weights and cache
>>> torch.equal(full.generate(prompt, 8), dense.generate(prompt, 8))
True
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from .layout import LayerLayout, ModelLayout
from .model_ops import rms_norm, rope_append, silu_mul
from .ops import default_max_blocks, dense_decode, select_blocks, sparse_decode, update_centroids

__all__ = ["LlamaConfig", "LlamaRunner"]


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers ``LlamaConfig`` that the runner uses."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None        # {"rope_type": "llama3", "factor", ...} or None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a transformers config dict (``config.to_dict()`` or a config.json): ``rope_theta``
        and the scaling either at the top level (transformers 4) or in ``rope_parameters``
        (transformers 5)."""
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or rope
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind not in ("default", "llama3"):
            raise ValueError(f"LlamaConfig: rope_type: expected 'default' or 'llama3', got "
                             f"{kind!r}")
        heads = int(d["num_attention_heads"])
        return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                   intermediate_size=int(d["intermediate_size"]),
                   num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
                   num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                   head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
                   rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
                   rope_scaling=dict(scaling) if kind == "llama3" else None,
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """float32 [D/2] inverse frequencies, with Llama-3.1's scaling when configured (the formula
    of transformers' ``_compute_llama3_parameters``: long wavelengths divided by ``factor``, short
    ones kept, a linear blend in between)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, low = float(s["factor"]), float(s["low_freq_factor"])
    high = float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalized in float32, rounded to x's dtype, then scaled."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by the half-split convention (rotate_half) of transformers' Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    input_norm: torch.Tensor     # [H]
    qkv: torch.Tensor            # [(Hq + 2 Hk) D, H]: q_proj, k_proj, v_proj stacked
    o: torch.Tensor              # [H, Hq D]
    post_norm: torch.Tensor      # [H]
    gate_up: torch.Tensor        # [2 I, H]: gate_proj, up_proj stacked
    down: torch.Tensor           # [H, I]


class LlamaRunner:
    """Greedy decoding of a Llama model with absparse attention over a static paged cache.

    Parameters
    ----------
    cfg : LlamaConfig
    weights : dict of tensors named as in transformers' ``LlamaForCausalLM.state_dict()``
        (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
        ``lm_head.weight`` unless tied); dtype and device of the embedding are the runner's
    batch_size, max_context : the static capacity: B sequences of up to max_context tokens
    layout : ModelLayout with one LayerLayout (or None: a dense layer) per layer; None = every
        layer dense. Its page size is the cache's (default 64 without a layout)
    token_budget, sink_tokens, local_tokens, group_reduce : as in ``absparse.select_blocks``
    mode : "sparse" (select + sparse attention in the layers with a layout) or "dense"
        (``dense_decode`` everywhere)
    """

    def __init__(self, cfg: LlamaConfig, weights: dict, batch_size: int, max_context: int,
                 layout: Optional[ModelLayout] = None, token_budget: Union[int, float] = 2048,
                 sink_tokens: int = 16, local_tokens: int = 64, group_reduce: str = "max",
                 mode: str = "sparse", page_size: int = 64):
        if batch_size < 1 or max_context < 1:
            raise ValueError(f"LlamaRunner: batch_size, max_context: expected >= 1, got "
                             f"{batch_size}, {max_context}")
        self.cfg = cfg
        layouts = self._check_layout(layout)
        self.page_size = next((l.page_size for l in layouts if l is not None), int(page_size))
        embed = weights["model.embed_tokens.weight"]
        self.dtype, self.device = embed.dtype, embed.device
        self._load(weights)
        self._allocate(batch_size, max_context)
        self._configure(layouts, token_budget, sink_tokens, local_tokens, group_reduce, mode)

    def _check_layout(self, layout: Optional[ModelLayout]) -> List[Optional[LayerLayout]]:
        n = self.cfg.num_hidden_layers
        if layout is not None and len(layout) != n:
            raise ValueError(f"LlamaRunner: layout: expected {n} layers (the model's), got "
                             f"{len(layout)}")
        layouts = list(layout.layers) if layout is not None else [None] * n
        sizes = {l.page_size for l in layouts if l is not None}
        if len(sizes) > 1 or (sizes and hasattr(self, "page_size") and sizes != {self.page_size}):
            raise ValueError(f"LlamaRunner: layout: expected one page size (the cache's), got "
                             f"{sorted(sizes)}")
        return layouts

    def _configure(self, layouts, token_budget, sink_tokens, local_tokens, group_reduce,
                   mode) -> None:
        """Decode settings and the summary caches they need (zeroed; see ``summarize``)."""
        if mode not in ("sparse", "dense"):
            raise ValueError(f"LlamaRunner: mode: expected 'sparse' or 'dense', got {mode!r}")
        self.layouts, self.mode = layouts, mode
        self.token_budget, self.sink_tokens = token_budget, sink_tokens
        self.local_tokens, self.group_reduce = local_tokens, group_reduce
        num_pages, d = self.k_pools[0].shape[0], self.cfg.head_dim
        self.summaries, self.scales, self.max_blocks = [], [], []
        for layout in layouts:
            sparse = layout is not None and mode == "sparse"
            s, sc = (layout.new_summary_cache(num_pages, d, self.device) if sparse
                     else (None, None))
            self.summaries.append(s)
            self.scales.append(sc)
            self.max_blocks.append(default_max_blocks(self.page_table, layout, token_budget,
                                                      sink_tokens, local_tokens)
                                   if sparse else 0)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def with_settings(self, layout: Optional[ModelLayout] = None,
                      token_budget: Union[int, float] = 2048, sink_tokens: int = 16,
                      local_tokens: int = 64, group_reduce: str = "max",
                      mode: str = "sparse") -> "LlamaRunner":
        """A runner over this one's weights and cache (pools, page table, seq_lens, step
        buffers: shared, not copied) with other decode settings; its summaries are computed from
        the pools now. Steps of either runner advance both."""
        new = copy.copy(self)
        new._configure(self._check_layout(layout), token_budget, sink_tokens, local_tokens,
                       group_reduce, mode)
        new.summarize()
        return new

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Union[dict, LlamaConfig], dtype=torch.bfloat16, device="cpu",
                    seed: int = 0, **kwargs) -> "LlamaRunner":
        """A runner with random weights (normal, std 0.02; norms 1): for speed, not for text."""
        if isinstance(cfg, dict):
            cfg = LlamaConfig.from_dict(cfg)
        gen = torch.Generator(device=device).manual_seed(seed)
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        hq, hk = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

        def rand(*shape):
            return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02,
                                                                           generator=gen)

        w = {"model.embed_tokens.weight": rand(cfg.vocab_size, h),
             "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
        if not cfg.tie_word_embeddings:
            w["lm_head.weight"] = rand(cfg.vocab_size, h)
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            w.update({p + "self_attn.q_proj.weight": rand(hq, h),
                      p + "self_attn.k_proj.weight": rand(hk, h),
                      p + "self_attn.v_proj.weight": rand(hk, h),
                      p + "self_attn.o_proj.weight": rand(h, hq),
                      p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                      p + "mlp.down_proj.weight": rand(h, i),
                      p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype,
                                                                        device=device)})
        return cls(cfg, w, **kwargs)

    @classmethod
    def from_hf(cls, model, **kwargs) -> "LlamaRunner":
        """A runner with the weights of a transformers ``LlamaForCausalLM``, on the model's dtype
        and device: q/k/v and gate/up projections are concatenated copies, the other weights
        are the model's own tensors (shared, not copied)."""
        cfg = LlamaConfig.from_dict(model.config.to_dict())
        weights = {name: t.detach() for name, t in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return cls(cfg, weights, **kwargs)

    def _load(self, w: dict) -> None:
        cfg = self.cfg
        own = lambda t: t.detach().to(self.device, self.dtype).contiguous()  # noqa: E731
        self.embed = own(w["model.embed_tokens.weight"])                       # [V, H]
        self.norm = own(w["model.norm.weight"])                                # [H]
        self.lm_head = (self.embed if cfg.tie_word_embeddings
                        else own(w["lm_head.weight"]))                         # [V, H]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            self.layers.append(_Layer(
                input_norm=own(w[p + "input_layernorm.weight"]),
                qkv=own(torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"],
                                    w[a + "v_proj.weight"]])),
                o=own(w[a + "o_proj.weight"]),
                post_norm=own(w[p + "post_attention_layernorm.weight"]),
                gate_up=own(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])),
                down=own(w[m + "down_proj.weight"])))

    def _allocate(self, batch: int, max_context: int) -> None:
        cfg, P, dev = self.cfg, self.page_size, self.device
        hk, d = cfg.num_key_value_heads, cfg.head_dim
        self.batch_size, self.max_context = batch, max_context
        self.max_pages = -(-max_context // P)
        num_pages = batch * self.max_pages
        self.page_table = torch.arange(num_pages, dtype=torch.int32, device=dev).view(
            batch, self.max_pages)                                   # [B, max_pages]
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=dev)    # [B]
        self.start_pos = torch.zeros_like(self.seq_lens)                     # [B]
        self.k_pools = [torch.zeros(num_pages, P, hk, d, dtype=self.dtype, device=dev)
                        for _ in self.layers]                        # [num_pages, P, Hk, D]
        self.v_pools = [torch.zeros_like(k) for k in self.k_pools]
        # RoPE tables for every position the cache can hold: [max_context, D] in the model dtype
        # (the same float32 products and casts as transformers' rotary embedding).
        freqs = torch.arange(max_context, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dev, self.dtype), emb.sin().to(dev, self.dtype)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)              # [B]
        self.logits = torch.zeros(batch, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.attn_out = torch.empty(batch, cfg.num_attention_heads, d, dtype=self.dtype,
                                    device=dev)                                     # [B, Hq, D]
        self.q_step = torch.empty_like(self.attn_out)         # [B, Hq, D] the step's queries

    # --- the model -----------------------------------------------------------------------------
    def _qkv(self, layer: _Layer, x: torch.Tensor, cos, sin):
        """x [..., H] -> q [..., Hq, D], k and v [..., Hk, D], q and k rotated."""
        cfg = self.cfg
        d, hq, hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = F.linear(_rms_norm(x, layer.input_norm, cfg.rms_norm_eps), layer.qkv)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q = _rope(q.unflatten(-1, (hq, d)), cos, sin)
        k = _rope(k.unflatten(-1, (hk, d)), cos, sin)
        return q, k, v.unflatten(-1, (hk, d))

    def _mlp_block(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection of attn [..., Hq D], then residual + SwiGLU MLP."""
        x = x + F.linear(attn, layer.o)
        gate, up = F.linear(_rms_norm(x, layer.post_norm, self.cfg.rms_norm_eps),
                            layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()

    def _write_kv(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, Hk, D] into flat pool slots int64 [N] (page * P + offset)."""
        hk, d = k.shape[-2:]
        self.k_pools[i].view(-1, hk, d).index_copy_(0, slots, k)
        self.v_pools[i].view(-1, hk, d).index_copy_(0, slots, v)

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Flat pool slots int64 [B, S] of positions pos int64 [B, S], through the page table."""
        page = self.page_table.gather(1, pos // self.page_size).to(torch.int64)
        return page * self.page_size + pos % self.page_size

    def _sparse(self, i: int) -> bool:
        return self.summaries[i] is not None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``input_ids`` int [B, S] (S >= 1, B = batch_size) with dense causal
        attention, fill the cache and summaries; return float32 logits [B, vocab] of the last
        position (also in ``self.logits``). Replaces whatever the cache held."""
        batch, steps = input_ids.shape
        if batch != self.batch_size or not 1 <= steps < self.max_context:
            raise ValueError(f"LlamaRunner.prefill: input_ids: expected [{self.batch_size}, S] "
                             f"with 1 <= S < {self.max_context}, got {list(input_ids.shape)}")
        ids = input_ids.to(self.device)
        pos = torch.arange(steps, device=self.device).expand(batch, steps)          # [B, S]
        slots = self._slots(pos).reshape(-1)                                         # [B S]
        cos, sin = self.cos[:steps, None], self.sin[:steps, None]                    # [S, 1, D]
        x = F.embedding(ids, self.embed)                                             # [B, S, H]
        self.seq_lens.fill_(steps)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)                  # [B, S, Hq | Hk, D]
            self._write_kv(i, slots, k.flatten(0, 1), v.flatten(0, 1))
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True,
                                                  enable_gqa=True)   # [B, Hq, S, D]
            x = self._mlp_block(layer, x, attn.transpose(1, 2).flatten(2))
        self.summarize()
        self.logits.copy_(self._logits(x[:, -1]))
        return self.logits

    def summarize(self) -> None:
        """Summaries of every complete block of every sparse layer, from the pools (start 0):
        after a prefill, or after the pools or seq_lens were written directly."""
        zero = torch.zeros_like(self.seq_lens)
        for i in range(len(self.layers)):
            if self._sparse(i):
                update_centroids(self.k_pools[i], self.page_table, self.seq_lens, zero,
                                 self.layouts[i], self.summaries[i], self.scales[i])

    def attend_layer(self, i: int, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Decode attention of layer i for q [B, Hq, D] into out [B, Hq, D], after the step's
        token was appended (seq_lens and start_pos advanced): summaries of the blocks the token
        completes, selection, sparse attention (dense_decode for a dense layer or mode)."""
        k, v = self.k_pools[i], self.v_pools[i]
        if not self._sparse(i):
            return dense_decode(q, k, v, self.page_table, self.seq_lens, out=out)
        layout = self.layouts[i]
        update_centroids(k, self.page_table, self.seq_lens, self.start_pos, layout,
                         self.summaries[i], self.scales[i], max_new_tokens=1)
        idx, cnt = select_blocks(q, self.summaries[i], self.scales[i], self.page_table,
                                 self.seq_lens, layout, self.token_budget,
                                 sink_tokens=self.sink_tokens, local_tokens=self.local_tokens,
                                 group_reduce=self.group_reduce, max_blocks=self.max_blocks[i])
        return sparse_decode(q, k, v, self.page_table, self.seq_lens, layout, idx, cnt, out=out)

    @torch.no_grad()
    def decode_step(self) -> torch.Tensor:
        """One token per sequence: ``self.tokens`` [B] in, float32 ``self.logits`` [B, vocab]
        out. Only device work on preallocated state: capturable in a CUDA graph."""
        cfg = self.cfg
        eps, hq = cfg.rms_norm_eps, cfg.num_attention_heads
        self.start_pos.copy_(self.seq_lens)                  # the new token's position
        self.seq_lens.add_(1)
        x = F.embedding(self.tokens, self.embed)             # [B, H]: the residual stream
        h = rms_norm(x, self.layers[0].input_norm, eps)      # [B, H]: the normed stream
        for i, layer in enumerate(self.layers):
            q = rope_append(F.linear(h, layer.qkv), self.cos, self.sin, self.k_pools[i],
                            self.v_pools[i], self.page_table, self.start_pos, hq,
                            q_out=self.q_step)               # [B, Hq, D]; K / V appended
            attn = self.attend_layer(i, q, self.attn_out)
            h = rms_norm(F.linear(attn.flatten(1), layer.o), layer.post_norm, eps, residual=x)
            mlp = F.linear(silu_mul(F.linear(h, layer.gate_up)), layer.down)
            after = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h = rms_norm(mlp, after, eps, residual=x)        # x += mlp; h = the next norm of x
        self.logits.copy_(F.linear(h, self.lm_head).float())
        return self.logits

    # --- graph and loop ------------------------------------------------------------------------
    def capture(self) -> "torch.cuda.CUDAGraph":
        """Record ``decode_step`` into a CUDA graph (CUDA only), once: the graph reads and writes
        the runner's buffers, so it stays valid across prefills. A warm-up step runs first on a
        side stream (library handles, per-device channel parameters) and is undone: seq_lens
        restored; the K/V it wrote at the next position are overwritten, and the summary of a
        block it completed rewritten, by the next real step."""
        if self.device.type != "cuda":
            raise RuntimeError("LlamaRunner.capture: needs a CUDA device (runs eagerly elsewhere)")
        saved = self.seq_lens.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.decode_step()
            self.seq_lens.copy_(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.decode_step()
        self.graph = graph
        return graph

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Decode ``token_ids`` int [B]: a graph replay after ``capture()``, else eagerly.
        Returns ``self.logits`` (overwritten by the next step)."""
        self.tokens.copy_(token_ids)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.decode_step()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: int64 [B, max_new_tokens], the first token from the prefill's logits.
        Stays on the device until the end (one synchronization, when the caller reads it)."""
        if input_ids.shape[1] + max_new_tokens > self.max_context:
            raise ValueError(f"LlamaRunner.generate: max_new_tokens: prompt {input_ids.shape[1]} "
                             f"+ {max_new_tokens} exceeds max_context {self.max_context}")
        token = self.prefill(input_ids).argmax(-1)
        out = [token]
        for _ in range(max_new_tokens - 1):
            token = self.step(token).argmax(-1)
            out.append(token)
        return torch.stack(out, dim=1)

    # --- memory --------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_pools + self.v_pools)

    def summary_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.summaries + self.scales
                   if t is not None)
