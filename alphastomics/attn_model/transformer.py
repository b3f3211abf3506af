"""One pre-LN transformer layer over the cells of a slice, conditioned on the diffusion times."""

from __future__ import annotations

from torch import Tensor, nn

from alphastomics.attn_model.layers import AdaptiveLayerNorm, FeedForward
from alphastomics.attn_model.self_attention import LinearSelfAttention
from alphastomics.utils.dataholder import apply_mask


class TransformerLayer(nn.Module):
    """Pre-LN block: ``h += attn(adaLN(h)); h += ff(adaLN(h))``; padded rows reset to 0.

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

    def forward(self, h: Tensor, cond: Tensor, mask: Tensor) -> Tensor:
        """Update cell states ``h`` (B, N, H) given ``cond`` (B, H) and ``mask`` (B, N) bool."""
        h = h + self.attention(self.attention_norm(h, cond), mask)  # (B, N, H)
        h = h + self.ff(self.ff_norm(h, cond))  # (B, N, H)
        return apply_mask(h, mask)
