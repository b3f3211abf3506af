"""sampling.consensus: expr_to_pos pulls each cell's estimate toward the cells alike in
expression placed near it; other modes, known cells and padding are untouched."""

import math

import pytest
import torch
from conftest import padded_batch, small_denoiser

from alphastomics.config import load_config, upgrade_saved_config
from alphastomics.data.batch import center, masked_mean
from alphastomics.diffusion_model import sample as sample_module
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler, pull_to_neighbors
from alphastomics.errors import UserInputError
from alphastomics.training.module import AlphaSTomicsModule


def _line() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell 0 at the origin with two alike cells, one at x = 1 and one at x = 10; cell 3 at
    (100, 100) is nobody's valid neighbour."""
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [100.0, 100.0]]])
    index = torch.tensor([[[1, 2], [0, 3], [0, 3], [3, 3]]])
    valid = torch.tensor([[[True, True], [True, False], [True, False], [False, False]]])
    return positions, index, valid


def test_pull_follows_the_alike_cells_placed_near_not_those_far_away() -> None:
    positions, index, valid = _line()
    assert torch.equal(pull_to_neighbors(positions, index, valid, 0.0), positions)
    pulled = pull_to_neighbors(positions, index, valid, 1.0)
    # cell 0: the near cell (x = 1) weighs more than the far one (x = 10), by a Gaussian whose
    # variance is the item's mean squared distance to valid neighbours ((1 + 100) * 2 / 4)
    near, far = math.exp(-0.5 * 1 / 50.5), math.exp(-0.5 * 100 / 50.5)
    expected = (near * 1 + far * 10) / (near + far)
    assert float(pulled[0, 0, 0]) == pytest.approx(expected) and float(pulled[0, 0, 1]) == 0.0
    assert expected < 5.5 - 1  # well short of the unweighted mean of the two
    # one valid neighbour each: cells 1 and 2 move the share of the way to cell 0
    half = pull_to_neighbors(positions, index, valid, 0.5)
    assert torch.allclose(half[0, 1], torch.tensor([0.5, 0.0]))
    assert torch.allclose(half[0, 2], torch.tensor([5.0, 0.0]))
    # a cell without valid neighbours stays; an invalid neighbour never leaks in
    assert torch.equal(half[0, 3], positions[0, 3])
    moved = positions.clone()
    moved[0, 3] = torch.tensor([-7.0, 3.0])
    assert torch.equal(pull_to_neighbors(moved, index, valid, 0.5)[0, :3], half[0, :3])


def _setup() -> tuple[DiffusionSampler, DiffusionSampler, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = small_denoiser(n_dims=2)
    noise = NoiseModel(diffusion_steps=50)
    expr, pos, mask = padded_batch(n_cells=12, n_real_second=8, n_dims=2)
    off = DiffusionSampler(model, noise, eta=1.0)
    on = DiffusionSampler(model, noise, eta=1.0, consensus=0.5, consensus_neighbors=3)
    return off, on, expr, pos, mask


def _draw(sampler: DiffusionSampler, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return sampler.sample(*args, steps=5, generator=torch.Generator().manual_seed(7), **kwargs)


def test_only_expr_to_pos_changes_and_its_expression_is_searched_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off, on, expr, pos, mask = _setup()
    searches = []
    real = sample_module.expression_neighbor_index

    def spy(*args):
        searches.append(args[2])
        return real(*args)

    monkeypatch.setattr(sample_module, "expression_neighbor_index", spy)
    for mode in ("pos_to_expr", "joint"):
        plain, pulled = _draw(off, expr, pos, mask, mode), _draw(on, expr, pos, mask, mode)
        assert torch.equal(plain[0], pulled[0]) and torch.equal(plain[1], pulled[1])
    assert searches == []
    plain, pulled = (
        _draw(off, expr, pos, mask, "expr_to_pos"),
        _draw(on, expr, pos, mask, "expr_to_pos"),
    )
    assert searches == [3]  # once for the 5 steps, with consensus_neighbors cells
    assert not torch.allclose(plain[1], pulled[1], atol=1e-4)
    assert torch.equal(pulled[0], expr) and torch.all(pulled[1][1, 8:] == 0)
    assert torch.allclose(masked_mean(pulled[1], mask), torch.zeros(2, 2), atol=1e-5)


def test_known_cells_stay_at_their_true_positions_with_consensus() -> None:
    _, on, expr, pos, mask = _setup()
    pos = pos + 3.0
    known = torch.zeros_like(mask)
    known[:, :5] = True
    _, placed = _draw(on, expr, pos, mask, "expr_to_pos", known=known)
    assert torch.allclose(placed[:, :5], pos[:, :5], atol=1e-5)
    assert torch.all(placed[1, 8:] == 0)


def test_consensus_reaches_the_sampler_is_checked_and_old_checkpoints_keep_it_off() -> None:
    cfg = load_config(overrides=["model.hidden_dim=16", "model.n_layers=1", "model.n_heads=2"])
    assert cfg.sampling.consensus == 0.5 and cfg.sampling.consensus_neighbors == 10
    sampler = AlphaSTomicsModule(cfg, num_genes=5).predictor.sampler()
    assert sampler.consensus == 0.5 and sampler.consensus_neighbors == 10
    with pytest.raises(UserInputError, match=r"sampling\.consensus must"):
        load_config(overrides=["sampling.consensus=1.5"])
    with pytest.raises(UserInputError, match=r"sampling\.consensus_neighbors"):
        load_config(overrides=["sampling.consensus_neighbors=0"])
    assert upgrade_saved_config({"sampling": {"steps": 10}})["sampling"]["consensus"] == 0.0
    kept = upgrade_saved_config({"sampling": {"consensus": 0.25}})
    assert kept["sampling"]["consensus"] == 0.25


def test_consensus_keeps_the_spread_of_each_estimate() -> None:
    """A pull toward neighbours shrinks a layout; the sampler scales it back, per item, to the
    RMS radius of the network's own estimate, so only the arrangement changes."""
    _, on, expr, pos, mask = _setup()
    estimates = []
    forward = on.model.forward

    def recording(*args):
        out = forward(*args)
        estimates.append(center(out.positions, mask))
        return out

    on.model.forward = recording
    _, placed = _draw(on, expr, pos, mask, "expr_to_pos")
    real = mask.unsqueeze(-1).float()

    def radius(x: torch.Tensor) -> torch.Tensor:
        return ((x.square() * real).sum(dim=(1, 2)) / real.sum(dim=(1, 2))).sqrt()

    torch.testing.assert_close(radius(placed), radius(estimates[-1]))
    assert not torch.allclose(placed, estimates[-1], atol=1e-4)  # but arranged differently
