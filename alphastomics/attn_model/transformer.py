"""One pre-LN transformer layer over the cells of a slice, conditioned on the diffusion times."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alphastomics.attn_model.layers import AdaptiveLayerNorm, FeedForward
from alphastomics.attn_model.local_attention import LocalAttention
from alphastomics.attn_model.neighbors import NeighborGraph
from alphastomics.attn_model.self_attention import (
    LinearSelfAttention,
    attention_context,
    attention_readout,
    combine_context_parts,
    context_part,
)
from alphastomics.data.batch import apply_mask

# On CPU a layer runs over chunks of cells so that no temporary it makes exceeds this many bytes.
# glibc serves blocks above its mmap threshold (32 MiB at most) with a fresh mmap per call, which
# the kernel page-faults in and zeroes every time: at 100k cells that made the element-wise ops
# of a step several times slower than at 10k. Blocks below it are reused from the heap, and
# chunk-sized working sets also stay in cache. Only the layer's output is N-sized.
_CHUNK_BYTES = 16 * 2**20
_MIN_CHUNK_CELLS = 1024


def chunk_cells(batch: int, n_cells: int, widest: int, element_size: int) -> int:
    """Cells per chunk so a (batch, chunk, widest) tensor stays under ``_CHUNK_BYTES``."""
    per_cell = max(1, batch * widest * element_size)
    return min(n_cells, max(_MIN_CHUNK_CELLS, _CHUNK_BYTES // per_cell))


def checkpointed_chunks(
    fn: Callable[..., tuple[Tensor, ...]], tensors: tuple[Tensor, ...], size: int
) -> tuple[Tensor, ...]:
    """``fn`` of per-cell ``tensors`` (each (B, N, ...)) a chunk of ``size`` cells at a time,
    each chunk checkpointed (recomputed in backward); its outputs concatenated along N."""
    parts = zip(*(t.split(size, dim=1) for t in tensors), strict=True)
    outputs = [checkpoint(fn, *chunk, use_reentrant=False) for chunk in parts]
    return tuple(torch.cat(column, dim=1) for column in zip(*outputs, strict=True))


class TransformerLayer(nn.Module):
    """Pre-LN block: ``x = adaLN(h); h += attn(x) + local(x); h += ff(adaLN(h))``; padded rows 0.

    ``attn`` is the global linear attention over all cells of the item, ``local`` the attention
    of each cell over its nearest cells (:class:`LocalAttention`, when ``local_attention``).

    On CPU, slices larger than one chunk (about 10,000 cells at the default width) are processed
    a chunk of cells at a time: the attention context sums over all chunks, everything else is
    per cell, so the result is the same up to floating-point summation order.

    With ``recompute`` (activation checkpointing) the backward pass keeps only the layer's
    input: without local attention each chunk's share of the context and each chunk's output
    are recomputed a chunk at a time, so the layer's extra memory in backward is one chunk's;
    otherwise (local attention, or one chunk) the whole layer is recomputed.

    Parameters
    ----------
    hidden_dim
        Width H of the cell states and of the condition.
    n_heads
        Attention heads.
    ff_mult
        Feed-forward width as a multiple of H.
    dropout
        Dropout in attention output and feed-forward.
    layer_norm_eps
        LayerNorm epsilon.
    local_attention
        Add the local attention block (its input is a neighbour graph).
    """

    def __init__(
        self,
        hidden_dim: int,
        n_heads: int,
        ff_mult: int,
        dropout: float,
        layer_norm_eps: float,
        local_attention: bool = False,
    ) -> None:
        super().__init__()
        self.attention_norm = AdaptiveLayerNorm(hidden_dim, layer_norm_eps)
        self.attention = LinearSelfAttention(hidden_dim, n_heads, dropout)
        self.local = LocalAttention(hidden_dim, n_heads, dropout) if local_attention else None
        self.ff_norm = AdaptiveLayerNorm(hidden_dim, layer_norm_eps)
        self.ff = FeedForward(hidden_dim, ff_mult, dropout)
        self._widest = max(3, ff_mult) * hidden_dim  # qkv or feed-forward hidden features

    def forward(
        self,
        h: Tensor,
        cond: Tensor,
        mask: Tensor,
        graph: NeighborGraph | None = None,
        *,
        recompute: bool = False,
    ) -> Tensor:
        """Update cell states ``h`` (B, N, H) given ``cond`` (B, H) and ``mask`` (B, N) bool.

        ``graph`` is the items' neighbour graph, needed when the layer has local attention;
        ``recompute`` trades memory for a second forward pass in backward (class docstring).
        """
        if self.local is not None and graph is None:
            raise ValueError("this layer has local attention: pass the neighbour graph")
        b, n, _ = h.shape
        size = n
        if h.device.type == "cpu":
            size = chunk_cells(b, n, self._widest, max(h.element_size(), 4))
        if recompute and torch.is_grad_enabled():
            if self.local is None and size < n:
                return self._recomputed_chunks(h, cond, mask, size)
            return checkpoint(self._forward, h, cond, mask, graph, size, use_reentrant=False)
        return self._forward(h, cond, mask, graph, size)

    def _recomputed_chunks(self, h: Tensor, cond: Tensor, mask: Tensor, size: int) -> Tensor:
        """Global-attention layer over chunks of ``size`` cells, each chunk checkpointed."""
        h_parts = h.split(size, dim=1)  # (B, n_c, H) views
        m_parts = mask.split(size, dim=1)
        parts = [
            checkpoint(self._chunk_context, x, cond, m, use_reentrant=False)
            for x, m in zip(h_parts, m_parts, strict=True)
        ]
        context = combine_context_parts(parts)  # (B, K, d, d)
        output = functools.partial(self._chunk_output, cond=cond, context=context)
        return checkpointed_chunks(output, (h, mask), size)[0]  # (B, N, H)

    def _chunk_context(self, x: Tensor, cond: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, v = self.attention.keys_values(self.attention_norm(x, cond))  # (B, K, n_c, d)
        return context_part(k, v, m)

    def _chunk_output(
        self, x: Tensor, m: Tensor, *, cond: Tensor, context: Tensor
    ) -> tuple[Tensor]:
        q = self.attention.queries(self.attention_norm(x, cond))  # (B, K, n_c, d)
        x = x + self.attention.project_out(attention_readout(q, context))
        x = x + self.ff(self.ff_norm(x, cond))
        return (apply_mask(x, m),)

    def _forward(
        self, h: Tensor, cond: Tensor, mask: Tensor, graph: NeighborGraph | None, size: int
    ) -> Tensor:
        n = h.shape[1]
        if size >= n:
            x = self.attention_norm(h, cond)
            h = h + self.attention(x, mask)  # (B, N, H)
            if self.local is not None:
                h = h + self.local(x, graph)
            h = h + self.ff(self.ff_norm(h, cond))  # (B, N, H)
            return apply_mask(h, mask)

        # split (not slicing): its backward assembles the input gradient in one tensor
        h_parts = h.split(size, dim=1)  # (B, n_c, H) views
        m_parts = mask.split(size, dim=1)
        queries, keys, values = [], [], []
        local_q, local_k, local_v = [], [], []
        for x in h_parts:
            x = self.attention_norm(x, cond)
            q, k, v = self.attention.heads(x)  # (B, K, n_c, d)
            queries.append(q)
            keys.append(k)
            values.append(v)
            if self.local is not None:
                q, k, v = self.local.heads(x)  # (B, K, n_c, d)
                local_q.append(q)
                local_k.append(k)
                local_v.append(v)
        context = attention_context(keys, values, m_parts)  # (B, K, d, d)
        del keys, values
        all_k = torch.cat(local_k, dim=2) if local_k else None  # (B, K, N, d)
        all_v = torch.cat(local_v, dim=2) if local_v else None
        del local_k, local_v
        queries.reverse()  # popped from the end: each chunk's q is dropped once used
        local_q.reverse()
        out = []
        start = 0
        for x, m in zip(h_parts, m_parts, strict=True):
            rows = slice(start, start + x.shape[1])
            start = rows.stop
            x = x + self.attention.project_out(attention_readout(queries.pop(), context))
            if self.local is not None:
                assert graph is not None and all_k is not None and all_v is not None
                local = self.local.attend(local_q.pop(), all_k, all_v, graph, rows)
                x = x + self.local.project_out(local)
            x = x + self.ff(self.ff_norm(x, cond))
            out.append(apply_mask(x, m))
        return torch.cat(out, dim=1)  # (B, N, H)
