"""Activation checkpointing (``model.checkpoint_min_cells``): same outputs and gradients."""

import pytest
import torch

from alphastomics.attn_model import transformer
from alphastomics.attn_model.model import Denoiser
from alphastomics.attn_model.transformer import TransformerLayer


def _grads(module, inputs, run):
    module.zero_grad()
    for x in inputs:
        x.grad = None
    out = run()
    (out * torch.sin(out)).sum().backward()
    return (
        out.detach(),
        [x.grad.clone() for x in inputs],
        [p.grad.clone() for p in module.parameters()],
    )


def _close(a, b):
    scale = max(float(a.abs().max()), 1e-6)
    return float((a - b).abs().max()) / scale < 1e-4


@pytest.mark.parametrize("local", [False, True])
def test_recomputed_chunks_match_the_stored_forward(monkeypatch, local):
    monkeypatch.setattr(transformer, "_CHUNK_BYTES", 700 * 2 * 64 * 4)  # ~700-cell chunks
    monkeypatch.setattr(transformer, "_MIN_CHUNK_CELLS", 100)
    torch.manual_seed(0)
    layer = TransformerLayer(32, 4, 2, 0.0, 1e-5, local_attention=local)
    h = torch.randn(2, 2000, 32, requires_grad=True)
    cond = torch.randn(2, 32)
    mask = torch.ones(2, 2000, dtype=torch.bool)
    mask[0, :800] = False  # a whole chunk of padding in item 0
    mask[1, 1900:] = False
    graph = None
    if local:
        from alphastomics.attn_model.neighbors import knn_graph

        graph = knn_graph(torch.randn(2, 2000, 2), mask, 8)
    stored = _grads(layer, [h], lambda: layer(h, cond, mask, graph))
    recomputed = _grads(layer, [h], lambda: layer(h, cond, mask, graph, recompute=True))
    assert _close(stored[0], recomputed[0])
    assert _close(stored[1][0], recomputed[1][0])
    assert all(_close(a, b) for a, b in zip(stored[2], recomputed[2], strict=True))
    assert torch.all(recomputed[0][0, :800] == 0)  # padded rows stay 0


def test_denoiser_checkpoints_only_large_batches_under_autograd(monkeypatch):
    torch.manual_seed(0)
    net = Denoiser(n_genes=5, n_dims=2, hidden_dim=16, n_layers=2, n_heads=2, local_neighbors=0)
    calls = []
    for layer in net.layers:
        original = layer.forward

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("recompute", False))
            return _original(*args, **kwargs)

        monkeypatch.setattr(layer, "forward", spy)
    expr, pos = torch.randn(1, 50, 5), torch.randn(1, 50, 2)
    t = torch.full((1,), 0.5)
    mask = torch.ones(1, 50, dtype=torch.bool)
    genes = torch.ones(1, 5, dtype=torch.bool)
    for limit, grad, expected in [
        (None, True, False),
        (50, True, True),
        (51, True, False),
        (0, False, False),
    ]:
        net.checkpoint_min_cells = limit
        calls.clear()
        with torch.set_grad_enabled(grad):
            net(expr, pos, t, t, mask, genes)
        assert calls == [expected] * 2, (limit, grad)


@pytest.mark.parametrize("local_neighbors", [0, 4])
def test_checkpointed_denoiser_has_the_same_outputs_and_gradients(monkeypatch, local_neighbors):
    monkeypatch.setattr(transformer, "_CHUNK_BYTES", 300 * 64 * 4)  # chunks of a few hundred
    monkeypatch.setattr(transformer, "_MIN_CHUNK_CELLS", 50)
    torch.manual_seed(0)
    net = Denoiser(
        n_genes=7, n_dims=2, hidden_dim=16, n_layers=2, n_heads=2, local_neighbors=local_neighbors
    )
    gen = torch.Generator().manual_seed(1)
    expr = torch.randn(2, 700, 7, generator=gen, requires_grad=True)
    pos = torch.randn(2, 700, 2, generator=gen, requires_grad=True)
    mask = torch.ones(2, 700, dtype=torch.bool)
    mask[1, 600:] = False
    genes = torch.ones(2, 7, dtype=torch.bool)
    genes[0, 3] = False
    t_e, t_p = torch.tensor([0.3, 0.0]), torch.tensor([0.7, 0.2])

    def run():
        out = net(expr, pos, t_e, t_p, mask, genes)
        return torch.cat([out.expression, out.positions, out.hidden], dim=-1)

    results = []
    for limit in (None, 0):
        net.checkpoint_min_cells = limit
        results.append(_grads(net, [expr, pos], run))
    (out_a, inputs_a, params_a), (out_b, inputs_b, params_b) = results
    assert _close(out_a, out_b)
    assert all(_close(a, b) for a, b in zip(inputs_a, inputs_b, strict=True))
    assert all(_close(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_partial_projections_match_the_full_heads():
    from alphastomics.attn_model.self_attention import LinearSelfAttention

    torch.manual_seed(0)
    attention = LinearSelfAttention(32, 4, 0.0)
    x = torch.randn(2, 9, 32)
    q, k, v = attention.heads(x)
    k2, v2 = attention.keys_values(x)
    assert torch.allclose(attention.queries(x), q) and torch.allclose(k2, k)
    assert torch.allclose(v2, v)
