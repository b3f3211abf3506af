"""Reverse diffusion: `DiffusionSampler` for the modes expr_to_pos, pos_to_expr and joint.

Two samplers share one loop: ancestral DDPM over every step of the schedule, and DDIM (Song et
al. 2021) over any number of steps (``eta`` = 0 deterministic, 1 ancestral-like noise). The
sampler works in model space (standardised expression, scaled positions); mapping back to the
user's units is done by :mod:`alphastomics.data.units`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from alphastomics.attn_model.local_attention import gather_cells
from alphastomics.attn_model.neighbors import expression_neighbor_index
from alphastomics.data.batch import apply_mask, center, keeps_everything
from alphastomics.diffusion_model.diffusion_utils import (
    sample_centered_gaussian,
    sample_masked_gaussian,
)
from alphastomics.diffusion_model.noise_model import NoiseModel

SampleMode = Literal["expr_to_pos", "pos_to_expr", "joint"]
SamplerKind = Literal["ddim", "ddpm"]
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")
# what `alphastomics sample` serves; `impute` is `DiffusionSampler.impute_mean` or
# `DiffusionSampler.sample` with `known_genes` (see `Predictor.impute`)
SAMPLE_MODES: tuple[str, ...] = ("expr_to_pos", "pos_to_expr", "impute", "joint")
LOOP_MODES: tuple[str, ...] = ("expr_to_pos", "pos_to_expr", "joint")
# wraps the reverse steps [(t, s), ...] for display: progress(pairs, description)
Progress = Callable[[list[tuple[int, int]], str], Iterable[tuple[int, int]]]


def step_grid(diffusion_steps: int, n_steps: int, power: float = 4.0) -> list[int]:
    """Descending integer steps ``[T, ..., 0]`` with ``n_steps`` transitions.

    Step ``i`` of ``n`` sits at ``T * (1 - i / n) ** power``: ``power > 1`` spends more of the
    steps at low noise, where the local structure of a layout is refined (``power = 2`` is the
    "quadratic" spacing of Song et al. 2021, ``power = 1`` spaces them evenly; the default
    ``sampling.grid_power`` and its measurement are in docs/benchmarks.md, "Sampler quality").
    Steps that rounding would merge are pushed apart from the bottom up, so there are exactly
    ``min(n_steps, T)`` distinct transitions.
    """
    fractions = np.linspace(1.0, 0.0, n_steps + 1) ** power  # (n + 1,) descending to 0
    grid = [int(s) for s in np.round(diffusion_steps * fractions)]
    grid[-1] = 0
    for i in range(len(grid) - 2, -1, -1):  # strictly descending, bottom up
        grid[i] = max(grid[i], grid[i + 1] + 1)
    grid[0] = max(grid[0], diffusion_steps)
    return sorted({min(s, diffusion_steps) for s in grid}, reverse=True)


class DiffusionSampler:
    """Draw samples from a trained denoiser.

    Parameters
    ----------
    model
        The ``Denoiser``: ``model(expr_t, pos_t, t_expr, t_pos, node_mask, gene_mask)`` returns an
        object with ``expression`` (B, N, G) and ``positions`` (B, N, D) predictions of the clean data.
    noise_model
        The ``NoiseModel`` the denoiser was trained with.
    sampler, steps, eta, warm_start
        Defaults for :meth:`sample`: ``"ddim"`` with ``steps`` network evaluations, or ``"ddpm"``
        (ancestral, every one of the ``T`` steps); ``warm_start`` see :meth:`sample`.
    grid_power
        Spacing of DDIM's steps (:func:`step_grid`).
    consensus, consensus_neighbors
        ``expr_to_pos``: at every step each cell's estimate of its clean position moves the
        share ``consensus`` of the way to the mean estimate of its ``consensus_neighbors`` most
        similar cells in expression, weighted by how near it they are placed
        (:func:`pull_to_neighbors`), the layout then scaled back to the estimate's RMS radius
        (without known cells, which fix the frame); 0 = off.
    progress
        Wraps the reverse steps ``[(t, s), ...]`` for display, called as
        ``progress(pairs, description)`` (e.g. a tqdm bar; the caller owns the display).

    Examples
    --------
    >>> sampler = DiffusionSampler(module.model, module.noise_model)
    >>> _, positions = sampler.sample(expr, pos, mask, mode="expr_to_pos")
    """

    def __init__(
        self,
        model: nn.Module,
        noise_model: NoiseModel,
        *,
        sampler: SamplerKind = "ddim",
        steps: int = 10,
        eta: float = 0.0,
        warm_start: float = 0.0,
        grid_power: float = 4.0,
        consensus: float = 0.0,
        consensus_neighbors: int = 10,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.noise_model = noise_model
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.warm_start = warm_start
        self.grid_power = grid_power
        self.consensus = consensus
        self.consensus_neighbors = consensus_neighbors
        self.progress = progress

    @torch.inference_mode()
    def sample(
        self,
        expression: Tensor,
        positions: Tensor,
        node_mask: Tensor,
        mode: SampleMode,
        *,
        gene_mask: Tensor | None = None,
        sampler: SamplerKind | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        warm_start: float | None = None,
        known_genes: Tensor | None = None,
        expression_start: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Run the reverse process for one sample per item.

        Parameters
        ----------
        expression
            (B, N, G) clean expression (read in ``expr_to_pos``; only its shape otherwise).
        positions
            (B, N, D) clean positions (read in ``pos_to_expr``; only its shape otherwise).
        node_mask
            (B, N) bool, True for real cells.
        mode
            ``expr_to_pos``, ``pos_to_expr`` or ``joint``.
        gene_mask
            (B, G) bool measured genes (default all).
        generator
            Source of every random draw; no global RNG is touched.
        known
            (B, N) bool: cells whose value of the *generated* modality is given in the input
            (inpainting: e.g. reference cells among which new cells are placed). At every step
            their state is replaced by the forward-noised truth (RePaint, Lugmayr et al. 2022,
            without resampling), so the other cells are generated around them. Known positions
            fix the frame: the returned positions are in the input frame of the known cells.
        warm_start
            In (0, 1]: start the reverse process at step ``warm_start * T`` from the model's own
            conditional-mean estimate (:meth:`predict_mean`, one extra network evaluation),
            forward-noised to that step (SDEdit, Meng et al. 2022), instead of from pure noise at
            ``T``. The mean fixes the global layout; the remaining steps restore the local
            structure a mean blurs. 0 = cold start. Conditional modes only.
        known_genes
            (B, G) bool, ``pos_to_expr`` and ``joint``: genes whose expression is given in
            every cell (a panel's measured genes); like ``known`` cells, their state is
            replaced by the forward-noised truth at every step, so the other genes are drawn
            conditioned on them. Pass a ``gene_mask`` that includes the genes to draw.
        expression_start
            ``joint`` only, in [0, 1): with s > 0, ``expression`` holds measured cells' states
            and generation starts them forward-noised to step ``s * T`` (SDEdit), while the
            positions start from pure noise at ``T``; the expression waits at step ``s * T``
            until the positions reach it, then both descend together. The cells' mix of types
            is then the given cells', their states and all positions are generated. 0 = both
            from noise.

        Returns
        -------
        (expression, positions)
            (B, N, G) and (B, N, D); the conditioning modality is returned unchanged (positions
            centred), the generated one is the final x0 estimate. Padded rows are zero.
        """
        if mode not in LOOP_MODES:
            hint = "; impute: Predictor.impute" if mode == "impute" else ""
            raise ValueError(
                f"unknown sample mode {mode!r}; use one of {', '.join(LOOP_MODES)}{hint}"
            )
        sampler = sampler or self.sampler
        eta = self.eta if eta is None else eta
        warm_start = self.warm_start if warm_start is None else warm_start
        T = self.noise_model.T
        if not 0 <= warm_start <= 1:
            raise ValueError(f"warm_start must be in [0, 1], got {warm_start}")
        if warm_start > 0 and (mode == "joint" or known is not None or known_genes is not None):
            warm_start = 0.0  # nothing to start from: no clean modality / known cells lead
        top = max(1, round(warm_start * T)) if warm_start > 0 else T
        if sampler == "ddpm":
            grid = list(range(top, -1, -1))
        elif sampler == "ddim":
            n_steps = steps or self.steps
            if not 1 <= n_steps <= T:
                raise ValueError(
                    f"steps must be in [1, {T}] (the model's diffusion_steps), got {n_steps}"
                )
            grid = step_grid(top, min(n_steps, top), self.grid_power)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")

        mask = node_mask.bool()
        b = expression.shape[0]
        device = expression.device
        if gene_mask is None:
            gene_mask = torch.ones(b, expression.shape[2], dtype=torch.bool, device=device)
        gen_expr = mode in ("pos_to_expr", "joint")
        gen_pos = mode in ("expr_to_pos", "joint")

        expr = apply_mask(expression, mask)
        # a clean condition keeps its frame (the denoiser reads where it lies); noisy is centred
        pos = center(positions, mask) if gen_pos else apply_mask(positions, mask)
        if warm_start > 0:
            expr, pos = self._warm_start(
                expr, pos, mask, mode, top, gene_mask=gene_mask, generator=generator
            )
        else:
            if gen_expr:
                expr = sample_masked_gaussian(expr.shape, mask, generator=generator, device=device)
            if gen_pos:
                pos = sample_centered_gaussian(pos.shape, mask, generator=generator, device=device)
        expr_top = T
        if not 0 <= expression_start < 1:
            raise ValueError(f"expression_start must be in [0, 1), got {expression_start}")
        if expression_start > 0:
            if mode != "joint":
                raise ValueError(f"expression_start needs joint mode, not {mode}")
            expr_top = max(1, round(expression_start * T))
            expr = self._noised_expression(apply_mask(expression, mask), mask, expr_top, generator)
        zeros = torch.zeros(b, dtype=torch.long, device=device)

        known = None if known is None else (known.bool() & mask)
        if known is not None and gen_expr and gen_pos:
            raise ValueError("known cells need one clean modality: use expr_to_pos or pos_to_expr")
        given = None  # (B, 1, G) entries whose expression is given
        if known_genes is not None:
            if known is not None or not gen_expr:
                raise ValueError("known_genes needs pos_to_expr or joint and no known cells")
            given = known_genes.bool().unsqueeze(1)
        true_expr, true_pos = apply_mask(expression, mask), positions
        # expr_to_pos: the cells most like each cell in its (clean) expression, searched once
        alike = None
        if self.consensus > 0 and gen_pos and not gen_expr:
            read = None if keeps_everything(gene_mask.bool()) else gene_mask.bool()
            alike = expression_neighbor_index(true_expr, mask, self.consensus_neighbors, read)
        expr_hat, pos_hat = expr, pos
        pairs = list(itertools.pairwise(grid))
        steps_shown = pairs if self.progress is None else self.progress(pairs, f"sampling {mode}")
        # expr_to_pos: the expression is the same at every step (its neighbour search, once)
        with _constant_expression(self.model, mode == "expr_to_pos"):
            for t, s in steps_shown:
                step_t = torch.full((b,), t, dtype=torch.long, device=device)
                step_s = torch.full((b,), s, dtype=torch.long, device=device)
                expr_t = torch.clamp(step_t, max=expr_top)  # a started expression waits
                t_expr = (expr_t if gen_expr else zeros).float() / T
                t_pos = (step_t if gen_pos else zeros).float() / T
                out = self.model(expr, pos, t_expr, t_pos, mask, gene_mask)
                if gen_expr and s >= expr_top:
                    expr_hat = apply_mask(out.expression, mask)
                elif gen_expr:
                    expr_hat = apply_mask(out.expression, mask)
                    if known is not None:
                        expr_hat = torch.where(known.unsqueeze(-1), true_expr, expr_hat)
                    if given is not None:
                        expr_hat = apply_mask(torch.where(given, true_expr, expr_hat), mask)
                    expr = self._step(
                        "expression", expr_hat, expr, expr_t, step_s, sampler, eta, generator
                    )
                    if known is not None:
                        expr = self._replace_known(
                            "expression", expr, expr_hat, known, step_s, generator
                        )
                    if given is not None:
                        expr = self._replace_known(
                            "expression", expr, expr_hat, given, step_s, generator
                        )
                    expr = apply_mask(expr, mask)
                if gen_pos:
                    pos_hat = center(out.positions, mask)
                    if known is not None:
                        pos_hat = center(_paste_known(pos_hat, true_pos, known), mask)
                    if alike is not None:
                        pulled = center(pull_to_neighbors(pos_hat, *alike, self.consensus), mask)
                        if known is None:  # the network's estimate sets the spread
                            pos_hat = _with_spread_of(pos_hat, pulled, mask)
                        else:  # known cells stay where they are and fix the frame
                            pos_hat = center(
                                torch.where(known.unsqueeze(-1), pos_hat, pulled), mask
                            )
                    pos = self._step(
                        "position", pos_hat, pos, step_t, step_s, sampler, eta, generator
                    )
                    if known is not None:
                        pos = self._replace_known(
                            "position", pos, pos_hat, known, step_s, generator
                        )
                    pos = center(pos, mask)
        if known is not None and gen_pos:
            pos_hat = apply_mask(_paste_known(pos_hat, true_pos, known, to_input_frame=True), mask)
        return (expr_hat if gen_expr else expr), (pos_hat if gen_pos else center(pos, mask))

    @torch.inference_mode()
    def predict_mean(
        self,
        expression: Tensor,
        positions: Tensor,
        node_mask: Tensor,
        mode: Literal["expr_to_pos", "pos_to_expr"],
        *,
        gene_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        n_draws: int = 4,
    ) -> tuple[Tensor, Tensor]:
        """Conditional mean of the generated modality given the clean one, in one step per draw.

        An x0-predicting denoiser trained with MSE estimates ``E[x0 | z_t, condition]``; at step
        ``T`` the state ``z_T`` carries almost no information about ``x0``, so its prediction is
        ``E[x0 | condition]``, the minimum-MSE point estimate (what imputation metrics score).
        A single reverse-process sample instead adds the cell-level variation the condition
        cannot explain. The prediction is averaged over ``n_draws`` prior draws.

        Returns
        -------
        (expression, positions)
            Shapes and conventions as :meth:`sample`.
        """
        if mode not in ("expr_to_pos", "pos_to_expr"):
            raise ValueError(f"predict_mean needs expr_to_pos or pos_to_expr, got {mode!r}")
        mask = node_mask.bool()
        b, device = expression.shape[0], expression.device
        if gene_mask is None:
            gene_mask = torch.ones(b, expression.shape[2], dtype=torch.bool, device=device)
        expr = apply_mask(expression, mask)
        # the clean condition keeps its frame; generated positions are centred
        pos = apply_mask(positions, mask) if mode == "pos_to_expr" else center(positions, mask)
        zeros = torch.zeros(b, device=device)
        ones = torch.ones(b, device=device)
        total = torch.zeros_like(expr if mode == "pos_to_expr" else pos)
        for _ in range(n_draws):
            if mode == "pos_to_expr":
                z = sample_masked_gaussian(expr.shape, mask, generator=generator, device=device)
                total += self.model(z, pos, ones, zeros, mask, gene_mask).expression
            else:
                z = sample_centered_gaussian(pos.shape, mask, generator=generator, device=device)
                total += self.model(expr, z, zeros, ones, mask, gene_mask).positions
        mean = total / n_draws
        if mode == "pos_to_expr":
            return apply_mask(mean, mask), center(pos, mask)
        return expr, center(mean, mask)

    @torch.inference_mode()
    def impute_mean(
        self,
        expression: Tensor,
        positions: Tensor,
        node_mask: Tensor,
        known_genes: Tensor,
        *,
        use_positions: bool = True,
        generator: torch.Generator | None = None,
        n_draws: int = 4,
    ) -> Tensor:
        """Conditional mean of the genes not in ``known_genes`` given the known ones.

        The known genes are the input, clean (expression time 0), and every other gene is
        hidden from the network, as in the gene-hiding items of training
        (``training.p_hide_genes``). With ``use_positions`` the clean positions are the other
        condition (one network evaluation); without, positions are pure noise at time 1 (the
        prediction is averaged over ``n_draws`` noise draws): imputation from expression alone.

        Parameters
        ----------
        expression
            (B, N, G) model-space expression; read for the known genes only.
        positions
            (B, N, D) clean positions (read only with ``use_positions``).
        node_mask
            (B, N) bool, True for real cells.
        known_genes
            (B, G) bool, True for a gene given in every cell of the item.

        Returns
        -------
        Tensor
            (B, N, G): the known genes as given, the others predicted; padded rows 0.
        """
        mask = node_mask.bool()
        known = known_genes.bool()
        b, device = expression.shape[0], expression.device
        expr = apply_mask(expression, mask) * known.unsqueeze(1).to(expression.dtype)
        zeros = torch.zeros(b, device=device)
        if use_positions:
            pos = apply_mask(positions, mask)
            predicted = self.model(expr, pos, zeros, zeros, mask, known).expression
        else:
            ones = torch.ones(b, device=device)
            predicted = torch.zeros_like(expr)
            for _ in range(n_draws):
                z = sample_centered_gaussian(
                    positions.shape, mask, generator=generator, device=device
                )
                predicted += self.model(expr, z, zeros, ones, mask, known).expression
            predicted = predicted / n_draws
        return apply_mask(torch.where(known.unsqueeze(1), expr, predicted), mask)

    def _warm_start(
        self,
        expr: Tensor,
        pos: Tensor,
        mask: Tensor,
        mode: Literal["expr_to_pos", "pos_to_expr"],
        top: int,
        *,
        gene_mask: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """State at step ``top``: the one-step mean estimate, forward-noised (SDEdit)."""
        mean_expr, mean_pos = self.predict_mean(
            expr, pos, mask, mode, gene_mask=gene_mask, generator=generator, n_draws=1
        )
        if mode == "pos_to_expr":  # the condition keeps its own frame
            return self._noised_expression(mean_expr, mask, top, generator), pos
        step = torch.full((expr.shape[0],), top, dtype=torch.long, device=expr.device)
        eps = sample_centered_gaussian(pos.shape, mask, generator=generator, device=pos.device)
        return expr, center(self.noise_model.q_sample("position", mean_pos, step, eps), mask)

    def _noised_expression(
        self, x0: Tensor, mask: Tensor, step: int, generator: torch.Generator | None
    ) -> Tensor:
        """(B, N, G) expression ``x0`` forward-noised to ``step`` (padded rows zero)."""
        at = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        eps = sample_masked_gaussian(x0.shape, mask, generator=generator, device=x0.device)
        return apply_mask(self.noise_model.q_sample("expression", x0, at, eps), mask)

    def _replace_known(
        self,
        modality: Literal["expression", "position"],
        z_s: Tensor,
        x0_known: Tensor,
        known: Tensor,
        step_s: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Known entries' state at step s: the forward-noised truth ``q(z_s | x0)``.

        ``known`` is (B, N) cells, or a bool mask that broadcasts to ``z_s``, e.g. (B, 1, G)."""
        eps = torch.randn(z_s.shape, generator=generator, device=z_s.device, dtype=z_s.dtype)
        noised = self.noise_model.q_sample(modality, x0_known, step_s, eps)
        where = known.unsqueeze(-1) if known.dim() == 2 else known
        return torch.where(where, noised, z_s)

    def _step(
        self,
        modality: Literal["expression", "position"],
        x0_hat: Tensor,
        z_t: Tensor,
        step_t: Tensor,
        step_s: Tensor,
        sampler: SamplerKind,
        eta: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
        if sampler == "ddpm":
            mean, std = self.noise_model.posterior(modality, x0_hat, z_t, step_t, step_s)
            last = (step_s == 0).view(-1, *([1] * (z_t.dim() - 1)))
            return torch.where(last, x0_hat, mean + std * noise)
        return self.noise_model.ddim_step(modality, x0_hat, z_t, step_t, step_s, eta, noise)


def _paste_known(
    pos_hat: Tensor, true_pos: Tensor, known: Tensor, *, to_input_frame: bool = False
) -> Tensor:
    """Replace known cells' predicted positions (B, N, D) by their true ones, translated into the
    prediction's frame (or, with ``to_input_frame``, move the prediction into the input frame)."""
    k = known.unsqueeze(-1).to(pos_hat.dtype)
    count = k.sum(dim=1).clamp(min=1)  # (B, 1)
    shift = ((pos_hat - true_pos) * k).sum(dim=1) / count  # (B, D) prediction minus input frame
    if to_input_frame:
        return torch.where(known.unsqueeze(-1), true_pos, pos_hat - shift.unsqueeze(1))
    return torch.where(known.unsqueeze(-1), true_pos + shift.unsqueeze(1), pos_hat)


def pull_to_neighbors(positions: Tensor, index: Tensor, valid: Tensor, share: float) -> Tensor:
    """Each cell moved ``share`` of the way to the weighted mean position of its neighbours.

    A neighbour's weight falls with its distance from the cell in ``positions`` (a Gaussian
    whose variance is the item's mean squared distance to the neighbours), so a cell follows
    the neighbours placed near it, not those placed elsewhere (a cell type found in two
    regions is not pulled into the gap between them). ``positions`` (B, N, D);
    ``index``/``valid`` (B, N, k) as in :class:`~alphastomics.attn_model.neighbors.NeighborGraph`.
    Cells without a valid neighbour stay where they are. Returns (B, N, D).
    """
    near = gather_cells(positions, index)  # (B, N, k, D)
    squared = (near - positions.unsqueeze(2)).square().sum(dim=-1)  # (B, N, k)
    real = valid.to(positions.dtype)
    variance = (squared * real).sum(dim=(1, 2)) / real.sum(dim=(1, 2)).clamp(min=1)  # (B,)
    variance = variance.clamp(min=torch.finfo(positions.dtype).tiny).view(-1, 1, 1)
    weight = (torch.exp(-0.5 * squared / variance) * real).unsqueeze(-1)  # (B, N, k, 1)
    total = weight.sum(dim=2)  # (B, N, 1)
    mean = (near * weight).sum(dim=2) / total.clamp(min=torch.finfo(positions.dtype).tiny)
    return torch.where(total > 0, torch.lerp(positions, mean, share), positions)


def _with_spread_of(reference: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    """Centred ``positions`` (B, N, D) scaled per item to the RMS radius of the centred
    ``reference`` (B, N, D) over the real cells of ``mask`` (B, N): a pull toward neighbours
    shrinks a layout, and the consensus is to arrange cells, not to scale the layout."""
    real = mask.unsqueeze(-1).to(positions.dtype)
    tiny = torch.finfo(positions.dtype).tiny
    wanted = (reference.square() * real).sum(dim=(1, 2))  # (B,)
    have = (positions.square() * real).sum(dim=(1, 2)).clamp(min=tiny)
    return positions * torch.sqrt(wanted / have).view(-1, 1, 1)


def _constant_expression(model: nn.Module, constant: bool) -> AbstractContextManager[None]:
    """``model.constant_expression()`` (the Denoiser's) when ``constant``; else nothing."""
    if constant and hasattr(model, "constant_expression"):
        return model.constant_expression()
    return contextlib.nullcontext()
