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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alphastomics.attn_model.multihead import MultiHeadProjections
from alphastomics.data.batch import keeps_everything


def attention_context(
    keys: Sequence[Tensor], values: Sequence[Tensor], masks: Sequence[Tensor]
) -> Tensor:
    """Normalised context ``softmax_cells(K)ᵀ V`` of all cells, given in chunks along N.

    Parameters
    ----------
    keys, values
        Chunks (B, K, n_c, d) of the keys and values per head; the chunks together hold all N
        cells (one chunk is the plain case).
    masks
        Matching (B, n_c) bool chunks, True for a real cell.

    Returns
    -------
    Tensor
        (B, K, d, d) float32 context. Padded keys get weight exactly 0 and padded values are
        zeroed; each chunk's key softmax subtracts the chunk's max and is rescaled to the max
        over all real cells (no gradient, it cancels), in float32, so it stays finite for 200k
        cells and large logits. An item
        without real cells gets a zero context.
    """
    parts = [context_part(k, v, m) for k, v, m in zip(keys, values, masks, strict=True)]
    return combine_context_parts(parts)


def context_part(k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's share of :func:`attention_context`, relative to the chunk's own key max.

    Parameters
    ----------
    k, v
        (B, K, n_c, d) keys and values of the chunk's cells; ``mask`` (B, n_c) bool.

    Returns
    -------
    (part, total, k_max)
        ``part = Σ_cells exp(k - k_max) vᵀ`` (B, K, d, d), ``total = Σ_cells exp(k - k_max)``
        (B, K, d) and the chunk's max over real cells ``k_max`` (B, K, d), no gradient
        (``-inf`` features where the chunk has no real cell), all float32. Combine the chunks
        with :func:`combine_context_parts`.
    """
    with torch.autocast(device_type=k.device.type, enabled=False):
        k, v = k.float(), v.float()
        if not keeps_everything(mask):  # a whole slice has no padding: no masked copies then
            keep = mask[:, None, :, None]  # (B, 1, n_c, 1)
            k = k.masked_fill(~keep, float("-inf"))
            v = v.masked_fill(~keep, 0.0)
        k_max = k.detach().amax(dim=2)  # (B, K, d)
        shift = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max)).unsqueeze(2)
        weights = torch.exp(k - shift)  # (B, K, n_c, d)
        part = torch.einsum("bknd,bkne->bkde", weights, v)  # (B, K, d, d)
        return part, weights.sum(dim=2), k_max


def combine_context_parts(parts: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The context of all cells from the chunks' :func:`context_part` results -> (B, K, d, d).

    Each chunk's share is rescaled to the common max (the log-sum-exp trick of blockwise
    attention); the max itself carries no gradient, so the result does not depend on how the
    cells are chunked, up to floating-point summation order.
    """
    k_max = torch.stack([m for _, _, m in parts]).amax(dim=0)  # (B, K, d)
    k_max = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max))
    context = normaliser = None
    for part, total, chunk_max in parts:
        finite = torch.isfinite(chunk_max)
        shift = torch.where(finite, chunk_max, torch.zeros_like(chunk_max))
        scale = torch.where(finite, torch.exp(shift - k_max), torch.zeros_like(k_max))  # (B, K, d)
        context = (
            part * scale.unsqueeze(-1) if context is None else context + part * scale.unsqueeze(-1)
        )
        total = total * scale
        normaliser = total if normaliser is None else normaliser + total
    return context / normaliser.clamp_min(1.0).unsqueeze(-1)  # (B, K, d, d)


def attention_readout(q: Tensor, context: Tensor) -> Tensor:
    """Each cell's output ``softmax_features(q_i) · context`` -> (B, K, n, d) in ``q``'s dtype."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = torch.einsum("bknd,bkde->bkne", q.float().softmax(dim=-1), context)  # (B, K, n, d)
    return out.to(q.dtype)


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
    context = attention_context([k], [v], [mask])  # (B, K, d, d)
    return attention_readout(q, context).to(v.dtype)


class LinearSelfAttention(MultiHeadProjections):
    """Multi-head masked linear self-attention of cell states (B, N, H) -> (B, N, H).

    Parameters as :class:`~alphastomics.attn_model.multihead.MultiHeadProjections`.
    """

    def queries(self, x: Tensor) -> Tensor:
        """Queries alone (B, K, n, d), one third of :meth:`heads`' projection."""
        return self._project(x, 0, 1)[0]

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values alone (B, K, n, d), two thirds of :meth:`heads`' projection."""
        k, v = self._project(x, 1, 3)
        return k, v

    def _project(self, x: Tensor, first: int, stop: int) -> tuple[Tensor, ...]:
        # rows [first * H, stop * H) of the qkv projection, split per head like `heads`
        b, n, h = x.shape
        rows = slice(first * h, stop * h)
        bias = None if self.qkv.bias is None else self.qkv.bias[rows]
        out = F.linear(x, self.qkv.weight[rows], bias)  # (B, n, parts * H)
        out = out.view(b, n, stop - first, self.n_heads, h // self.n_heads)
        return tuple(out.permute(2, 0, 3, 1, 4).unbind(0))  # each (B, K, n, d)

    def project_out(self, out: Tensor) -> Tensor:
        """Merge the heads of ``out`` (B, K, n, d) and project -> (B, n, H)."""
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, n, H)
        return self.dropout(self.out(out))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Attend over the real cells of each item: ``x`` (B, N, H), ``mask`` (B, N) bool."""
        q, k, v = self.heads(x)
        return self.project_out(masked_linear_attention(q, k, v, mask))  # (B, N, H)
