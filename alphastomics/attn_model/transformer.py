"""One pre-LN transformer layer over the cells of a slice, conditioned on the diffusion times."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alphastomics.attn_model.layers import AdaptiveLayerNorm, FeedForward
from alphastomics.attn_model.self_attention import (
    LinearSelfAttention,
    attention_context,
    attention_readout,
)
from alphastomics.utils.dataholder import apply_mask

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


class TransformerLayer(nn.Module):
    """Pre-LN block: ``h += attn(adaLN(h)); h += ff(adaLN(h))``; padded rows reset to 0.

    On CPU, slices larger than one chunk (about 10,000 cells at the default width) are processed
    a chunk of cells at a time: the attention context sums over all chunks, everything else is
    per cell, so the result is the same up to floating-point summation order.

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
    """

    def __init__(
        self, hidden_dim: int, n_heads: int, ff_mult: int, dropout: float, layer_norm_eps: float
    ) -> None:
        super().__init__()
        self.attention_norm = AdaptiveLayerNorm(hidden_dim, layer_norm_eps)
        self.attention = LinearSelfAttention(hidden_dim, n_heads, dropout)
        self.ff_norm = AdaptiveLayerNorm(hidden_dim, layer_norm_eps)
        self.ff = FeedForward(hidden_dim, ff_mult, dropout)
        self._widest = max(3, ff_mult) * hidden_dim  # qkv or feed-forward hidden features

    def forward(self, h: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        """Update cell states ``h`` (B, N, H) given ``cond`` (B, H) and ``mask`` (B, N) bool."""
        b, n, _ = h.shape
        size = n
        if h.device.type == "cpu":
            size = chunk_cells(b, n, self._widest, max(h.element_size(), 4))
        if size >= n:
            h = h + self.attention(self.attention_norm(h, cond), mask)  # (B, N, H)
            h = h + self.ff(self.ff_norm(h, cond))  # (B, N, H)
            return apply_mask(h, mask)

        # split (not slicing): its backward assembles the input gradient in one tensor
        h_parts = h.split(size, dim=1)  # (B, n_c, H) views
        m_parts = mask.split(size, dim=1)
        queries, keys, values = [], [], []
        for x in h_parts:
            q, k, v = self.attention.heads(self.attention_norm(x, cond))  # (B, K, n_c, d)
            queries.append(q)
            keys.append(k)
            values.append(v)
        context = attention_context(keys, values, m_parts)  # (B, K, d, d)
        del keys, values
        queries.reverse()  # popped from the end: each chunk's q is dropped once used
        out = []
        for x, m in zip(h_parts, m_parts, strict=True):
            x = x + self.attention.project_out(attention_readout(queries.pop(), context))
            x = x + self.ff(self.ff_norm(x, cond))
            out.append(apply_mask(x, m))
        return torch.cat(out, dim=1)  # (B, N, H)
