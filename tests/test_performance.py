"""Performance changes that must not change results: chunked layers, lean autograd functions,
fast ranks, the neighbour cache of the sampled distance loss, and the malloc tuning switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from alphastomics.attn_model import transformer
from alphastomics.attn_model.layers import _ActivationLinear, _ModulatedLayerNorm
from alphastomics.attn_model.model import Denoiser
from alphastomics.diffusion_model.loss import NeighborCache, distance_loss, nearest_neighbors
from alphastomics.evaluation.metrics import _rank


def _inputs(b: int, n: int, n_genes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n_real = torch.tensor([[n], [n - n // 3]])[:b]
    gene_mask = torch.ones(b, n_genes, dtype=torch.bool)
    gene_mask[0, :2] = False
    return {
        "expression_t": torch.randn(b, n, n_genes, generator=gen),
        "positions_t": torch.randn(b, n, 3, generator=gen),
        "t_expression": torch.rand(b, generator=gen),
        "t_position": torch.rand(b, generator=gen),
        "node_mask": torch.arange(n).expand(b, n) < n_real,
        "gene_mask": gene_mask,
    }


def _outputs_and_grads(net: Denoiser, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    net.zero_grad()
    out = net(**inputs)
    (out.expression.square().sum() + out.positions.square().sum()).backward()
    return [out.expression, out.positions, out.hidden] + [p.grad for p in net.parameters()]


def test_chunked_layers_match_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = Denoiser(n_genes=10, hidden_dim=16, n_layers=2, n_heads=2).train()
    inputs = _inputs(2, 300, 10)
    whole = _outputs_and_grads(net, inputs)
    monkeypatch.setattr(transformer, "_CHUNK_BYTES", 64 * 48 * 4)  # 64 cells per chunk
    monkeypatch.setattr(transformer, "_MIN_CHUNK_CELLS", 64)
    assert transformer.chunk_cells(2, 300, 48, 4) == 64  # the patch takes effect
    chunked = _outputs_and_grads(net, inputs)
    for a, b in zip(whole, chunked, strict=True):  # equal up to float summation order
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-6


def test_chunks_stay_under_the_byte_budget() -> None:
    cells = transformer.chunk_cells(1, 100_000, 3 * 128, 4)
    assert cells * 3 * 128 * 4 <= transformer._CHUNK_BYTES
    assert transformer.chunk_cells(1, 500, 3 * 128, 4) == 500  # small slices: one chunk


def test_lean_autograd_functions_have_exact_gradients() -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, scale, shift = rand(2, 5, 6), rand(2, 1, 6), rand(2, 1, 6)
    assert torch.autograd.gradcheck(
        lambda a, s, t: _ModulatedLayerNorm.apply(a, s, t, 1e-5), (x, scale, shift)
    )
    for activation in ("gelu", "silu"):
        a, weight, bias = rand(2, 5, 8), rand(4, 8), rand(4)
        assert torch.autograd.gradcheck(
            lambda u, w, c, act=activation: _ActivationLinear.apply(u, w, c, act), (a, weight, bias)
        )


@pytest.mark.parametrize("axis", [0, 1])
def test_fast_rank_matches_scipy_with_ties(axis: int) -> None:
    rng = np.random.default_rng(0)
    for x in (rng.random((30, 40)), rng.integers(0, 4, (30, 40)).astype(float), np.ones((3, 5))):
        np.testing.assert_array_equal(_rank(x, axis), rankdata(x, axis=axis))


def test_neighbor_cache_reuses_only_identical_positions() -> None:
    pos = torch.randn(400, 3, generator=torch.Generator().manual_seed(0))
    cache = NeighborCache(k=8)
    first = cache.get(5, pos)
    assert torch.equal(first, nearest_neighbors(pos, 8)) and len(cache) == 1
    stored = cache._entries[5][1]
    assert torch.equal(cache.get(5, pos.clone()), first)  # same values: served from the cache
    assert cache._entries[5][1] is stored
    moved = pos.clone()
    moved[0] += 10.0
    assert torch.equal(cache.get(5, moved), nearest_neighbors(moved, 8))  # changed: recomputed
    assert torch.equal(cache.get(5, pos[:300]), nearest_neighbors(pos[:300], 8))  # subset


def test_neighbor_cache_respects_its_budget_and_feeds_distance_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 500, 3, generator=gen)
    pred = torch.randn(2, 500, 3, generator=gen)
    mask = torch.ones(2, 500, dtype=torch.bool)
    mask[1, 450:] = False
    small = NeighborCache(k=16, max_bytes=500 * 76)  # room for one slice
    neighbors = small.lookup(target, mask, torch.tensor([0, 1]), min_cells=100)
    assert len(small) == 1 and small.nbytes <= small.max_bytes
    assert neighbors is not None and neighbors[1].shape == (450, 16)
    assert NeighborCache(k=16).lookup(target, mask, None, min_cells=100) is None
    assert NeighborCache(k=16).lookup(target, mask, torch.tensor([0, 1]), 1000) == [None, None]

    def loss(nb: list[torch.Tensor | None] | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        return distance_loss(pred, target, mask, exact_max_cells=100, generator=g, neighbors=nb)

    torch.testing.assert_close(loss(neighbors), loss(None), rtol=0, atol=0)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only"
)
def test_malloc_tuning_is_applied_once_and_can_be_switched_off() -> None:
    code = textwrap.dedent(
        """
        from alphastomics.utils import memory
        print(memory.tune_malloc(), memory.tune_malloc(), memory._state["reason"])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ALPHASTOMICS_MALLOC_TUNING": "0"},
        capture_output=True,
        text=True,
    )
    user = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_MAX_": "10"},
        capture_output=True,
        text=True,
    )
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert on.stdout.split()[:2] == (["True", "True"] if glibc else ["False", "False"])
    assert off.stdout.startswith("False False ALPHASTOMICS_MALLOC_TUNING=0")
    assert user.stdout.startswith("False False malloc is already tuned")
