"""Losses of `alphastomics.diffusion_model.loss`: masking, invariances, sampled vs exact, memory."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from alphastomics.config import LossConfig
from alphastomics.data.batch import DataHolder
from alphastomics.diffusion_model import loss as loss_mod
from alphastomics.diffusion_model.loss import (
    DiffusionLoss,
    compute_loss,
    coordinate_loss,
    distance_loss,
    expression_loss,
    nearest_neighbors,
)

# the distance loss, as the tests below were written for it (the default is the coordinate loss)
LOSS_KWARGS = dataclasses.asdict(LossConfig(use_distance_matrix=True, align_rotation=False))

# Sampled vs exact distance loss on 2,000 cells (k = 16, R = 48): the estimate is unbiased with a
# relative standard deviation of about 0.3-0.4 % here (96,000 random pairs); 3 % per draw is
# more than 7 standard deviations, 1 % for the mean of 5 draws more than 5.
SAMPLED_RTOL_ONE_DRAW = 0.03
SAMPLED_RTOL_MEAN_OF_5 = 0.01


def slice_like(n: int, n_dims: int = 3, seed: int = 0) -> torch.Tensor:
    """(n, D) anisotropic cloud: a thin slab in 3D."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0, 2.0, 0.5][:n_dims])
    return torch.randn(n, n_dims, generator=g) * scale


def padded(items: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_b, D) items into (B, n, D) with padding at the end, and the (B, n) mask."""
    out = torch.zeros(len(items), n, items[0].shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, x in enumerate(items):
        out[i, : len(x)] = x
        mask[i, : len(x)] = True
    return out, mask


def random_orthogonal(n_dims: int, seed: int, reflect: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n_dims, n_dims, generator=torch.Generator().manual_seed(seed))
    )
    if reflect != bool(torch.linalg.det(q) < 0):
        q[:, 0] = -q[:, 0]
    return q


# ---------------------------------------------------------------- distance loss


def test_exact_distance_loss_matches_a_hand_computation() -> None:
    target = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    pred = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 4.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # pair distances true (3, 4, 5), predicted (1, 4, sqrt(17)); mean over the 3 unordered pairs
    expected = ((1 - 3) ** 2 + 0 + (math.sqrt(17) - 5) ** 2) / 3
    assert distance_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("exact_max_cells", [3000, 2])
def test_distance_loss_is_zero_for_identical_inputs(exact_max_cells: int) -> None:
    x, mask = padded([slice_like(40), slice_like(25, seed=1)], 40)
    x.requires_grad_(True)
    loss = distance_loss(x, x.detach(), mask, exact_max_cells=exact_max_cells)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n_dims", [2, 3])
@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("exact_max_cells", [3000, 2])
def test_distance_loss_is_invariant_to_rigid_motions(
    n_dims: int, reflect: bool, exact_max_cells: int
) -> None:
    target, mask = padded([slice_like(60, n_dims), slice_like(33, n_dims, seed=1)], 60)
    pred = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    pred = pred * mask.unsqueeze(-1)
    q = random_orthogonal(n_dims, seed=3, reflect=reflect)
    moved = (pred @ q.T + torch.arange(1.0, n_dims + 1) * 7) * mask.unsqueeze(-1)
    kwargs = {"exact_max_cells": exact_max_cells}
    base = distance_loss(pred, target, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    rigid = distance_loss(moved, target, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    assert base.item() > 0.01
    assert rigid.item() == pytest.approx(base.item(), rel=1e-4)


@pytest.mark.parametrize("exact_max_cells", [3000, 2])
def test_padded_cells_contribute_nothing(exact_max_cells: int) -> None:
    target, mask = padded([slice_like(50), slice_like(20, seed=1)], 50)
    pred = target + 0.2 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    pred = pred * mask.unsqueeze(-1)
    garbage_pred = pred.clone()
    garbage_pred[~mask] = torch.tensor([1e6, float("nan"), -3.0])
    garbage_target = target.clone()
    garbage_target[~mask] = 123.0
    garbage_pred.requires_grad_(True)
    kwargs = {"exact_max_cells": exact_max_cells}
    clean = distance_loss(pred, target, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    dirty = distance_loss(
        garbage_pred, garbage_target, mask, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)
    dirty.backward()
    assert torch.isfinite(garbage_pred.grad).all()
    assert (garbage_pred.grad[~mask] == 0).all()


def test_sampled_distance_loss_agrees_with_the_exact_one() -> None:
    n = 2000
    target = slice_like(n)[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    q = random_orthogonal(3, seed=4, reflect=True)
    g = torch.Generator().manual_seed(5)
    for pred in (
        target @ q.T + 0.1 * torch.randn(target.shape, generator=g),  # a good prediction
        torch.randn(target.shape, generator=g),  # an untrained one
    ):
        exact = distance_loss(pred, target, mask, exact_max_cells=n).item()
        draws = [
            distance_loss(
                pred, target, mask, exact_max_cells=2, generator=torch.Generator().manual_seed(s)
            ).item()
            for s in range(5)
        ]
        for value in draws:
            assert value == pytest.approx(exact, rel=SAMPLED_RTOL_ONE_DRAW)
        assert sum(draws) / 5 == pytest.approx(exact, rel=SAMPLED_RTOL_MEAN_OF_5)


def test_sampled_loss_is_exact_when_neighbours_cover_every_pair() -> None:
    target, mask = padded([slice_like(12)], 12)
    pred = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    exact = distance_loss(pred, target, mask)
    sampled = distance_loss(pred, target, mask, exact_max_cells=2, n_neighbor_pairs=11)
    assert sampled.item() == pytest.approx(exact.item(), rel=1e-5)


def test_chunked_exact_loss_equals_the_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    target, mask = padded([slice_like(70), slice_like(45, seed=1), slice_like(2, seed=2)], 70)
    base = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for pairs_per_chunk in (1 << 22, 3000):  # one block vs 5 checkpointed blocks of 14 rows
        monkeypatch.setattr(loss_mod, "_EXACT_PAIRS_PER_CHUNK", pairs_per_chunk)
        pred = base.clone().requires_grad_(True)
        value = distance_loss(pred, target, mask)
        value.backward()
        results.append((value.detach(), pred.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_distance_gradient_is_finite_at_coincident_points() -> None:
    target, mask = padded([slice_like(30)], 30)
    pred = torch.zeros_like(target, requires_grad=True)  # every predicted cell at one point
    for exact_max_cells in (3000, 2):
        distance_loss(pred, target, mask, exact_max_cells=exact_max_cells).backward()
        assert torch.isfinite(pred.grad).all()


def test_nearest_neighbors_match_brute_force_and_skip_self() -> None:
    x = slice_like(200)
    x[10] = x[11]  # a duplicated location
    x[12] = x[11]
    nb = nearest_neighbors(x, 5)
    assert nb.shape == (200, 5) and nb.dtype == torch.long
    assert not (nb == torch.arange(200)[:, None]).any()
    dist = torch.cdist(x.double(), x.double()).fill_diagonal_(float("inf"))
    kth = dist.topk(5, largest=False).values[:, -1]
    assert (dist.gather(1, nb) <= kth[:, None] + 1e-9).all()
    assert set(nb[11, :2].tolist()) == {10, 12}
    assert nearest_neighbors(x[:3], 16).shape == (3, 2)


def test_sampled_loss_never_builds_an_n_by_n_tensor() -> None:
    # 50,000 cells: an N x N float32 matrix is 10 GB. Peak RSS growth of forward + backward must
    # stay far below that (< 1 GB; about 0.1 GB in practice). Run in a fresh interpreter so the
    # peak belongs to this check alone.
    script = textwrap.dedent(
        """
        import resource
        import torch
        from alphastomics.diffusion_model.loss import distance_loss
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        n = 50_000
        target = torch.randn(1, n, 3, generator=g) * 10
        pred = (target + torch.randn(1, n, 3, generator=g)).requires_grad_(True)
        mask = torch.ones(1, n, dtype=torch.bool)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = distance_loss(pred, target, mask, generator=g)
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
        print((after - before) * 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    growth_bytes = int(result.stdout.strip().splitlines()[-1])
    assert growth_bytes < 1 << 30


# ---------------------------------------------------------------- other losses


def test_coordinate_loss_is_translation_invariant_only() -> None:
    target, mask = padded([slice_like(30), slice_like(10, seed=1)], 30)
    m = mask.unsqueeze(-1)
    shifted = (target + torch.tensor([5.0, -2.0, 1.0])) * m
    assert coordinate_loss(shifted, target, mask).item() == pytest.approx(0.0, abs=1e-10)
    rotated = target @ random_orthogonal(3, seed=0, reflect=False).T
    assert coordinate_loss(rotated, target, mask).item() > 0.1
    garbage = rotated.clone()
    garbage[~mask] = float("nan")
    torch.testing.assert_close(
        coordinate_loss(garbage, target, mask), coordinate_loss(rotated, target, mask)
    )


@pytest.mark.parametrize("n_dims", [2, 3])
def test_aligned_coordinate_loss_is_invariant_to_rigid_motions(n_dims: int) -> None:
    target, mask = padded([slice_like(40, n_dims), slice_like(12, n_dims, seed=1)], 40)
    m = mask.unsqueeze(-1)
    noise = 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3)) * m
    pred = target + noise
    base = coordinate_loss(pred, target, mask, align_rotation=True)
    assert base.item() <= coordinate_loss(pred, target, mask).item() + 1e-6
    for seed, reflect in ((0, False), (1, True)):
        moved = (pred @ random_orthogonal(n_dims, seed, reflect).T + 4.0) * m
        torch.testing.assert_close(coordinate_loss(moved, target, mask, align_rotation=True), base)
    rotated_truth = target @ random_orthogonal(n_dims, 2, False).T
    assert coordinate_loss(rotated_truth, target, mask, align_rotation=True).item() < 1e-10


def test_aligned_coordinate_loss_is_nan_not_an_error_for_a_nonfinite_cell() -> None:
    target, mask = padded([slice_like(40), slice_like(12, seed=1)], 40)
    pred = target.clone()
    pred[~mask] = float("nan")  # padding is never read
    assert coordinate_loss(pred, target, mask, align_rotation=True).item() < 1e-10
    pred[1, 0, 0] = float("inf")  # a real cell: NaN, as without alignment (the step is skipped)
    assert torch.isnan(coordinate_loss(pred, target, mask, align_rotation=True))


def test_aligned_coordinate_loss_gradient_holds_the_rotation_fixed_exactly() -> None:
    # at the optimal rotation the loss is stationary in it, so the gradient computed with the
    # rotation held fixed equals the full derivative: compare with finite differences
    target, mask = padded([slice_like(15, 3)], 15)
    pred = (target @ random_orthogonal(3, 4, False).T + 0.3 * torch.randn(1, 15, 3)).double()
    pred.requires_grad_(True)
    target, mask = target.double(), mask
    loss = coordinate_loss(pred, target, mask, align_rotation=True)
    (grad,) = torch.autograd.grad(loss, pred)
    step = torch.zeros_like(pred)
    step[0, 3, 1] = 1e-6
    with torch.no_grad():
        up = coordinate_loss(pred + step, target, mask, align_rotation=True)
        down = coordinate_loss(pred - step, target, mask, align_rotation=True)
    assert float((up - down) / 2e-6) == pytest.approx(float(grad[0, 3, 1]), rel=1e-5)


def test_expression_loss_masks_cells_and_unmeasured_genes() -> None:
    target = torch.zeros(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    gene_mask = torch.tensor([[True, True, False], [True, True, True]])
    pred = torch.ones(2, 4, 3)
    pred[0, :, 2] = 100.0  # unmeasured gene of item 0
    pred[0, 2:] = float("nan")  # padded cells of item 0
    pred[1] = 2.0
    # item 0: error 1 on each counted entry; item 1: error 4
    assert expression_loss(pred, target, mask, gene_mask).item() == pytest.approx(2.5)
    weights = torch.tensor([1.0, 0.0])
    assert expression_loss(pred, target, mask, gene_mask, weights).item() == pytest.approx(1.0)
    none = expression_loss(pred, target, mask, gene_mask, torch.zeros(2))
    assert none.item() == 0.0


def test_item_weights_zero_out_held_clean_items() -> None:
    target, mask = padded([slice_like(20), slice_like(15, seed=1)], 20)
    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    pred = pred * mask.unsqueeze(-1)
    wild = pred.clone()
    wild[1] = (
        torch.randn(20, 3, generator=torch.Generator().manual_seed(1)) * 50 * mask[1].unsqueeze(-1)
    )
    weights = torch.tensor([1.0, 0.0])
    for loss_fn in (distance_loss, coordinate_loss):
        ref = loss_fn(pred[:1], target[:1], mask[:1])
        torch.testing.assert_close(loss_fn(wild, target, mask, weights), ref)


# ---------------------------------------------------------------- compute_loss


def make_noised_batch(t_expression: list[float], t_position: list[float]) -> DataHolder:
    g = torch.Generator().manual_seed(0)
    pos, mask = padded([slice_like(25), slice_like(9, seed=1), slice_like(16, seed=2)], 25)
    expr = torch.randn(3, 25, 6, generator=g) * mask.unsqueeze(-1)
    gene_mask = torch.ones(3, 6, dtype=torch.bool)
    gene_mask[1, 4:] = False
    return DataHolder(
        expression=expr,
        positions=pos,
        node_mask=mask,
        gene_mask=gene_mask,
        t_expression=torch.tensor(t_expression),
        t_position=torch.tensor(t_position),
    )


@pytest.mark.parametrize("use_distance_matrix", [True, False])
def test_compute_loss_terms_and_total(use_distance_matrix: bool) -> None:
    data = make_noised_batch([0.3, 0.5, 0.9], [0.1, 0.0, 0.7])
    g = torch.Generator().manual_seed(1)
    pred_e = (data.expression + torch.randn(data.expression.shape, generator=g)).requires_grad_()
    pred_p = (data.positions + torch.randn(data.positions.shape, generator=g)).requires_grad_()
    kwargs = {**LOSS_KWARGS, "use_distance_matrix": use_distance_matrix}
    kwargs.update(lambda_expression=2.0, lambda_position=0.5)
    out = compute_loss(pred_e, pred_p, data, **kwargs)
    assert isinstance(out, DiffusionLoss)
    name = "position_distance_mse" if use_distance_matrix else "position_mse"
    assert set(out.terms) == {"expression_mse", name} == set(out.unweighted)
    torch.testing.assert_close(out.total, out.terms["expression_mse"] + out.terms[name])
    torch.testing.assert_close(out.terms["expression_mse"], 2.0 * out.unweighted["expression_mse"])
    torch.testing.assert_close(out.terms[name], 0.5 * out.unweighted[name])
    out.total.backward()
    assert torch.isfinite(pred_e.grad).all() and torch.isfinite(pred_p.grad).all()
    # position of item 1 was held clean (t = 0): it gets no gradient by default
    assert (pred_p.grad[1] == 0).all()
    assert (pred_p.grad[0] != 0).any()


def test_held_clean_modalities_give_zero_not_nan() -> None:
    data = make_noised_batch([0.0, 0.0, 0.0], [0.4, 0.6, 0.2])
    pred_e = torch.full(data.expression.shape, 1e3, requires_grad=True)
    pred_p = data.positions.clone().requires_grad_(True)
    out = compute_loss(
        pred_e,
        pred_p,
        data,
        **LOSS_KWARGS,
        expression_weight=torch.zeros(3),
        position_weight=torch.ones(3),
    )
    assert out.terms["expression_mse"].item() == 0.0
    assert out.terms["position_distance_mse"].item() == pytest.approx(0.0, abs=1e-10)
    out.total.backward()
    assert (pred_e.grad == 0).all()
    assert torch.isfinite(pred_p.grad).all()


def test_distance_loss_mixes_exact_and_sampled_items() -> None:
    big, small = slice_like(400), slice_like(30, seed=1)
    target, mask = padded([big, small], 400)
    pred = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    pred = pred * mask.unsqueeze(-1)
    both = distance_loss(
        pred, target, mask, exact_max_cells=100, generator=torch.Generator().manual_seed(0)
    )
    small_only = distance_loss(pred[1:, :30], target[1:, :30], mask[1:, :30])
    big_only = distance_loss(
        pred[:1],
        target[:1],
        mask[:1],
        exact_max_cells=100,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(both, (small_only + big_only) / 2)
