"""Schedule maths and masked noise draws shared by the noise model, the loss and the sampler."""

from __future__ import annotations

import math
from typing import TypedDict, Unpack

import torch
from torch import Tensor

from alphastomics.data.batch import apply_mask, center

# Largest per-step beta_t = 1 - alpha_bar[t] / alpha_bar[t - 1] (Nichol & Dhariwal 2021, sec. 3.2
# clip beta_t <= 0.999 so that the last steps stay finite; MiDi clips alpha_t >= 0.001 likewise).
MAX_BETA = 0.999


def cosine_alpha_bar(diffusion_steps: int, nu: float = 1.0, s: float = 0.008) -> Tensor:
    """Cosine schedule of the signal level ``alpha_bar`` with exponent ``nu`` on time (MiDi).

    ``alpha_bar(t) = cos(pi/2 * (t**nu + s) / (1 + s))**2 / cos(pi/2 * s / (1 + s))**2`` at
    ``t = step / T`` (Nichol & Dhariwal 2021, eq. 17, https://arxiv.org/abs/2102.09672; the
    exponent ``nu`` is MiDi's, Vignac et al. 2023, https://arxiv.org/abs/2302.09048). ``nu > 1``
    keeps more signal early (noise comes later), ``nu < 1`` destroys it sooner.

    The raw curve reaches exactly 0 at ``t = 1``. Each per-step ratio
    ``alpha_bar[t] / alpha_bar[t - 1]`` is therefore clipped to ``[1 - MAX_BETA, 1]``
    (``beta_t <= 0.999``) and ``alpha_bar`` is rebuilt as their cumulative product, so
    ``alpha_bar[T]`` is tiny but strictly positive and every step is finite.

    Parameters
    ----------
    diffusion_steps
        T, number of steps (>= 1).
    nu
        Exponent on t inside the cosine (> 0).
    s
        Offset that keeps beta_1 from being vanishingly small.

    Returns
    -------
    Tensor
        (T + 1,) float64, ``alpha_bar[0] = 1``, strictly decreasing, ``alpha_bar[T] > 0``.
    """
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
    if nu <= 0:
        raise ValueError(f"nu must be > 0, got {nu}")
    t = torch.linspace(0.0, 1.0, diffusion_steps + 1, dtype=torch.float64)
    f = torch.cos(0.5 * math.pi * (t**nu + s) / (1.0 + s)) ** 2
    alpha_bar = f / f[0]
    step_alpha = (alpha_bar[1:] / alpha_bar[:-1]).clamp(min=1.0 - MAX_BETA, max=1.0)
    return torch.cat([alpha_bar.new_ones(1), torch.cumprod(step_alpha, dim=0)])


def extract(coeffs: Tensor, step: Tensor, n_dims_out: int) -> Tensor:
    """Pick one coefficient per item and shape it to broadcast over (B, ...).

    Parameters
    ----------
    coeffs
        (T + 1,) schedule values indexed by integer step.
    step
        (B,) long steps in [0, T].
    n_dims_out
        Number of dimensions of the tensor the result multiplies, e.g. 3 for (B, N, F).

    Returns
    -------
    Tensor
        (B, 1, ..., 1) with ``n_dims_out`` dimensions, e.g. (B, 1, 1).
    """
    return coeffs[step].reshape(step.shape[0], *([1] * (n_dims_out - 1)))


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Tensor:
    # Draw on the generator's own device, so a CPU generator gives the same numbers on any device.
    draw_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return x.to(device) if device is not None else x


class NoiseDraw(TypedDict, total=False):
    """Keyword options of :func:`sample_masked_gaussian` that :func:`sample_centered_gaussian`
    passes on."""

    generator: torch.Generator | None
    device: torch.device | str | None
    dtype: torch.dtype | None


def sample_masked_gaussian(
    shape: tuple[int, ...],
    node_mask: Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    centered: bool = False,
) -> Tensor:
    """Standard normal noise with padded rows set to zero, optionally centred per item.

    With ``centered`` the noise is projected onto the zero-centre-of-mass subspace of the real
    cells: the isotropic Gaussian on the (N - 1) * D dimensional subspace used for
    translation-invariant coordinates (Hoogeboom et al. 2022, EDM for molecules, sec. 3).

    Parameters
    ----------
    shape
        (B, N, F).
    node_mask
        (B, N) bool, True for a real cell.
    generator
        Random source (on any device; the draw is moved to ``device``).
    device, dtype
        Of the result; default ``node_mask.device`` and the default float dtype.
    centered
        Subtract each item's mean over its real cells.

    Returns
    -------
    Tensor
        (B, N, F), exactly 0 on padded rows; N(0, 1) on real rows, or with ``centered`` zero
        masked mean per item.
    """
    device = node_mask.device if device is None else device
    noise = _randn(tuple(shape), generator, device, dtype)
    return center(noise, node_mask) if centered else apply_mask(noise, node_mask)


def sample_centered_gaussian(
    shape: tuple[int, ...], node_mask: Tensor, **draw: Unpack[NoiseDraw]
) -> Tensor:
    """:func:`sample_masked_gaussian` with ``centered=True``: (B, N, D) noise with zero masked
    mean per item and exactly 0 on padded rows."""
    return sample_masked_gaussian(shape, node_mask, centered=True, **draw)


def hide_genes(
    gene_mask: Tensor,
    p_items: float,
    share_min: float,
    share_max: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw which measured genes each item hides from the network's input (gene imputation).

    Each item hides genes with probability ``p_items``; such an item hides
    ``round(share * n_measured)`` of its measured genes, chosen uniformly, with ``share`` drawn
    uniformly in ``[share_min, share_max]``, and always hides at least one gene and keeps at
    least one visible (items with fewer than 2 measured genes hide none).

    Parameters
    ----------
    gene_mask
        (B, G) bool, True for a gene the item measured.
    p_items
        Probability in [0, 1] that an item hides genes (0: no random draw is made).
    share_min, share_max
        Range of the hidden share of an item's measured genes.
    generator
        Random source (on any device; the draws are moved to ``gene_mask``'s device).

    Returns
    -------
    Tensor
        (B, G) bool, True for a measured gene hidden from the input; all False when
        ``p_items`` is 0.
    """
    measured = gene_mask.bool()
    if p_items <= 0:
        return torch.zeros_like(measured)
    b, g = measured.shape
    draw_device = generator.device if generator is not None else measured.device
    u = torch.rand(b, generator=generator, device=draw_device).to(measured.device)
    share = share_min + (share_max - share_min) * torch.rand(
        b, generator=generator, device=draw_device
    ).to(measured.device)
    scores = torch.rand(b, g, generator=generator, device=draw_device).to(measured.device)
    scores = scores.masked_fill(~measured, 2.0)  # unmeasured genes rank last, never hidden
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, G) 0 = first to hide
    n_measured = measured.sum(dim=1)
    n_hide = torch.minimum((share * n_measured).round().long().clamp(min=1), n_measured - 1)
    n_hide = torch.where(u < p_items, n_hide, torch.zeros_like(n_hide))
    return (rank < n_hide.unsqueeze(1)) & measured
