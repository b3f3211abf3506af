"""Schedule, forward noising, posterior and DDIM of `alphastomics.diffusion_model.noise_model`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alphastomics.config import DiffusionConfig
from alphastomics.data.batch import DataHolder, apply_mask, center, masked_mean
from alphastomics.diffusion_model.diffusion_utils import (
    MAX_BETA,
    cosine_alpha_bar,
    extract,
    sample_centered_gaussian,
    sample_masked_gaussian,
)
from alphastomics.diffusion_model.noise_model import NoiseModel

T = 100


def make_batch(seed: int = 0, n_dims: int = 3) -> DataHolder:
    """Three items with 12, 7 and 3 real cells; item 1 has a padded row in the middle."""
    g = torch.Generator().manual_seed(seed)
    b, n, genes = 3, 12, 5
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0] = True
    mask[1, :8] = True
    mask[1, 4] = False
    mask[2, :3] = True
    m = mask.unsqueeze(-1).float()
    expression = torch.randn(b, n, genes, generator=g) * m
    positions = (torch.randn(b, n, n_dims, generator=g) * 2 + 5) * m
    return DataHolder(expression=expression, positions=positions, node_mask=mask)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [2, 10, 1000])
@pytest.mark.parametrize("nu", [0.5, 1.0, 2.0])
def test_alpha_bar_shape_and_bounds(steps: int, nu: float) -> None:
    ab = cosine_alpha_bar(steps, nu)
    assert ab.dtype == torch.float64
    assert ab.shape == (steps + 1,)
    assert torch.isfinite(ab).all()
    assert ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    assert 0 < ab[-1] < 1e-3
    assert (1 - ab[1:] / ab[:-1]).max() <= MAX_BETA + 1e-12


def test_nu_delays_the_noise() -> None:
    ab = {nu: cosine_alpha_bar(1000, nu) for nu in (0.5, 1.0, 2.0)}
    inner = slice(1, 1000)
    assert (ab[2.0][inner] > ab[1.0][inner]).all()
    assert (ab[1.0][inner] > ab[0.5][inner]).all()
    assert ab[1.0][500] == pytest.approx(0.4938, abs=1e-3)  # cos^2 at t = 1/2


def test_schedule_buffers() -> None:
    nm = NoiseModel(diffusion_steps=T, nu_expression=1.0, nu_position=2.0)
    assert nm.T == T
    assert not nm.state_dict()  # non-persistent: rebuilt from config
    for sched, nu in ((nm.expression, 1.0), (nm.position, 2.0)):
        for name in ("alpha_bar", "alpha", "sigma", "log_alpha_bar"):
            buf = getattr(sched, name)
            assert buf.dtype == torch.float32
            assert buf.shape == (T + 1,)
            assert torch.isfinite(buf).all()
        ref = cosine_alpha_bar(T, nu)
        torch.testing.assert_close(sched.alpha_bar.double(), ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(sched.alpha.double(), ref.sqrt(), rtol=1e-6, atol=0)
        torch.testing.assert_close(sched.sigma.double(), (1 - ref).sqrt(), rtol=1e-5, atol=0)
        assert sched.alpha[0] == 1.0
        assert sched.sigma[0] == 0.0


def test_config_kwargs_build_the_model() -> None:
    nm = NoiseModel(**dataclasses.asdict(DiffusionConfig()))
    assert nm.T == 1000
    with pytest.raises(ValueError, match="noise_schedule"):
        NoiseModel(noise_schedule="linear")  # type: ignore[arg-type]


def test_extract_broadcasts() -> None:
    coeffs = torch.arange(11.0)
    out = extract(coeffs, torch.tensor([0, 3, 10]), 3)
    assert out.shape == (3, 1, 1)
    assert out.flatten().tolist() == [0.0, 3.0, 10.0]


# ---------------------------------------------------------------- noise draws


def test_gaussians_respect_the_mask_and_generator() -> None:
    mask = make_batch().node_mask
    state = torch.random.get_rng_state()
    a = sample_centered_gaussian((3, 12, 3), mask, generator=torch.Generator().manual_seed(1))
    b = sample_centered_gaussian((3, 12, 3), mask, generator=torch.Generator().manual_seed(1))
    c = sample_masked_gaussian((3, 12, 5), mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG use
    assert torch.equal(a, b)
    assert (a[~mask] == 0).all() and (c[~mask] == 0).all()
    assert masked_mean(a, mask).abs().max() < 1e-6
    assert (c[mask] != 0).all()


def test_sample_steps_range_and_reproducible() -> None:
    nm = NoiseModel(diffusion_steps=T)
    s1 = nm.sample_steps(4000, device="cpu", generator=torch.Generator().manual_seed(0))
    s2 = nm.sample_steps(4000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert s1.dtype == torch.long and s1.shape == (4000,)
    assert torch.equal(s1, s2)
    assert s1.min() == 1 and s1.max() == T


# ---------------------------------------------------------------- apply_noise


def test_apply_noise_with_injected_noise_is_exact() -> None:
    nm = NoiseModel(diffusion_steps=T, nu_expression=1.5, nu_position=0.7)
    data = make_batch()
    mask = data.node_mask
    g = torch.Generator().manual_seed(3)
    eps_e = torch.randn(data.expression.shape, generator=g)
    eps_p = center(torch.randn(data.positions.shape, generator=g), mask)
    step_e = torch.tensor([5, T, 1])
    step_p = torch.tensor([T, 40, 2])
    out = nm.apply_noise(
        data,
        step_expression=step_e,
        step_position=step_p,
        eps_expression=eps_e,
        eps_position=eps_p,
    )
    m = mask.unsqueeze(-1).float()
    ab_e = cosine_alpha_bar(T, 1.5)[step_e].float().view(-1, 1, 1)
    ab_p = cosine_alpha_bar(T, 0.7)[step_p].float().view(-1, 1, 1)
    pos0 = center(data.positions, mask)
    expected_e = (ab_e.sqrt() * data.expression + (1 - ab_e).sqrt() * eps_e) * m
    expected_p = (ab_p.sqrt() * pos0 + (1 - ab_p).sqrt() * eps_p) * m
    torch.testing.assert_close(out.noisy_expression, expected_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.noisy_positions, expected_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.t_expression, step_e.float() / T)
    torch.testing.assert_close(out.t_position, step_p.float() / T)
    assert out.t_expression.dtype == torch.float32
    assert torch.equal(out.positions, pos0)  # the centred target


@pytest.mark.parametrize("n_dims", [2, 3])
def test_padding_stays_zero_and_positions_are_centred(n_dims: int) -> None:
    nm = NoiseModel(diffusion_steps=T)
    data = make_batch(n_dims=n_dims)
    mask = data.node_mask
    out = nm.apply_noise(data, generator=torch.Generator().manual_seed(0))
    for field in ("noisy_expression", "noisy_positions", "expression", "positions"):
        assert (getattr(out, field)[~mask] == 0).all(), field
    assert masked_mean(out.noisy_positions, mask).abs().max() < 1e-5
    assert masked_mean(out.positions, mask).abs().max() < 1e-5
    assert (out.t_expression > 0).all() and (out.t_position > 0).all()


def test_step_zero_gives_the_clean_value_exactly() -> None:
    nm = NoiseModel(diffusion_steps=T)
    data = make_batch()
    zeros = torch.zeros(3, dtype=torch.long)
    out = nm.apply_noise(data, step_expression=zeros, step_position=torch.tensor([0, 7, 0]))
    assert torch.equal(out.noisy_expression, data.expression)
    # clean positions are the input in its own frame; the target is centred
    masked = apply_mask(data.positions, data.node_mask)
    assert torch.equal(out.noisy_positions[0], masked[0])
    assert torch.equal(out.noisy_positions[2], masked[2])
    torch.testing.assert_close(out.positions, center(data.positions, data.node_mask))
    assert not torch.equal(out.noisy_positions[1], out.positions[1])
    assert out.t_expression.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.t_position, torch.tensor([0.0, 7 / T, 0.0]))


def test_modalities_are_independent() -> None:
    nm = NoiseModel(diffusion_steps=T)
    data = make_batch()
    g = torch.Generator().manual_seed(0)
    out = nm.apply_noise(data, noise_expression=False, generator=g)
    assert torch.equal(out.noisy_expression, data.expression)
    assert (out.t_expression == 0).all()
    assert (out.t_position > 0).all()
    assert not torch.equal(out.noisy_positions, out.positions)

    out = nm.apply_noise(data, noise_position=False, generator=g)
    assert torch.equal(out.noisy_positions, apply_mask(data.positions, data.node_mask))
    assert (out.t_position == 0).all()
    assert (out.t_expression > 0).all()


def test_apply_noise_is_reproducible_with_a_generator() -> None:
    nm = NoiseModel(diffusion_steps=T)
    data = make_batch()
    a = nm.apply_noise(data, generator=torch.Generator().manual_seed(5))
    b = nm.apply_noise(data, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.noisy_positions, b.noisy_positions)
    assert torch.equal(a.noisy_expression, b.noisy_expression)
    assert torch.equal(a.t_position, b.t_position)


@pytest.mark.parametrize(
    "step", [torch.tensor([0, 1, T + 1]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1, 2])]
)
def test_bad_steps_are_rejected(step: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="step"):
        NoiseModel(diffusion_steps=T).apply_noise(make_batch(), step_expression=step)


# ---------------------------------------------------------------- posterior


def test_posterior_at_previous_step_is_the_ddpm_posterior() -> None:
    nm = NoiseModel(diffusion_steps=1000)
    ab = cosine_alpha_bar(1000)
    step_t = torch.tensor([1, 2, 10, 500, 999, 1000])
    step_s = step_t - 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    z_t = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    mean, std = nm.posterior("position", x0, z_t, step_t, step_s)
    # Ho et al. 2020, eqs. 6-7
    ab_t, ab_s = ab[step_t].view(-1, 1, 1), ab[step_s].view(-1, 1, 1)
    beta = 1 - ab_t / ab_s
    ref_mean = (
        ab_s.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t) * z_t
    )
    ref_std = ((1 - ab_s) / (1 - ab_t) * beta).sqrt()
    assert std.shape == (6, 1, 1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-4, atol=1e-7)


def test_posterior_moments_are_consistent_for_any_gap() -> None:
    # z_t = alpha_t x0 + sigma_t eps and z_s ~ q(z_s | z_t, x0) must give z_s ~ q(z_s | x0):
    # c_z alpha_t + c_x0 = alpha_s and c_z^2 sigma_t^2 + var = sigma_s^2.
    nm = NoiseModel(diffusion_steps=1000, nu_expression=1.3)
    sched = nm.expression
    step_t = torch.tensor([3, 50, 200, 1000, 1000, 700])
    step_s = torch.tensor([0, 10, 199, 0, 500, 1])
    c_z, c_x0, var = sched.posterior_coefficients(step_t, step_s)
    ab = cosine_alpha_bar(1000, 1.3)
    a_t, a_s = ab[step_t].sqrt(), ab[step_s].sqrt()
    torch.testing.assert_close(c_z.double() * a_t + c_x0.double(), a_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        c_z.double() ** 2 * (1 - ab[step_t]) + var.double(), 1 - ab[step_s], rtol=1e-5, atol=1e-7
    )


def test_posterior_sampling_reproduces_the_marginal() -> None:
    nm = NoiseModel(diffusion_steps=T)
    g = torch.Generator().manual_seed(0)
    m = 200_000
    x0 = torch.full((1, m, 1), 1.5)
    step_t, step_s = torch.tensor([80]), torch.tensor([30])
    z_t = nm.q_sample("expression", x0, step_t, torch.randn(x0.shape, generator=g))
    mean, std = nm.posterior("expression", x0, z_t, step_t, step_s)
    z_s = mean + std * torch.randn(x0.shape, generator=g)
    alpha_s, sigma_s = nm.expression.alpha[30].item(), nm.expression.sigma[30].item()
    assert z_s.mean().item() == pytest.approx(alpha_s * 1.5, abs=0.01)
    assert z_s.std().item() == pytest.approx(sigma_s, rel=0.01)


def test_posterior_with_equal_steps_is_the_identity() -> None:
    nm = NoiseModel(diffusion_steps=T)
    z_t = torch.randn(2, 4, 3)
    step = torch.tensor([0, 17])
    mean, std = nm.posterior("position", torch.zeros_like(z_t), z_t, step, step)
    torch.testing.assert_close(mean, z_t)
    assert (std == 0).all()
    with pytest.raises(ValueError, match="step_s"):
        nm.posterior("position", z_t, z_t, torch.tensor([3, 3]), torch.tensor([4, 1]))


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize(("t", "s"), [(1, 0), (2, 1), (50, 49), (100, 37), (100, 99), (60, 0)])
def test_ddim_eta_one_is_the_ancestral_posterior(t: int, s: int) -> None:
    nm = NoiseModel(diffusion_steps=T)
    g = torch.Generator().manual_seed(0)
    x0_hat, z_t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    noise = torch.randn(2, 5, 3, generator=g)
    step_t, step_s = torch.full((2,), t), torch.full((2,), s)
    mean, std = nm.posterior("position", x0_hat, z_t, step_t, step_s)
    z_plain = nm.ddim_step("position", x0_hat, z_t, step_t, step_s, 1.0, torch.zeros_like(noise))
    z_noisy = nm.ddim_step("position", x0_hat, z_t, step_t, step_s, 1.0, noise)
    torch.testing.assert_close(z_plain, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_noisy - z_plain, std * noise, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_to_step_zero_with_exact_x0_returns_x0(eta: float) -> None:
    nm = NoiseModel(diffusion_steps=T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 6, 4, generator=g)
    step_t = torch.tensor([1, 50, T])
    z_t = nm.q_sample("expression", x0, step_t, torch.randn(x0.shape, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    z_0 = nm.ddim_step("expression", x0, z_t, step_t, torch.zeros(3, dtype=torch.long), eta, noise)
    assert torch.equal(z_0, x0)


def test_ddim_eta_zero_follows_the_same_noise() -> None:
    # With the exact x0, deterministic DDIM maps alpha_t x0 + sigma_t eps to
    # alpha_s x0 + sigma_s eps.
    nm = NoiseModel(diffusion_steps=T)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    step_t, step_s = torch.tensor([90, 40]), torch.tensor([20, 39])
    z_t = nm.q_sample("position", x0, step_t, eps)
    z_s = nm.ddim_step("position", x0, z_t, step_t, step_s, 0.0)
    torch.testing.assert_close(z_s, nm.q_sample("position", x0, step_s, eps), rtol=1e-5, atol=1e-5)


def test_ddim_argument_checks() -> None:
    nm = NoiseModel(diffusion_steps=T)
    z = torch.zeros(1, 2, 3)
    step_t, step_s = torch.tensor([5]), torch.tensor([2])
    with pytest.raises(ValueError, match="noise"):
        nm.ddim_step("position", z, z, step_t, step_s, 0.5)
    with pytest.raises(ValueError, match="eta"):
        nm.ddim_step("position", z, z, step_t, step_s, 1.5, z)
    with pytest.raises(ValueError, match="modality"):
        nm.ddim_step("cells", z, z, step_t, step_s, 0.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- prior


def test_sample_prior() -> None:
    nm = NoiseModel(diffusion_steps=T)
    mask = make_batch().node_mask
    pos = nm.sample_prior("position", (3, 12, 3), mask, generator=torch.Generator().manual_seed(0))
    expr = nm.sample_prior("expression", (3, 12, 5), mask, generator=torch.Generator())
    assert pos.shape == (3, 12, 3) and expr.shape == (3, 12, 5)
    assert (pos[~mask] == 0).all() and (expr[~mask] == 0).all()
    assert masked_mean(pos, mask).abs().max() < 1e-6
    again = nm.sample_prior(
        "position", (3, 12, 3), mask, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(pos, again)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_coefficients_match_a_float64_reference(eta: float) -> None:
    # Song et al. 2021, eq. 12, evaluated in float64 from the schedule, over random (t, s) pairs.
    nm = NoiseModel(diffusion_steps=1000)
    g = torch.Generator().manual_seed(0)
    step_t = torch.randint(1, 1001, (2000,), generator=g)
    step_s = (torch.rand(2000, generator=g, dtype=torch.float64) * step_t).long()
    c_z, c_x0, c_noise = nm.position.ddim_coefficients(step_t, step_s, eta)
    ab = cosine_alpha_bar(1000)
    a_t, a_s, s2_t, s2_s = ab[step_t].sqrt(), ab[step_s].sqrt(), 1 - ab[step_t], 1 - ab[step_s]
    c = eta * ((1 - ab[step_t] / ab[step_s]) * s2_s / s2_t).sqrt()
    direction = (s2_s - c**2).clamp(min=0).sqrt()
    torch.testing.assert_close(c_z.double(), direction / s2_t.sqrt(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        c_x0.double(), a_s - direction * a_t / s2_t.sqrt(), rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(c_noise.double(), c, rtol=1e-4, atol=1e-7)
