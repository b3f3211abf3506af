"""Multi-head self-attention over the cells of a slice, linear in the number of cells N, masked.

It is "efficient attention" (Shen et al. 2021, the form LUNA used through
``linear_attention_transformer``): each query is a softmax over the head's features, each key
column a softmax over cells, and ``out_i = softmax(q_i) · (softmax_cells(K)ᵀ V)``. The d × d
context is built once per head, so time and memory are O(N·d²) and no N × N tensor exists.

Why our own ~40 lines and not the ``linear_attention_transformer`` package (last release 2021,
unmaintained): no extra dependency; exact masking (padded keys get weight exactly 0 and padded
values are zeroed, so padding never changes a real cell's output, not just approximately); the
key softmax subtracts its max over real cells and runs in float32 even under autocast, so it
stays finite for 200k cells and large logits; and it is plain tensor code that works with any
dtype, device and ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Efficient attention over cells with padded cells excluded exactly.

    Parameters
    ----------
    q, k, v
        (B, K, N, d) queries, keys and values per head.
    mask
        (B, N) bool, True for a real cell.

    Returns
    -------
    Tensor
        (B, K, N, d) in the dtype of ``v``. Rows of padded cells are finite but meaningless; an
        item without real cells gets zeros.
    """
    dtype = v.dtype
    keep = mask[:, None, :, None]  # (B, 1, N, 1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.float().softmax(dim=-1)  # (B, K, N, d) each cell's mix over the head's features
        k = k.float().masked_fill(~keep, float("-inf"))  # (B, K, N, d)
        # softmax over real cells, stabilised by their max; the max cancels, so no gradient
        k_max = k.detach().amax(dim=2, keepdim=True)  # (B, K, 1, d)
        k_max = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max))
        weights = torch.exp(k - k_max)  # (B, K, N, d) exactly 0 on padded cells
        v = v.float().masked_fill(~keep, 0.0)  # (B, K, N, d)
        context = torch.einsum("bknd,bkne->bkde", weights, v)  # (B, K, d, d)
        # >= 1 when the item has a real cell (its max key gives exp(0) = 1); 0 -> zero context
        normaliser = weights.sum(dim=2).clamp_min(1.0)  # (B, K, d)
        context = context / normaliser.unsqueeze(-1)  # (B, K, d, d)
        out = torch.einsum("bknd,bkde->bkne", q, context)  # (B, K, N, d)
    return out.to(dtype)


class LinearSelfAttention(nn.Module):
    """Multi-head masked linear self-attention of cell states (B, N, H) -> (B, N, H).

    Parameters
    ----------
    hidden_dim
        Width H; must be divisible by ``n_heads``.
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
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Attend over the real cells of each item: ``x`` (B, N, H), ``mask`` (B, N) bool."""
        b, n, h = x.shape
        heads = self.qkv(x).view(b, n, 3, self.n_heads, h // self.n_heads)  # (B, N, 3, K, d)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, K, N, d)
        out = masked_linear_attention(q, k, v, mask)  # (B, K, N, d)
        out = out.transpose(1, 2).reshape(b, n, h)  # (B, N, H)
        return self.dropout(self.out(out))
