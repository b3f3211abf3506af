"""The projections every attention block of a layer shares: fused queries, keys and values,
split over heads, and an output projection with dropout."""

from __future__ import annotations

from torch import Tensor, nn


class MultiHeadProjections(nn.Module):
    """``qkv`` (H -> 3H, split into K heads of width d = H / K) and ``out`` (H -> H) + dropout.

    A block adds its own modules in :meth:`build_inner`, which runs between ``qkv`` and
    ``out``: parameters keep the names and registration order they had when each block made
    them itself, so saved checkpoints, optimiser states and seeded initialisations stay valid.

    Parameters
    ----------
    hidden_dim
        Width H; divisible by ``n_heads``.
    n_heads
        Number of heads K.
    dropout
        Dropout on the output projection.
    """

    def __init__(self, hidden_dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_dim % n_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.build_inner(hidden_dim, n_heads)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def build_inner(self, hidden_dim: int, n_heads: int) -> None:
        """Create the block's own modules (between ``qkv`` and ``out``); none by default."""

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, K, n, d) of cell states ``x`` (B, n, H)."""
        b, n, h = x.shape
        heads = self.qkv(x).view(b, n, 3, self.n_heads, h // self.n_heads)  # (B, n, 3, K, d)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, K, n, d)
        return q, k, v
