"""`AlphaSTomicsModule`: the LightningModule that arranges noise, network, loss and logging.

It is the only place that logs. Expression arrives log-normalised from the data loaders and is
standardised per gene here (the statistics come from the training split and live in the
checkpoint), so every consumer of a checkpoint maps back to the same units. Inference on a
trained module is its :attr:`~AlphaSTomicsModule.predictor`
(:class:`~alphastomics.diffusion_model.predict.Predictor`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.strategies import DeepSpeedStrategy
from torch import Tensor

from alphastomics import __version__
from alphastomics.attn_model.model import Denoiser
from alphastomics.attn_model.neighbor_readout import NeighborReadout, readout_loss
from alphastomics.config import (
    Config,
    config_to_dict,
    load_config,
    resolve_auto,
    upgrade_saved_config,
)
from alphastomics.data.batch import DataHolder
from alphastomics.data.store import DataInfo
from alphastomics.data.units import ExpressionScaler
from alphastomics.diffusion_model.diffusion_utils import hide_genes
from alphastomics.diffusion_model.loss import DiffusionLoss, NeighborCache, compute_loss
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.observation import CHECKPOINT_KEY, ObservationModel
from alphastomics.diffusion_model.predict import Predictor, ReferenceCells
from alphastomics.utils.memory import tune_malloc

log = logging.getLogger(__name__)

VAL_LOSS_DRAWS = 8  # noise draws averaged into each validation loss
_NO_STEP_BOUND = 2**62  # a schedule length that leaves the decay to the time budget


class AlphaSTomicsModule(pl.LightningModule):
    """Dual-modality diffusion model: training and validation steps, optimiser, checkpoint hooks.

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
        What the checkpoint remembers of its store (:class:`~alphastomics.data.store.DataInfo`,
        or its dict form).
    """

    def __init__(
        self,
        cfg: Config | dict[str, Any],
        num_genes: int,
        *,
        gene_names: list[str] | None = None,
        gene_mean: list[float] | None = None,
        gene_std: list[float] | None = None,
        data_info: DataInfo | dict[str, Any] | None = None,
        n_dims: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, Config):
            cfg = load_config(base=upgrade_saved_config(cfg))  # e.g. hparams of a checkpoint
        # `auto` settles here for callers that did not (the train workflow logs its choice)
        if not isinstance(data_info, DataInfo):
            data_info = DataInfo.from_dict(data_info)  # e.g. hparams of a checkpoint
        self.data_info: DataInfo = data_info
        cfg, _ = resolve_auto(cfg, data_info.n_training_frames)
        cfg_dict = config_to_dict(cfg)
        self.cfg: Config = cfg
        self.sampling_overrides: list[str] = []  # sampling.* words applied at load (load_module)
        self.save_hyperparameters(
            {
                "cfg": cfg_dict,
                "num_genes": num_genes,
                "gene_names": list(gene_names) if gene_names is not None else None,
                "gene_mean": list(gene_mean) if gene_mean is not None else None,
                "gene_std": list(gene_std) if gene_std is not None else None,
                "data_info": data_info.to_dict(),
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
        # measured training cells for joint generation's expression (set by `train`)
        self.observation_model: ObservationModel | None = None

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
        """The read-out's loss on ``batch`` (:func:`readout_loss`)."""
        assert self.neighbor_readout is not None
        return readout_loss(
            self.neighbor_readout,
            batch.positions,
            batch.expression,
            batch.node_mask,
            batch.gene_mask,
            self.cfg.neighbor_readout.max_queries,
            generator,
        )

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
        sampler = self.predictor.sampler("ddim", steps)
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

    # ------------------------------------------------------------------ inference
    @property
    def predictor(self) -> Predictor:
        """Inference with this module's network and ``sampling`` settings (shares its weights)."""
        return Predictor(
            self.model,
            self.noise_model,
            self.scaler,
            self.cfg.sampling,
            self.neighbor_readout,
            self.reference_cells,
        )

    @property
    def reference_cells(self) -> ReferenceCells | None:
        """The stored training cells ``pos_to_expr`` reads (``sampling.reference_cells: auto``):
        every training cell of a model of one slice or volume, with a neighbour read-out to
        read them; None otherwise."""
        stored = self.observation_model
        if (
            self.cfg.sampling.reference_cells == "none"
            or self.neighbor_readout is None
            or stored is None
            or not stored.atlas
        ):
            return None
        assert stored.positions is not None  # an atlas has them
        return ReferenceCells(
            positions=torch.from_numpy(stored.positions),
            expression=torch.from_numpy(stored.expression),
            gene_mask=torch.from_numpy(stored.measured_by_all),
        )

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
        """Steps the learning rate decays over: Lightning's estimate; without a step or epoch
        bound, a time budget alone sets the decay (:meth:`_time_progress`), else 10,000 steps."""
        try:
            estimate = float(self.trainer.estimated_stepping_batches)
        except (RuntimeError, AttributeError, ValueError):
            estimate = math.inf
        if math.isfinite(estimate) and estimate > 0:
            return int(estimate)
        return _NO_STEP_BOUND if self.cfg.training.max_time_minutes else 10_000

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["alphastomics_version"] = __version__
        checkpoint["alphastomics_nonfinite"] = {
            "skipped_steps": self.n_skipped_steps,
            "in_a_row": self._nonfinite_in_a_row,
        }
        if self.observation_model is not None:
            checkpoint[CHECKPOINT_KEY] = self.observation_model.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("alphastomics_nonfinite") or {}
        self.n_skipped_steps = int(counts.get("skipped_steps", 0))
        self._nonfinite_in_a_row = int(counts.get("in_a_row", 0))
        stored = ObservationModel.from_state(checkpoint.get(CHECKPOINT_KEY))
        if stored is not None:
            self.observation_model = stored
