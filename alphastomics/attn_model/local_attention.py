"""Local attention: each cell attends to its k nearest cells in the item's current positions.

The global linear attention's whole context is a few d x d matrices per layer: a cell learns
what the slice holds, not which cells lie next to it now. Here every cell reads its ``k``
nearest cells (a :class:`~alphastomics.attn_model.neighbors.NeighborGraph`, recomputed at each
network evaluation from the positions being generated or given) with softmax weights from
``q_i · k_j`` plus a learned bias of their distance, and receives their values plus the
attention-weighted distance features. Distances enter only as lengths (divided by the item's
neighbour length scale), so the block is rotation-, reflection- and translation-invariant.

Cost: O(N·k·H) time and memory per layer, no N x N tensor. Under autograd on large items the
gathered neighbour keys and values, (n_chunk, k, H) per chunk, are recomputed in the backward
pass instead of kept (activation checkpointing), so what a layer keeps is O(N·H).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alphastomics.attn_model.multihead import MultiHeadProjections
from alphastomics.attn_model.neighbors import NeighborGraph

N_DISTANCE_FEATURES = 16  # Gaussian radial basis functions of the scaled neighbour distance
_RBF_MAX = 3.0  # centres from 0 to 3 neighbour length scales
_BIAS_HIDDEN = 32
_MASKED_LOGIT = -1e9  # finite, so an item without neighbours gets zero weights, never NaN
# Items with at least this many cells recompute their gathered neighbours in backward.
_CHECKPOINT_CELLS = 4096


def distance_features(distance: Tensor) -> Tensor:
    """Gaussian radial basis of scaled distances (...,) -> (..., N_DISTANCE_FEATURES)."""
    centres = torch.linspace(0.0, _RBF_MAX, N_DISTANCE_FEATURES, device=distance.device)
    width = _RBF_MAX / (N_DISTANCE_FEATURES - 1)
    return torch.exp(-0.5 * ((distance.unsqueeze(-1) - centres) / width).square())


def gather_cells(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x`` (B, N, F) at ``index`` (B, n, k) long into N -> (B, n, k, F)."""
    b, n_all, f = x.shape
    _, n, k = index.shape
    flat = index + (torch.arange(b, device=index.device) * n_all).view(b, 1, 1)
    return x.reshape(b * n_all, f).index_select(0, flat.reshape(-1)).view(b, n, k, f)


class LocalAttention(MultiHeadProjections):
    """Multi-head attention of each cell over its k nearest cells, (B, N, H) -> (B, N, H).

    Parameters as :class:`~alphastomics.attn_model.multihead.MultiHeadProjections`.
    """

    def build_inner(self, hidden_dim: int, n_heads: int) -> None:
        """The distance bias of the logits and the distance features of the values."""
        self.distance_bias = nn.Sequential(
            nn.Linear(N_DISTANCE_FEATURES, _BIAS_HIDDEN),
            nn.SiLU(),
            nn.Linear(_BIAS_HIDDEN, n_heads, bias=False),  # a constant would cancel in the softmax
        )
        self.distance_value = nn.Linear(n_heads * N_DISTANCE_FEATURES, hidden_dim)

    def attend(
        self, q: Tensor, keys: Tensor, values: Tensor, graph: NeighborGraph, rows: slice
    ) -> Tensor:
        """Output (B, n, H) of the cells ``rows`` of the items, queries ``q`` (B, K, n, d).

        ``keys``/``values`` (B, K, N, d) hold every cell of the items; ``graph`` is theirs.
        """
        index = graph.index[:, rows]
        valid = graph.valid[:, rows]
        distance = graph.distance[:, rows]
        if torch.is_grad_enabled() and graph.index.shape[1] >= _CHECKPOINT_CELLS:
            return checkpoint(
                self._attend, q, keys, values, index, valid, distance, use_reentrant=False
            )
        return self._attend(q, keys, values, index, valid, distance)

    def _attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        index: Tensor,
        valid: Tensor,
        distance: Tensor,
    ) -> Tensor:
        b, heads, n, d = q.shape
        k = index.shape[2]
        n_all = keys.shape[2]
        # the same neighbours for every head: (B·K, n, k) rows into (B·K, N, d)
        head_index = index.unsqueeze(1).expand(b, heads, n, k).reshape(b * heads, n, k)
        k_near = gather_cells(keys.reshape(b * heads, n_all, d), head_index)  # (BK, n, k, d)
        logits = torch.matmul(k_near, q.reshape(b * heads, n, d, 1)).view(b, heads, n, k)
        del k_near
        rbf = distance_features(distance).to(q.dtype)  # (B, n, k, F)
        bias = self.distance_bias(rbf).permute(0, 3, 1, 2)  # (B, K, n, k)
        logits = logits / math.sqrt(d) + bias
        logits = logits.masked_fill(~valid.unsqueeze(1), _MASKED_LOGIT)
        weights = logits.float().softmax(dim=-1).to(q.dtype) * valid.unsqueeze(1)  # (B, K, n, k)
        v_near = gather_cells(values.reshape(b * heads, n_all, d), head_index)  # (BK, n, k, d)
        mixed = torch.matmul(weights.reshape(b * heads, n, 1, k), v_near)  # (BK, n, 1, d)
        mixed = mixed.view(b, heads, n, d).transpose(1, 2).reshape(b, n, heads * d)
        # an einsum batches over cells ((K x k) @ (k x F) per cell) instead of broadcasting the
        # distance features over the heads
        geometry = torch.einsum("bhnk,bnkf->bnhf", weights, rbf).reshape(b, n, -1)  # (B, n, K·F)
        return mixed + self.distance_value(geometry)  # (B, n, H)

    def project_out(self, out: Tensor) -> Tensor:
        """(B, n, H) -> (B, n, H) output projection with dropout."""
        return self.dropout(self.out(out))

    def forward(self, x: Tensor, graph: NeighborGraph) -> Tensor:
        """Attend over each cell's neighbours: ``x`` (B, N, H) -> (B, N, H)."""
        q, k, v = self.heads(x)
        return self.project_out(self.attend(q, k, v, graph, slice(None)))
