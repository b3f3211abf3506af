"""Forward process of the two modalities: one cosine schedule each, noising, posterior and DDIM.

Time is an integer ``step`` in [0, T] everywhere in this module (0 = clean); the network gets the
float ``t = step / T`` through ``DataHolder.t_expression`` / ``DataHolder.t_position``. The
schedule and every formula that reads it (noising, posterior, DDIM step) are one module (over
500 lines, most of it docstrings of the formulas).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from alphastomics.data.batch import DataHolder, apply_mask, center
from alphastomics.diffusion_model.diffusion_utils import (
    cosine_alpha_bar,
    extract,
    sample_masked_gaussian,
)

Modality = Literal["expression", "position"]


def _check_step(step: Tensor, batch_size: int, n_steps: int, name: str) -> None:
    if step.shape != (batch_size,) or step.dtype.is_floating_point or step.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a ({batch_size},) integer tensor of diffusion steps in [0, {n_steps}]"
            f", got dtype {step.dtype} and shape {tuple(step.shape)}"
        )
    if step.numel() and (int(step.min()) < 0 or int(step.max()) > n_steps):
        raise ValueError(f"{name} must lie in [0, {n_steps}], got [{step.min()}, {step.max()}]")


# ----------------------------------------------------------------------------------------------


class NoiseSchedule(nn.Module):
    """Variance-preserving schedule of one modality, as non-persistent float32 buffers.

    ``q(z_t | x) = N(alpha[t] x, sigma[t]^2 I)`` with ``alpha = sqrt(alpha_bar)`` and
    ``sigma = sqrt(1 - alpha_bar)`` (Ho et al. 2020, eq. 4). Buffers are computed in float64 and
    stored in float32; they are rebuilt from the constructor arguments, so checkpoints do not hold
    them. Coefficients between two steps are formed from ``log_alpha_bar`` with ``expm1`` so that
    ``1 - alpha_bar[t] / alpha_bar[s]`` keeps full float32 precision for nearby small steps.

    Parameters
    ----------
    diffusion_steps
        T; every buffer has length T + 1 and is indexed by the integer step (0 = clean).
    nu
        Exponent on t inside the cosine (see :func:`cosine_alpha_bar`).

    Attributes
    ----------
    alpha_bar, alpha, sigma, log_alpha_bar
        (T + 1,) float32; ``alpha_bar[0] = alpha[0] = 1`` and ``sigma[0] = 0`` exactly.
    """

    alpha_bar: Tensor
    alpha: Tensor
    sigma: Tensor
    log_alpha_bar: Tensor

    def __init__(self, diffusion_steps: int, nu: float = 1.0) -> None:
        super().__init__()
        self.T = diffusion_steps
        self.nu = nu
        alpha_bar = cosine_alpha_bar(diffusion_steps, nu)  # (T + 1,) float64
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self.register_buffer("alpha", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sigma", (1.0 - alpha_bar).sqrt().float(), persistent=False)
        self.register_buffer("log_alpha_bar", alpha_bar.log().float(), persistent=False)

    def extra_repr(self) -> str:
        return f"T={self.T}, nu={self.nu}"

    def q_sample(self, x0: Tensor, step: Tensor, eps: Tensor) -> Tensor:
        """``z_t = alpha[t] x0 + sigma[t] eps`` (Ho et al. 2020, eq. 4); exactly ``x0`` at step 0.

        Parameters
        ----------
        x0, eps
            (B, N, F).
        step
            (B,) long.

        Returns
        -------
        Tensor
            (B, N, F), in the dtype of ``x0``.
        """
        alpha = extract(self.alpha, step, x0.dim()).to(x0.dtype)
        sigma = extract(self.sigma, step, x0.dim()).to(x0.dtype)
        return alpha * x0 + sigma * eps

    def _pair_terms(self, step_t: Tensor, step_s: Tensor) -> dict[str, Tensor]:
        # VDM notation (Kingma et al. 2021, sec. 2 and app. A): alpha_{t|s} = alpha_t / alpha_s and
        # sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = 1 - alpha_bar_t / alpha_bar_s.
        if bool((step_s > step_t).any()):
            raise ValueError("step_s must be <= step_t for every item (s is the earlier step)")
        log_t = self.log_alpha_bar[step_t]  # (B,)
        log_s = self.log_alpha_bar[step_s]  # (B,)
        same = step_t == step_s
        sigma_t_sq = (-torch.expm1(log_t)).clamp(min=torch.finfo(log_t.dtype).tiny)
        sigma_s_sq = (-torch.expm1(log_s)).clamp(min=0.0)
        sigma_ts_sq = (-torch.expm1(log_t - log_s)).clamp(min=0.0)
        alpha_ts = torch.exp(0.5 * (log_t - log_s))
        return {
            "same": same,
            "alpha_s": torch.exp(0.5 * log_s),
            "sigma_s_sq": sigma_s_sq,
            "alpha_ts": alpha_ts,
            "sigma_t_sq": sigma_t_sq,
            # r = sigma_{t|s}^2 / sigma_t^2 and 1 - r = alpha_{t|s}^2 sigma_s^2 / sigma_t^2, each
            # formed without cancellation.
            "r": torch.where(same, 0.0, sigma_ts_sq / sigma_t_sq),
            "one_minus_r": torch.where(same, 1.0, alpha_ts**2 * sigma_s_sq / sigma_t_sq),
        }

    def posterior_coefficients(self, step_t: Tensor, step_s: Tensor) -> tuple[Tensor, ...]:
        """Coefficients of ``q(z_s | z_t, x0) = N(c_z z_t + c_x0 x0, var I)`` for any s <= t.

        Kingma et al. 2021 (Variational Diffusion Models, https://arxiv.org/abs/2107.00630),
        Appendix A: ``c_z = alpha_{t|s} sigma_s^2 / sigma_t^2``,
        ``c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2``, ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``.
        For s = t - 1 this is the DDPM posterior of Ho et al. 2020, eqs. 6-7. Items with s = t
        (e.g. a modality held clean, t = s = 0) get the identity ``c_z = 1, c_x0 = 0, var = 0``.

        Parameters
        ----------
        step_t, step_s
            (B,) long with ``0 <= step_s <= step_t <= T``.

        Returns
        -------
        tuple of Tensor
            ``(c_z, c_x0, var)``, each (B,) float32.
        """
        p = self._pair_terms(step_t, step_s)
        c_z = torch.where(p["same"], 1.0, p["alpha_ts"] * p["sigma_s_sq"] / p["sigma_t_sq"])
        c_x0 = p["alpha_s"] * p["r"]
        var = p["r"] * p["sigma_s_sq"]
        return c_z, c_x0, var

    def ddim_coefficients(self, step_t: Tensor, step_s: Tensor, eta: float) -> tuple[Tensor, ...]:
        """Coefficients of the DDIM update ``z_s = c_z z_t + c_x0 x0_hat + c_noise noise``.

        Song et al. 2021 (DDIM, https://arxiv.org/abs/2010.02502), eq. 12 with eq. 16:
        ``z_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise``, where
        ``eps_hat = (z_t - alpha_t x0_hat) / sigma_t`` and ``c = eta * sqrt(var_posterior)``.
        eta = 1 is the ancestral (posterior) sampler, eta = 0 the deterministic one.
        With ``r = sigma_{t|s}^2 / sigma_t^2`` and ``q = sqrt((1 - r)(1 - eta^2 r))``:
        ``c_z = sigma_s sqrt(1 - eta^2 r) / sigma_t`` and
        ``c_x0 = alpha_s (1 - q) = alpha_s r (1 + eta^2 (1 - r)) / (1 + q)`` (written without
        cancellation).

        Parameters
        ----------
        step_t, step_s
            (B,) long with ``0 <= step_s <= step_t <= T``.
        eta
            Stochasticity in [0, 1].

        Returns
        -------
        tuple of Tensor
            ``(c_z, c_x0, c_noise)``, each (B,) float32.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        p = self._pair_terms(step_t, step_s)
        r, one_minus_r = p["r"], p["one_minus_r"]
        # (sigma_s^2 - c^2) / sigma_s^2 = 1 - eta^2 r, summed from non-negative parts
        keep = one_minus_r + (1.0 - eta**2) * r
        q = (one_minus_r * keep).sqrt()
        c_z = torch.where(p["same"], 1.0, (p["sigma_s_sq"] * keep / p["sigma_t_sq"]).sqrt())
        c_x0 = p["alpha_s"] * r * (1.0 + eta**2 * one_minus_r) / (1.0 + q)
        c_noise = eta * (r * p["sigma_s_sq"]).sqrt()
        return c_z, c_x0, c_noise


# ----------------------------------------------------------------------------------------------


class NoiseModel(nn.Module):
    """Forward diffusion of expression (B, N, G) and positions (B, N, D), one schedule each.

    The two modalities have independent steps per item, so one batch can mix noised and clean
    items of either modality (the three sampling modes of one jointly trained model).
    Position noise lives in the zero-centre-of-mass subspace of the real cells (Hoogeboom et al.
    2022); padded cells are exactly zero in every output.

    Parameters
    ----------
    diffusion_steps
        T, number of discrete steps (``diffusion.diffusion_steps``).
    nu_expression, nu_position
        Cosine-schedule exponent of each modality (``diffusion.nu_*``).
    noise_schedule
        Schedule shape; only ``"cosine"`` (so ``NoiseModel(**asdict(cfg.diffusion))`` works).

    Attributes
    ----------
    T
        Number of steps.
    expression, position
        The :class:`NoiseSchedule` of each modality.

    Examples
    --------
    Noise positions only, holding expression clean, with one item's positions kept clean too:

    >>> nm = NoiseModel(diffusion_steps=100)
    >>> held = torch.tensor([True, False])
    >>> step_pos = nm.sample_steps(2, device="cpu").masked_fill(held, 0)
    >>> noisy = nm.apply_noise(batch, False, step_position=step_pos)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        diffusion_steps: int = 1000,
        nu_expression: float = 1.0,
        nu_position: float = 1.0,
        noise_schedule: Literal["cosine"] = "cosine",
    ) -> None:
        super().__init__()
        if noise_schedule != "cosine":
            raise ValueError(f"noise_schedule must be 'cosine', got {noise_schedule!r}")
        self.T = diffusion_steps
        self.expression = NoiseSchedule(diffusion_steps, nu_expression)
        self.position = NoiseSchedule(diffusion_steps, nu_position)

    def schedule(self, modality: Modality) -> NoiseSchedule:
        """The schedule of ``"expression"`` or ``"position"``."""
        if modality == "expression":
            return self.expression
        if modality == "position":
            return self.position
        raise ValueError(f"modality must be 'expression' or 'position', got {modality!r}")

    def sample_steps(
        self,
        batch_size: int,
        *,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Uniform integer steps in [1, T].

        Returns
        -------
        Tensor
            (B,) long on ``device`` (drawn on the generator's device, then moved).
        """
        draw_device = generator.device if generator is not None else device
        step = torch.randint(1, self.T + 1, (batch_size,), generator=generator, device=draw_device)
        return step.to(device)

    def apply_noise(
        self,
        data: DataHolder,
        noise_expression: bool = True,
        noise_position: bool = True,
        *,
        step_expression: Tensor | None = None,
        step_position: Tensor | None = None,
        eps_expression: Tensor | None = None,
        eps_position: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DataHolder:
        """Noise each modality of each item at its own step: ``z_t = alpha_t x + sigma_t eps``.

        Parameters
        ----------
        data
            Clean batch; padded rows are zero.
        noise_expression, noise_position
            False holds that modality clean for every item (noisy = clean, step 0).
        step_expression, step_position
            (B,) long steps in [0, T]; drawn uniformly in [1, T] when None. A 0 holds that item's
            modality clean (its noisy copy equals the clean input exactly; clean positions keep
            their frame, they are not centred).
        eps_expression, eps_position
            (B, N, G) / (B, N, D) noise to use instead of a draw (for exact tests). Padded rows
            are zeroed and position noise is centred over real cells, which leaves centred noise
            unchanged up to rounding.
        generator
            Random source for steps and noise, drawn in this order: expression steps, position
            steps, expression noise, position noise (only those not given).

        Returns
        -------
        DataHolder
            A copy with ``positions`` centred over real cells (the position target),
            ``noisy_expression`` (B, N, G), ``noisy_positions`` (B, N, D), and ``t_expression``,
            ``t_position`` (B,) float32 equal to ``step / T``.
        """
        b = data.batch_size
        device = data.expression.device
        mask = data.node_mask

        step_e = self._resolve_step(step_expression, noise_expression, b, device, generator, "expr")
        step_p = self._resolve_step(step_position, noise_position, b, device, generator, "pos")

        expression = apply_mask(data.expression, mask)
        positions = center(data.positions, mask)

        noisy_expression = (
            self._noised("expression", expression, step_e, eps_expression, mask, generator)
            if noise_expression
            else expression
        )
        # clean positions (step 0) keep their frame: the denoiser reads where the item lies
        noisy_positions = apply_mask(data.positions, mask)
        if noise_position:
            noised = self._noised("position", positions, step_p, eps_position, mask, generator)
            noisy_positions = torch.where((step_p == 0).view(-1, 1, 1), noisy_positions, noised)

        return data.replace(
            expression=expression,
            positions=positions,
            noisy_expression=noisy_expression,
            noisy_positions=noisy_positions,
            t_expression=step_e.to(torch.float32) / self.T,
            t_position=step_p.to(torch.float32) / self.T,
        )

    def _resolve_step(
        self,
        step: Tensor | None,
        noised: bool,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None,
        name: str,
    ) -> Tensor:
        if not noised:
            if step is not None and bool((step != 0).any()):
                raise ValueError(f"step for {name} is non-zero while that modality is not noised")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if step is None:
            return self.sample_steps(batch_size, device=device, generator=generator)
        _check_step(step, batch_size, self.T, f"step for {name}")
        return step.to(device=device, dtype=torch.long)

    def _noised(
        self,
        modality: Modality,
        x0: Tensor,
        step: Tensor,
        eps: Tensor | None,
        mask: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """``z_t`` of one modality: expression noise is masked, position noise also centred."""
        centered = modality != "expression"
        project = center if centered else apply_mask
        if eps is None:
            eps = sample_masked_gaussian(
                x0.shape, mask, generator, x0.device, x0.dtype, centered=centered
            )
        elif eps.shape != x0.shape:
            name = "eps_expression" if modality == "expression" else "eps_position"
            raise ValueError(f"{name} must be {tuple(x0.shape)}, got {tuple(eps.shape)}")
        return apply_mask(self.schedule(modality).q_sample(x0, step, project(eps, mask)), mask)

    def q_sample(self, modality: Modality, x0: Tensor, step: Tensor, eps: Tensor) -> Tensor:
        """``alpha_t x0 + sigma_t eps`` of one modality, with no masking or centring.

        Parameters
        ----------
        modality
            ``"expression"`` or ``"position"``.
        x0, eps
            (B, N, F).
        step
            (B,) long in [0, T].

        Returns
        -------
        Tensor
            (B, N, F).
        """
        return self.schedule(modality).q_sample(x0, step, eps)

    def posterior(
        self, modality: Modality, x0_hat: Tensor, z_t: Tensor, step_t: Tensor, step_s: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean and std of ``q(z_s | z_t, x0 = x0_hat)`` for any earlier step s (not only t - 1).

        Kingma et al. 2021 (VDM, https://arxiv.org/abs/2107.00630), Appendix A, with
        ``alpha_{t|s} = alpha_t / alpha_s``, ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``
        ``mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0``,
        ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. At s = t - 1 this is Ho et al. 2020, eq. 7.
        Items with s = t return ``(z_t, 0)``.

        Parameters
        ----------
        modality
            ``"expression"`` or ``"position"``.
        x0_hat, z_t
            (B, N, F) predicted clean value and current state.
        step_t, step_s
            (B,) long with ``0 <= step_s <= step_t <= T``.

        Returns
        -------
        tuple of Tensor
            ``mean`` (B, N, F) and ``std`` (B, 1, 1), in the dtype of ``z_t``. Not masked or
            centred: the caller does that after adding noise.
        """
        c_z, c_x0, var = self.schedule(modality).posterior_coefficients(step_t, step_s)
        return _mix(c_z, z_t, c_x0, x0_hat), _per_item(var.sqrt(), z_t)

    def ddim_step(
        self,
        modality: Modality,
        x0_hat: Tensor,
        z_t: Tensor,
        step_t: Tensor,
        step_s: Tensor,
        eta: float,
        noise: Tensor | None = None,
    ) -> Tensor:
        """One DDIM update from step t to an earlier step s (Song et al. 2021, eq. 12).

        ``z_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise`` with
        ``eps_hat = (z_t - alpha_t x0_hat) / sigma_t`` and ``c = eta * posterior std`` (eq. 16),
        so eta = 1 has the ancestral posterior variance and eta = 0 is deterministic. With the
        exact ``x0_hat`` and s = 0 the result is ``x0_hat``. Items with s = t return ``z_t``.

        Parameters
        ----------
        modality, step_t, step_s
            As in :meth:`posterior`.
        x0_hat, z_t
            (B, N, F).
        eta
            Stochasticity in [0, 1].
        noise
            (B, N, F) standard normal (masked / centred by the caller); required when eta > 0.

        Returns
        -------
        Tensor
            z_s (B, N, F), not masked or centred (the caller does that).
        """
        if eta > 0 and noise is None:
            raise ValueError("ddim_step needs `noise` when eta > 0")
        c_z, c_x0, c_noise = self.schedule(modality).ddim_coefficients(step_t, step_s, eta)
        z_s = _mix(c_z, z_t, c_x0, x0_hat)
        if noise is not None:
            z_s = z_s + _per_item(c_noise, z_t) * noise.to(z_t.dtype)
        return z_s

    def sample_prior(
        self,
        modality: Modality,
        shape: tuple[int, ...],
        node_mask: Tensor,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """A draw from the prior at step T: N(0, I) on real rows (centred for positions).

        Parameters
        ----------
        modality
            ``"expression"`` (masked Gaussian) or ``"position"`` (centred Gaussian).
        shape
            (B, N, F).
        node_mask
            (B, N) bool.
        generator
            Random source (no global seeding).
        dtype
            Of the result; the default float dtype when None.

        Returns
        -------
        Tensor
            (B, N, F) on ``node_mask.device``; padded rows exactly 0.
        """
        self.schedule(modality)
        centered = modality == "position"
        return sample_masked_gaussian(shape, node_mask, generator, dtype=dtype, centered=centered)


def _per_item(coef: Tensor, like: Tensor) -> Tensor:
    # (B,) -> (B, 1, ..., 1) in the dtype of `like`
    return coef.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _mix(c_z: Tensor, z_t: Tensor, c_x0: Tensor, x0_hat: Tensor) -> Tensor:
    """``c_z z_t + c_x0 x0_hat`` with (B,) coefficients, (B, N, F) in the dtype of ``z_t``."""
    return _per_item(c_z, z_t) * z_t + _per_item(c_x0, z_t) * x0_hat.to(z_t.dtype)
