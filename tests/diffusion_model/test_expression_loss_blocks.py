"""The block-wise expression loss equals the plain masked MSE, values and gradients."""

import pytest
import torch

from alphastomics.diffusion_model import loss


def _plain(pred, target, node_mask, gene_mask):
    entry = node_mask.unsqueeze(-1) & gene_mask.unsqueeze(1)
    diff = torch.where(entry, pred, 0.0) - torch.where(entry, target, 0.0)
    return (diff.square().sum(dim=(1, 2)) / entry.sum(dim=(1, 2)).clamp(min=1)).mean()


@pytest.mark.parametrize("block", [7, 8192])
def test_blockwise_loss_matches_the_plain_expression(monkeypatch, block):
    monkeypatch.setattr(loss, "_SSE_BLOCK_CELLS", block)
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 50, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 50, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    node_mask = torch.rand(3, 50, generator=gen) > 0.2
    gene_mask = torch.rand(3, 6, generator=gen) > 0.3
    gene_mask[:, 0] = True
    with torch.no_grad():  # non-finite values where the mask is False must not leak
        pred[~node_mask] = float("nan")
        target.masked_fill_(~gene_mask.unsqueeze(1), float("inf"))
    ours = loss.expression_loss(pred, target, node_mask, gene_mask)
    ours_grads = torch.autograd.grad(ours, (pred, target))
    reference = _plain(pred, target, node_mask, gene_mask)
    reference_grads = torch.autograd.grad(reference, (pred, target))
    assert torch.isfinite(ours) and torch.allclose(ours, reference)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b)
