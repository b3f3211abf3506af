"""DPM-Solver++(2M): coefficient identities and second-order accuracy on Gaussian data."""

from types import SimpleNamespace

import pytest
import torch

from alphastomics.diffusion_model.diffusion_utils import sample_masked_gaussian
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler


def _steps(*values):
    return torch.tensor(values, dtype=torch.long)


def test_first_order_step_is_ddim_at_eta_0_and_the_posterior_at_eta_1():
    schedule = NoiseModel(diffusion_steps=1000).schedule("position")
    t, s = _steps(1000, 700, 31, 2), _steps(640, 120, 30, 1)
    c_z, c_x0, c_noise, h = schedule.dpm_coefficients(t, s, 0.0)
    d_z, d_x0, _ = schedule.ddim_coefficients(t, s, 0.0)
    assert torch.allclose(c_z, d_z, rtol=1e-5) and torch.allclose(c_x0, d_x0, rtol=1e-4)
    assert torch.all(c_noise == 0) and torch.all(h > 0)
    c_z, c_x0, c_noise, _ = schedule.dpm_coefficients(t, s, 1.0)
    p_z, p_x0, var = schedule.posterior_coefficients(t, s)
    assert torch.allclose(c_z, p_z, rtol=1e-4)
    assert torch.allclose(c_x0, p_x0, rtol=1e-4)
    assert torch.allclose(c_noise, var.sqrt(), rtol=1e-4)


def test_last_step_returns_the_estimate_and_equal_steps_are_the_identity():
    noise_model = NoiseModel(diffusion_steps=100)
    z, x0 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    previous = (torch.randn(2, 5, 3), torch.tensor([0.3, 0.3]))
    out, h = noise_model.dpm_solver_step(
        "expression",
        x0,
        z,
        _steps(7, 4),
        _steps(0, 4),
        1.0,
        torch.randn(2, 5, 3),
        previous=previous,
    )
    assert torch.allclose(out[0], x0[0]) and torch.equal(out[1], z[1])
    assert torch.isinf(h[0]) and h[1] == 0


def _gaussian_denoiser(noise_model: NoiseModel, spread: float):
    """Exact E[x0 | z_t] for expression x0 ~ N(0, spread^2) per entry."""
    schedule = noise_model.schedule("expression")

    def model(expr, pos, t_expr, t_pos, mask, gene_mask):
        step = torch.round(t_expr * noise_model.T).long()
        alpha = schedule.alpha.double()[step].view(-1, 1, 1)
        sigma = schedule.sigma.double()[step].view(-1, 1, 1)
        x0 = alpha * spread**2 * expr.double() / (alpha**2 * spread**2 + sigma**2)
        return SimpleNamespace(expression=x0.to(expr.dtype), positions=pos)

    return model


@pytest.mark.parametrize("spread", [0.3, 1.0])
def test_second_order_solver_tracks_the_probability_flow_better_than_ddim(spread):
    noise_model = NoiseModel(diffusion_steps=1000)
    sampler = DiffusionSampler(_gaussian_denoiser(noise_model, spread), noise_model, grid_power=2.0)
    expr = torch.zeros(1, 400, 4)
    pos = torch.zeros(1, 400, 2)
    mask = torch.ones(1, 400, dtype=torch.bool)
    # the sampler's first draw from the generator is its z_T
    z_T = sample_masked_gaussian((1, 400, 4), mask, generator=torch.Generator().manual_seed(0))
    schedule = noise_model.schedule("expression")
    alpha_T, sigma_T = schedule.alpha[-1].double(), schedule.sigma[-1].double()
    # the probability-flow ODE of Gaussian data is linear: x0 = z_T * spread / std(z_T)
    exact = z_T.double() * spread / torch.sqrt(alpha_T**2 * spread**2 + sigma_T**2)
    errors = {}
    for kind in ("ddim", "dpm"):
        out, _ = sampler.sample(
            expr,
            pos,
            mask,
            "pos_to_expr",
            sampler=kind,
            steps=10,
            eta=0.0,
            generator=torch.Generator().manual_seed(0),
        )
        errors[kind] = float((out.double() - exact).abs().max() / exact.abs().max())
    assert errors["dpm"] < 0.5 * errors["ddim"], errors
    assert errors["dpm"] < 0.06, errors
