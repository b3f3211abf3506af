"""`Predictor`: what a trained network answers, on batches in the store's units.

It holds the parts a checkpoint restores (denoiser, noise model, expression scaler, optional
neighbour read-out and reference cells) and the sampling settings, and serves the three sampling
modes, the one-step conditional mean and gene imputation. Expression goes in and comes out log-normalised (the
scaler standardises it for the network and maps the result back); positions are the store's
scaled units. Mapping to the user's units and AnnData lives in :mod:`alphastomics.workflows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from alphastomics.attn_model.model import Denoiser
from alphastomics.attn_model.neighbor_readout import NeighborReadout
from alphastomics.config import SamplingConfig
from alphastomics.data.batch import DataHolder, apply_mask, center
from alphastomics.data.units import ExpressionScaler
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import (
    DiffusionSampler,
    Progress,
    SampleMode,
    SamplerKind,
)
from alphastomics.utils.memory import tune_malloc

READ_CHUNK = 65_536  # query cells read out at a time (a (chunk, 4, G) buffer)


@dataclass(frozen=True)
class ReferenceCells:
    """Measured training cells of a model of one frame, where ``pos_to_expr`` reads expression.

    Attributes
    ----------
    positions
        (R, D) in the store's units (the training frame).
    expression
        (R, G) log-normalised.
    gene_mask
        (G,) bool: genes every reference cell measured (the others come from positions).
    """

    positions: Tensor
    expression: Tensor
    gene_mask: Tensor


@dataclass
class Predictor:
    """Inference of a trained model (see the module docstring for units).

    Parameters
    ----------
    denoiser, noise_model, scaler
        The trained network, its noise schedule and the per-gene standardisation of training.
    sampling
        The checkpoint's ``sampling`` settings: defaults of every call.
    neighbor_readout
        The neighbour read-out, when the model has one (``pos_to_expr`` with known cells).
    reference
        Training cells that ``pos_to_expr`` reads through the neighbour read-out
        (``sampling.reference_cells``); None: it predicts from positions alone.
    """

    denoiser: Denoiser
    noise_model: NoiseModel
    scaler: ExpressionScaler
    sampling: SamplingConfig
    neighbor_readout: NeighborReadout | None = None
    reference: ReferenceCells | None = None

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def imputes_from_neighbors(self) -> bool:
        """Whether ``pos_to_expr`` with known cells and the configured ``expression_estimate``
        uses the neighbour read-out (else it inpaints a reverse-process draw)."""
        return self.neighbor_readout is not None and self.sampling.expression_estimate == "mean"

    def expression_source(self, in_training_frame: bool) -> str:
        """What ``pos_to_expr``'s point estimate reads for positions ``in_training_frame`` (or
        not), as outputs record it: the reference cells, or the positions alone."""
        if (
            self.reference is not None
            and in_training_frame
            and self.sampling.expression_estimate == "mean"
        ):
            return "training cells (neighbour read-out)"
        return "positions"

    def sampler(
        self,
        sampler: SamplerKind | None = None,
        steps: int | None = None,
        progress: Progress | None = None,
    ) -> DiffusionSampler:
        """A :class:`DiffusionSampler` with the checkpoint's settings (``sampler``/``steps``
        override them)."""
        return DiffusionSampler(
            self.denoiser,
            self.noise_model,
            sampler=sampler or self.sampling.sampler,
            steps=steps or self.sampling.steps,
            eta=self.sampling.eta,
            warm_start=self.sampling.warm_start,
            grid_power=self.sampling.grid_power,
            consensus=self.sampling.consensus,
            consensus_neighbors=self.sampling.consensus_neighbors,
            progress=progress,
        )

    def sample(
        self,
        batch: DataHolder,
        mode: SampleMode,
        *,
        sampler: SamplerKind | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        known: Tensor | None = None,
        expression_estimate: Literal["mean", "sample"] = "sample",
        warm_start: float | None = None,
        expression_start: float = 0.0,
        in_training_frame: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Sample from a log-normalised batch; returns log-normalised expression and scaled positions.

        ``known`` (B, N) bool marks cells whose generated modality is given (inpainting, see
        :meth:`DiffusionSampler.sample`). With ``expression_estimate="mean"``, ``pos_to_expr``
        returns a point estimate instead of a draw: without known cells, the read-out of the
        model's reference cells (:meth:`read_reference`) when it has them and the positions are
        ``in_training_frame``, else the conditional mean (:meth:`DiffusionSampler.predict_mean`);
        with known cells, the neighbour read-out (:meth:`impute_from_neighbors`) when the model
        has one. ``progress`` wraps the reverse steps for display (:class:`DiffusionSampler`).

        Returns
        -------
        (expression, positions)
            (B, N, G) log-normalised and (B, N, D) centred, in the store's scaled units.
        """
        tune_malloc()  # see alphastomics.utils.memory; once per process
        point_estimate = mode == "pos_to_expr" and expression_estimate == "mean"
        if point_estimate and known is not None and self.neighbor_readout is not None:
            return self.impute_from_neighbors(batch, known, generator=generator)
        if point_estimate and known is None:
            if self.reference is not None and in_training_frame:
                return self.read_reference(batch, generator=generator)
            return self.predict_mean(batch, mode, generator=generator)
        batch, expr = self._standardized_on_device(batch)
        expr_out, pos_out = self.sampler(sampler, steps, progress).sample(
            expr,
            batch.positions,
            batch.node_mask,
            mode,
            gene_mask=batch.gene_mask,
            generator=generator,
            known=None if known is None else known.to(self.device),
            warm_start=warm_start,
            expression_start=expression_start,
        )
        expr_out = apply_mask(self.scaler.unstandardize(expr_out), batch.node_mask)
        return expr_out, pos_out

    def predict_mean(
        self,
        batch: DataHolder,
        mode: Literal["expr_to_pos", "pos_to_expr"],
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The one-step conditional mean of the generated modality given the clean one
        (:meth:`DiffusionSampler.predict_mean`), in the units of :meth:`sample`.

        Returns
        -------
        (expression, positions)
            (B, N, G) log-normalised and (B, N, D) centred, in the store's scaled units.
        """
        tune_malloc()
        batch, expr = self._standardized_on_device(batch)
        expr_out, pos_out = self.sampler().predict_mean(
            expr,
            batch.positions,
            batch.node_mask,
            mode,
            gene_mask=batch.gene_mask,
            generator=generator,
        )
        return apply_mask(self.scaler.unstandardize(expr_out), batch.node_mask), pos_out

    @torch.inference_mode()
    def read_reference(
        self, batch: DataHolder, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Expression at the batch's positions from the reference cells around them.

        Each cell reads the nearest reference cells through the learned neighbour read-out
        (what it learned on training cells hidden from it: how to interpolate, never absolute
        positions); genes not every reference cell measured get the conditional mean from
        positions (:meth:`DiffusionSampler.predict_mean`, drawn from ``generator``).

        Parameters
        ----------
        batch
            Positions (B, N, D) in the training frame; expression is not read.

        Returns
        -------
        (expression, positions)
            (B, N, G) log-normalised and (B, N, D) centred, as :meth:`sample` returns them.
        """
        readout, reference = self.neighbor_readout, self.reference
        if readout is None or reference is None:
            raise ValueError("this model has no reference cells to read (sampling.reference_cells)")
        batch, expr = self._standardized_on_device(batch)
        mask = batch.node_mask.bool()
        device = self.device
        positions = reference.positions.to(device)
        known = reference.gene_mask.to(device)
        standardized = self.scaler.standardize(
            reference.expression.to(device).unsqueeze(0),
            torch.ones(1, len(positions), dtype=torch.bool, device=device),
            known.unsqueeze(0),
        )[0]  # (R, G)
        out = torch.zeros_like(expr)
        for b in range(batch.batch_size):
            rows = torch.nonzero(mask[b]).squeeze(1)
            for start in range(0, len(rows), READ_CHUNK):
                chunk = rows[start : start + READ_CHUNK]
                out[b, chunk] = readout(batch.positions[b, chunk], positions, standardized)
        expr_out = self.scaler.unstandardize(out)
        if not bool(known.all()):
            mean = self._mean_from_positions(batch, expr, generator)
            expr_out = torch.where(known, expr_out, mean)
        return apply_mask(expr_out, mask), center(batch.positions, mask)

    @torch.inference_mode()
    def impute_from_neighbors(
        self, batch: DataHolder, known: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Expression of the cells not ``known`` from the known cells around them.

        Genes an item did not measure (``gene_mask`` False) cannot be read from its known
        cells: for those, every cell gets the conditional mean from positions
        (:meth:`DiffusionSampler.predict_mean`, drawn from ``generator``).

        Parameters
        ----------
        batch
            Log-normalised expression (B, N, G) (read for known cells only) and positions.
        known
            (B, N) bool, True for a measured reference cell; each item needs at least one.

        Returns
        -------
        (expression, positions)
            (B, N, G) log-normalised: known cells keep their measured genes, the others are
            imputed by the neighbour read-out; (B, N, D) positions centred, as :meth:`sample`
            returns them.
        """
        readout = self.neighbor_readout
        if readout is None:
            raise ValueError(
                "this model has no neighbour read-out (neighbor_readout.n_neighbors=0); "
                "sample with expression_estimate='sample' to inpaint known cells instead"
            )
        batch, expr = self._standardized_on_device(batch)
        mask = batch.node_mask.bool()
        known = known.to(self.device).bool() & mask
        out = expr.clone()
        for b in range(batch.batch_size):
            references, queries = known[b], mask[b] & ~known[b]
            if not bool(queries.any()):
                continue
            if not bool(references.any()):
                raise ValueError(f"item {b}: known marks no real cell; mark the reference cells")
            positions = batch.positions[b]
            out[b, queries] = readout(
                positions[queries], positions[references], expr[b, references]
            )
        expr_out = torch.where(
            known.unsqueeze(-1), batch.expression, self.scaler.unstandardize(out)
        )
        unmeasured = ~batch.gene_mask.bool()  # (B, G)
        if bool(unmeasured.any()):
            mean = self._mean_from_positions(batch, expr, generator)
            expr_out = torch.where(unmeasured.unsqueeze(1), mean, expr_out)
        return apply_mask(expr_out, mask), center(batch.positions, mask)

    @torch.inference_mode()
    def impute(
        self,
        batch: DataHolder,
        *,
        use_positions: bool = True,
        expression_estimate: Literal["mean", "sample"] = "mean",
        sampler: SamplerKind | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Expression of the genes each item did not measure, from those it did (and positions).

        ``batch.gene_mask`` marks the measured genes: they are the condition, with the
        positions unless ``use_positions`` is False (then expression alone). ``"mean"``: the
        conditional mean (:meth:`DiffusionSampler.impute_mean`, what the gene-hiding items of
        training teach, ``training.p_hide_genes``); ``"sample"``: one reverse-process draw of
        every unmeasured gene with the measured genes held to their values
        (:meth:`DiffusionSampler.sample` with ``known_genes``; positions drawn too when they
        are not used).

        Parameters
        ----------
        batch
            Log-normalised expression (B, N, G) (read for measured genes), positions (B, N, D)
            in the store's scaled units, ``gene_mask`` (B, G); each item needs a measured gene.

        Returns
        -------
        Tensor
            (B, N, G) log-normalised: measured genes as given, the others imputed; padded rows 0.
        """
        tune_malloc()
        measured = batch.gene_mask.bool()
        if not bool(measured.any(dim=1).all()):
            item = int((~measured.any(dim=1)).nonzero()[0])
            raise ValueError(
                f"item {item} measures no gene: nothing to impute from; use pos_to_expr"
            )
        batch, expr = self._standardized_on_device(batch)
        measured = measured.to(self.device)
        diffusion_sampler = self.sampler(sampler, steps)
        if expression_estimate == "mean":
            out = diffusion_sampler.impute_mean(
                expr,
                batch.positions,
                batch.node_mask,
                measured,
                use_positions=use_positions,
                generator=generator,
            )
        else:
            out, _ = diffusion_sampler.sample(
                expr,
                batch.positions,
                batch.node_mask,
                "pos_to_expr" if use_positions else "joint",
                gene_mask=torch.ones_like(measured),
                generator=generator,
                known_genes=measured,
            )
        imputed = torch.where(
            measured.unsqueeze(1), batch.expression, self.scaler.unstandardize(out)
        )
        return apply_mask(imputed, batch.node_mask)

    def _mean_from_positions(
        self, batch: DataHolder, expr: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """(B, N, G) log-normalised conditional mean from the positions of ``batch`` (on the
        device; ``expr`` its standardised expression), for genes a read-out cannot give."""
        mean, _ = self.sampler().predict_mean(
            expr,
            batch.positions,
            batch.node_mask.bool(),
            "pos_to_expr",
            gene_mask=batch.gene_mask,
            generator=generator,
        )
        return self.scaler.unstandardize(mean)

    def _standardized_on_device(self, batch: DataHolder) -> tuple[DataHolder, Tensor]:
        """``batch`` on the model's device and its standardised (B, N, G) expression."""
        batch = batch.to(self.device)
        return batch, self.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)
