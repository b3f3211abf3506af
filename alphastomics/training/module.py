"""`AlphaSTomicsModule`: the LightningModule that arranges noise, network, loss and logging.

It is the only place that logs. Expression arrives log-normalised from the data loaders and is
standardised per gene here (the statistics come from the training split and live in the
checkpoint), so every consumer of a checkpoint maps back to the same units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.strategies import DeepSpeedStrategy
from torch import Tensor
from tqdm.auto import tqdm

from alphastomics import __version__
from alphastomics.attn_model.model import Denoiser
from alphastomics.attn_model.neighbor_readout import NeighborReadout, readout_split
from alphastomics.config import (
    Config,
    config_to_dict,
    load_config,
    resolve_auto,
    upgrade_saved_config,
)
from alphastomics.data.batch import DataHolder, apply_mask, center
from alphastomics.data.units import ExpressionScaler
from alphastomics.diffusion_model.diffusion_utils import hide_genes
from alphastomics.diffusion_model.loss import DiffusionLoss, NeighborCache, compute_loss
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler, SampleMode, SamplerKind
from alphastomics.utils.memory import tune_malloc

log = logging.getLogger(__name__)

VAL_LOSS_DRAWS = 8  # noise draws averaged into each validation loss


class AlphaSTomicsModule(pl.LightningModule):
    """Dual-modality diffusion model: training, validation and sampling entry points.

    Parameters
    ----------
    cfg
        A :class:`~alphastomics.config.Config` or its dict form (as stored in checkpoints).
    num_genes
        G, the length of the model's gene list.
    gene_names
        The model's genes in order (stored so new data can be matched by name).
    gene_mean, gene_std
        (G,) per-gene statistics of log-normalised training expression; default 0 and 1.
    data_info
        What the data looked like at preprocess time (AnnData keys, normalisation, cell types):
        stored in the checkpoint so ``sample``/``test``/``extract`` need no extra flags.
    """

    def __init__(
        self,
        cfg: Config | dict[str, Any],
        num_genes: int,
        *,
        gene_names: list[str] | None = None,
        gene_mean: list[float] | None = None,
        gene_std: list[float] | None = None,
        data_info: dict[str, Any] | None = None,
        n_dims: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, Config):
            cfg = load_config(base=upgrade_saved_config(cfg))  # e.g. hparams of a checkpoint
        # `auto` settles here for callers that did not (the train workflow logs its choice)
        cfg, _ = resolve_auto(cfg, (data_info or {}).get("n_training_frames"))
        cfg_dict = config_to_dict(cfg)
        self.cfg: Config = cfg
        self.save_hyperparameters(
            {
                "cfg": cfg_dict,
                "num_genes": num_genes,
                "gene_names": list(gene_names) if gene_names is not None else None,
                "gene_mean": list(gene_mean) if gene_mean is not None else None,
                "gene_std": list(gene_std) if gene_std is not None else None,
                "data_info": data_info or {},
                "n_dims": n_dims,
                "alphastomics_version": __version__,
            }
        )
        self.n_dims = n_dims
        self.model = Denoiser(n_genes=num_genes, n_dims=n_dims, **dataclasses.asdict(cfg.model))
        self.neighbor_readout = (
            NeighborReadout(
                n_genes=num_genes, n_dims=n_dims, n_neighbors=cfg.neighbor_readout.n_neighbors
            )
            if cfg.neighbor_readout.n_neighbors > 0 and cfg.training_mode != "expr_to_pos"
            else None  # expr_to_pos models never impute expression
        )
        self.noise_model = NoiseModel(
            diffusion_steps=cfg.diffusion.diffusion_steps,
            nu_expression=cfg.diffusion.nu_expression,
            nu_position=cfg.diffusion.nu_position,
        )
        self.scaler = ExpressionScaler(num_genes, gene_mean, gene_std)
        self._nonfinite_in_a_row = 0
        self._loss_was_finite = True
        self.n_skipped_steps = 0
        # true neighbours of whole slices for the sampled distance loss, reused across epochs
        self._neighbor_cache = NeighborCache(cfg.loss.n_neighbor_pairs)

    # ------------------------------------------------------------------ expression units
    def on_after_batch_transfer(self, batch: DataHolder, dataloader_idx: int) -> DataHolder:
        """Standardise expression once per batch, on the device."""
        expr = self.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)
        return batch.replace(expression=expr)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        """Keep freed tensor memory in the C heap (see :mod:`alphastomics.utils.memory`)."""
        tune_malloc()

    def _clean_masks(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Which items hold expression / positions clean this step, per ``training_mode``."""
        device = self.device
        mode = self.cfg.training_mode
        if mode == "expr_to_pos":
            clean_expr = torch.ones(batch_size, dtype=torch.bool, device=device)
            return clean_expr, ~clean_expr
        if mode == "pos_to_expr":
            clean_pos = torch.ones(batch_size, dtype=torch.bool, device=device)
            return ~clean_pos, clean_pos
        u = torch.rand(batch_size, generator=generator, device=device)
        p_expr = self.cfg.training.p_clean_expression
        p_pos = self.cfg.training.p_clean_position
        return u < p_expr, (u >= p_expr) & (u < p_expr + p_pos)

    def diffusion_loss(
        self, batch: DataHolder, generator: torch.Generator | None = None
    ) -> DiffusionLoss:
        """Noise a standardised batch, denoise it and score the prediction."""
        b = batch.batch_size
        clean_expr, clean_pos = self._clean_masks(b, generator)
        step_e = self.noise_model.sample_steps(b, device=self.device, generator=generator)
        step_p = self.noise_model.sample_steps(b, device=self.device, generator=generator)
        # gene imputation: some items hide measured genes from the input and are scored on
        # those alone, their visible genes given clean (as `impute` gives them)
        hidden = self._hidden_genes(batch.gene_mask, generator)  # (B, G)
        hides = hidden.any(dim=1)  # (B,)
        clean_expr = clean_expr | hides
        step_e = torch.where(clean_expr, torch.zeros_like(step_e), step_e)
        step_p = torch.where(clean_pos, torch.zeros_like(step_p), step_p)
        noisy = self.noise_model.apply_noise(
            batch, step_expression=step_e, step_position=step_p, generator=generator
        )
        out = self.model(
            noisy.noisy_expression,
            noisy.noisy_positions,
            noisy.t_expression,
            noisy.t_position,
            noisy.node_mask,
            noisy.gene_mask & ~hidden,
        )
        loss_cfg = self.cfg.loss
        result = compute_loss(
            out.expression,
            out.positions,
            noisy.replace(gene_mask=torch.where(hides.unsqueeze(1), hidden, noisy.gene_mask)),
            lambda_expression=loss_cfg.lambda_expression,
            lambda_position=loss_cfg.lambda_position,
            use_distance_matrix=loss_cfg.use_distance_matrix,
            align_rotation=loss_cfg.align_rotation,
            exact_distance_max_cells=loss_cfg.exact_distance_max_cells,
            n_neighbor_pairs=loss_cfg.n_neighbor_pairs,
            n_random_pairs=loss_cfg.n_random_pairs,
            expression_weight=(~clean_expr | hides).float(),
            position_weight=(~clean_pos).float(),
            generator=generator,
            position_neighbors=self._neighbor_cache.lookup(
                noisy.positions,
                noisy.node_mask,
                noisy.slice_index,
                loss_cfg.exact_distance_max_cells,
            )
            if loss_cfg.use_distance_matrix
            else None,
        )
        if self.neighbor_readout is not None:
            result = result.with_term(
                "neighbor_mse",
                self.neighbor_readout_loss(batch, generator),
                self.cfg.neighbor_readout.loss_weight,
            )
        return result

    def _hidden_genes(self, gene_mask: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, G) bool measured genes hidden from the input this step (``training.p_hide_genes``)."""
        t = self.cfg.training
        p = 0.0 if self.cfg.training_mode == "expr_to_pos" else t.p_hide_genes
        return hide_genes(gene_mask, p, t.hide_share_min, t.hide_share_max, generator)

    def neighbor_readout_loss(
        self, batch: DataHolder, generator: torch.Generator | None = None
    ) -> Tensor:
        """MSE of the neighbour read-out on cells hidden from it, over the items of ``batch``.

        Each item hides a region of its cells (:func:`readout_split`) and imputes their
        standardised expression from the visible cells around them; scored on measured genes.
        Items with fewer than 2 cells add nothing (the result stays connected to every
        read-out parameter, so distributed training sees a gradient for each).
        """
        readout = self.neighbor_readout
        assert readout is not None
        max_queries = self.cfg.neighbor_readout.max_queries
        sse = sum(p.sum() * 0.0 for p in readout.parameters())
        count = 0
        for b in range(batch.batch_size):
            real = batch.node_mask[b].bool()
            if int(real.sum()) < 2:
                continue
            positions = batch.positions[b][real]  # (n, D)
            expression = batch.expression[b][real]  # (n, G) standardised
            queries, references = readout_split(positions, max_queries, generator)
            predicted = readout(
                positions[queries], positions[references], expression[references]
            )  # (Q, G)
            measured = batch.gene_mask[b].bool()
            error = (predicted - expression[queries])[:, measured]
            sse = sse + error.float().square().sum()
            count += error.numel()
        return sse / max(count, 1)

    def training_step(self, batch: DataHolder, batch_idx: int) -> Tensor | None:
        result = self.diffusion_loss(batch)
        # every rank must agree to skip, or DDP would wait forever for the skipping rank
        self._loss_was_finite = self._all_ranks(bool(torch.isfinite(result.total)))
        if not self._loss_was_finite:
            return self._skip_nonfinite("loss")
        self.log("train/loss", result.total, batch_size=batch.batch_size, prog_bar=True)
        self.log_dict(
            {f"train/{k}": v for k, v in result.terms.items()}, batch_size=batch.batch_size
        )
        return result.total

    def _skip_nonfinite(self, what: str) -> None:
        self._nonfinite_in_a_row += 1
        self.n_skipped_steps += 1
        self.log("train/skipped_steps", float(self.n_skipped_steps))
        limit = self.cfg.training.max_consecutive_nonfinite
        log.warning("non-finite %s at step %d: step skipped", what, self.global_step)
        if self._nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} non-finite {what} values in a row (limit "
                f"training.max_consecutive_nonfinite={limit}), training stopped at step "
                f"{self.global_step}: lower training.lr or check the input data, then train again"
            )
        return None

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Run forward/backward, then step only when every gradient is finite."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) or self._uses_grad_scaler():
            # DeepSpeed and fp16 loss scaling run the closure and the step themselves, and skip
            # overflowing steps on their own
            optimizer.step(closure=optimizer_closure)
            if self._loss_was_finite:
                self._nonfinite_in_a_row = 0
            return
        if optimizer_closure is not None:
            optimizer_closure()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if grads and not self._all_ranks(finite):
            optimizer.zero_grad(set_to_none=True)
            self._skip_nonfinite("gradient")
            return
        optimizer.step()
        if grads:  # a real step (a skipped loss leaves no gradients): the streak is over
            self._nonfinite_in_a_row = 0

    def _all_ranks(self, decision: bool) -> bool:
        """True only when ``decision`` holds on every rank (a no-op without distribution)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return decision
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=True))

    def _uses_grad_scaler(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and str(trainer.precision) in ("16-mixed", "16")

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: DataHolder, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        # the same VAL_LOSS_DRAWS noise levels and modality choices every validation: a single
        # random draw per slice is too noisy to pick best.ckpt by
        results = [self.diffusion_loss(batch, generator=generator) for _ in range(VAL_LOSS_DRAWS)]
        b = batch.batch_size
        total = torch.stack([r.total for r in results]).mean()
        self.log("val/loss", total, batch_size=b, prog_bar=True, sync_dist=True)
        self.log_dict(
            {
                f"val/{k}": torch.stack([r.terms[k] for r in results]).mean()
                for k in results[0].terms
            },
            batch_size=b,
            sync_dist=True,
        )
        if batch_idx < self.cfg.training.val_max_slices:
            for name, value in self.quick_sample_metrics(batch, generator).items():
                self.log(f"val/{name}", value, batch_size=b, sync_dist=True)

    def quick_sample_metrics(
        self, batch: DataHolder, generator: torch.Generator
    ) -> dict[str, float]:
        """Cheap few-step samples of both directions (as `test` makes them), scored on item 0."""
        from alphastomics.evaluation.metrics import expression_metrics, position_metrics

        steps = min(self.cfg.training.val_sample_steps, self.noise_model.T)
        sampler = DiffusionSampler(
            self.model,
            self.noise_model,
            sampler="ddim",
            steps=steps,
            eta=self.cfg.sampling.eta,
            warm_start=self.cfg.sampling.warm_start,
            grid_power=self.cfg.sampling.grid_power,
        )
        metrics: dict[str, float] = {}
        mask = batch.node_mask[0]
        if self.cfg.training_mode in ("joint", "expr_to_pos"):
            _, pos = sampler.sample(
                batch.expression,
                batch.positions,
                batch.node_mask,
                "expr_to_pos",
                gene_mask=batch.gene_mask,
                generator=generator,
            )
            if bool(torch.isfinite(pos[0][mask]).all()):  # non-finite weights: no score
                pm = position_metrics(
                    batch.positions[0][mask].cpu().numpy(),
                    pos[0][mask].cpu().numpy(),
                    max_anchors=500,
                )
                metrics["distance_spearman_median"] = float(pm["distance_spearman_median"])
        if self.cfg.training_mode in ("joint", "pos_to_expr"):
            draw = (
                sampler.predict_mean
                if self.cfg.sampling.expression_estimate == "mean"
                else sampler.sample
            )
            expr, _ = draw(
                batch.expression,
                batch.positions,
                batch.node_mask,
                "pos_to_expr",
                gene_mask=batch.gene_mask,
                generator=generator,
            )
            if bool(torch.isfinite(expr[0][mask]).all()):
                em = expression_metrics(
                    batch.expression[0][mask].cpu().numpy(),
                    expr[0][mask].cpu().numpy(),
                    gene_mask=batch.gene_mask[0].cpu().numpy(),
                )
                metrics["pcc_gene_mean"] = float(em["pcc_gene_mean"])
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        batch: DataHolder,
        mode: SampleMode,
        *,
        sampler: SamplerKind | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        show_progress: bool = False,
        known: Tensor | None = None,
        expression_estimate: Literal["mean", "sample"] = "sample",
        warm_start: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample from a log-normalised batch; returns log-normalised expression and scaled positions.

        ``known`` (B, N) bool marks cells whose generated modality is given (inpainting, see
        :meth:`DiffusionSampler.sample`). With ``expression_estimate="mean"``, ``pos_to_expr``
        returns a point estimate instead of a draw: the conditional mean
        (:meth:`DiffusionSampler.predict_mean`) without known cells, the neighbour read-out
        (:meth:`impute_from_neighbors`) with them when the model has one.

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
            return self.predict_mean(batch, mode, generator=generator)
        batch, expr = self._standardized_on_device(batch)
        diffusion_sampler = self._sampler(sampler, steps, show_progress)
        expr_out, pos_out = diffusion_sampler.sample(
            expr,
            batch.positions,
            batch.node_mask,
            mode,
            gene_mask=batch.gene_mask,
            generator=generator,
            known=None if known is None else known.to(self.device),
            warm_start=warm_start,
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
        expr_out, pos_out = self._sampler(None, None, False).predict_mean(
            expr,
            batch.positions,
            batch.node_mask,
            mode,
            gene_mask=batch.gene_mask,
            generator=generator,
        )
        return apply_mask(self.scaler.unstandardize(expr_out), batch.node_mask), pos_out

    def _standardized_on_device(self, batch: DataHolder) -> tuple[DataHolder, Tensor]:
        """``batch`` on the module's device and its standardised (B, N, G) expression."""
        batch = batch.to(self.device)
        return batch, self.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)

    @property
    def imputes_from_neighbors(self) -> bool:
        """Whether ``pos_to_expr`` with known cells and the configured ``expression_estimate``
        uses the neighbour read-out (else it inpaints a reverse-process draw)."""
        return self.neighbor_readout is not None and (
            self.cfg.sampling.expression_estimate == "mean"
        )

    def _sampler(
        self, sampler: SamplerKind | None, steps: int | None, show_progress: bool
    ) -> DiffusionSampler:
        return DiffusionSampler(
            self.model,
            self.noise_model,
            sampler=sampler or self.cfg.sampling.sampler,
            steps=steps or self.cfg.sampling.steps,
            eta=self.cfg.sampling.eta,
            warm_start=self.cfg.sampling.warm_start,
            grid_power=self.cfg.sampling.grid_power,
            progress=_progress_bar if show_progress else None,
        )

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
        batch = batch.to(self.device)
        mask = batch.node_mask.bool()
        known = known.to(self.device).bool() & mask
        expr = self.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)
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
            mean, _ = self._sampler(None, None, False).predict_mean(
                expr,
                batch.positions,
                mask,
                "pos_to_expr",
                gene_mask=batch.gene_mask,
                generator=generator,
            )
            expr_out = torch.where(
                unmeasured.unsqueeze(1), self.scaler.unstandardize(mean), expr_out
            )
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
        batch = batch.to(self.device)
        measured = batch.gene_mask.bool()
        if not bool(measured.any(dim=1).all()):
            item = int((~measured.any(dim=1)).nonzero()[0])
            raise ValueError(
                f"item {item} measures no gene: nothing to impute from; use pos_to_expr"
            )
        expr = self.scaler.standardize(batch.expression, batch.node_mask, batch.gene_mask)
        diffusion_sampler = self._sampler(sampler, steps, False)
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

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        train_cfg = self.cfg.training
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        total = self._total_steps()
        warmup = min(train_cfg.warmup_steps, max(total // 4, 1))

        def lr_factor(step: int) -> float:
            # linear warm-up, then cosine decay to 10% of the peak rate over the step budget or,
            # when training.max_time_minutes is set, over whichever budget runs out first
            if step < warmup:
                return (step + 1) / warmup
            progress = min(
                max((step - warmup) / max(total - warmup, 1), self._time_progress()), 1.0
            )
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _time_progress(self) -> float:
        """Share of the wall-clock budget used (0 without one); Lightning's Timer survives resume."""
        trainer = getattr(self, "_trainer", None)
        timer = (
            next((c for c in trainer.callbacks if isinstance(c, Timer)), None) if trainer else None
        )
        remaining = timer.time_remaining("train") if timer is not None else None
        if remaining is None:
            return 0.0
        elapsed = timer.time_elapsed("train")
        return min(elapsed / max(elapsed + remaining, 1e-9), 1.0)

    def _total_steps(self) -> int:
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except (RuntimeError, AttributeError, ValueError):
            total = 10_000
        if total <= 0 or total == float("inf"):
            total = 10_000
        return total

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["alphastomics_version"] = __version__
        checkpoint["alphastomics_nonfinite"] = {
            "skipped_steps": self.n_skipped_steps,
            "in_a_row": self._nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("alphastomics_nonfinite") or {}
        self.n_skipped_steps = int(counts.get("skipped_steps", 0))
        self._nonfinite_in_a_row = int(counts.get("in_a_row", 0))


def _progress_bar(pairs: list[tuple[int, int]], description: str) -> Iterable[tuple[int, int]]:
    """A tqdm bar over the reverse steps on a terminal (nothing in logs or pipes)."""
    return tqdm(pairs, desc=description, disable=None, leave=False)
