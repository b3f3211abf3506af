from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import small_slice
from torch.utils.data import DataLoader

from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder, collate_holders
from alphastomics.data.store import DataInfo
from alphastomics.errors import UserInputError
from alphastomics.evaluation.metrics import position_metrics
from alphastomics.training.checkpoint import load_module
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.training.trainer import DEFAULT_MAX_EPOCHS, build_trainer, epoch_limit, stop_rule

SMALL = ["model.hidden_dim=64", "model.n_layers=2", "diffusion.diffusion_steps=200"]


def _module(expr, overrides):
    cfg = load_config(overrides=[*SMALL, *overrides])
    return AlphaSTomicsModule(
        cfg, expr.shape[1], gene_mean=expr.mean(0).tolist(), gene_std=(expr.std(0) + 1e-3).tolist()
    )


def test_learning_sanity_expr_to_pos():
    """A few hundred CPU steps on one generated slice: loss / 10 and Spearman >= 0.8."""
    torch.manual_seed(0)
    expr, pos = small_slice()
    module = _module(expr, ["training_mode=expr_to_pos"])
    holder = DataHolder.from_arrays(expr, pos)
    batch = module.on_after_batch_transfer(holder, 0)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(500):
        result = module.diffusion_loss(batch)
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        losses.append(result.total.item())
    assert np.mean(losses[:10]) / np.mean(losses[-10:]) >= 10
    module.eval()
    _, sampled = module.predictor.sample(
        holder, "expr_to_pos", steps=20, generator=torch.Generator().manual_seed(0)
    )
    spearman = position_metrics(pos, sampled[0].numpy())["distance_spearman_median"]
    assert spearman >= 0.8


@pytest.mark.parametrize(
    ("mode", "expect_expr_clean", "expect_pos_clean"),
    [("expr_to_pos", True, False), ("pos_to_expr", False, True)],
)
def test_directional_modes_hold_one_modality_clean(mode, expect_expr_clean, expect_pos_clean):
    expr, _ = small_slice(n_cells=50, n_genes=8)
    module = _module(expr, [f"training_mode={mode}"])
    clean_expr, clean_pos = module._clean_masks(64)
    assert bool(clean_expr.all()) is expect_expr_clean
    assert bool(clean_pos.all()) is expect_pos_clean


def test_joint_mode_clean_shares():
    expr, _ = small_slice(n_cells=50, n_genes=8)
    module = _module(expr, ["training.p_clean_expression=0.3", "training.p_clean_position=0.2"])
    torch.manual_seed(0)
    clean_expr, clean_pos = module._clean_masks(20000)
    assert abs(clean_expr.float().mean().item() - 0.3) < 0.02
    assert abs(clean_pos.float().mean().item() - 0.2) < 0.02
    assert not (clean_expr & clean_pos).any()


def _loader(expr, pos, n_items=4):
    items = [DataHolder.from_arrays(expr, pos) for _ in range(n_items)]
    return DataLoader(items, batch_size=2, collate_fn=collate_holders)


def test_fit_checkpoint_round_trip(tmp_path):
    expr, pos = small_slice(n_cells=80, n_genes=8)
    cfg = load_config(overrides=[*SMALL, "training.max_epochs=2", "training.val_every_n_epochs=1"])
    module = AlphaSTomicsModule(cfg, 8, gene_names=[f"g{i}" for i in range(8)])
    trainer = build_trainer(cfg, tmp_path, enable_progress_bar=False)
    trainer.fit(module, _loader(expr, pos), _loader(expr, pos, 2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    loaded = load_module(last)
    assert loaded.hparams["gene_names"] == [f"g{i}" for i in range(8)]
    holder = DataHolder.from_arrays(expr, pos)
    module.eval()
    a = module.predictor.sample(
        holder, "joint", steps=3, generator=torch.Generator().manual_seed(0)
    )
    b = loaded.predictor.sample(
        holder, "joint", steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_nonfinite_loss_steps_are_skipped_then_training_stops(tmp_path):
    expr, pos = small_slice(n_cells=40, n_genes=8)
    bad = expr.copy()
    bad[0, 0] = np.nan
    cfg = load_config(
        overrides=[*SMALL, "training.max_epochs=1", "training.max_consecutive_nonfinite=3"]
    )
    module = AlphaSTomicsModule(cfg, 8)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    loader = DataLoader(
        [DataHolder.from_arrays(bad, pos) for _ in range(2)],
        batch_size=1,
        collate_fn=collate_holders,
    )
    trainer = build_trainer(cfg, tmp_path, has_validation=False, enable_progress_bar=False)
    trainer.fit(module, loader)
    assert module.n_skipped_steps == 2
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    module2 = AlphaSTomicsModule(cfg, 8)
    loader3 = DataLoader(
        [DataHolder.from_arrays(bad, pos) for _ in range(3)],
        batch_size=1,
        collate_fn=collate_holders,
    )
    trainer = build_trainer(cfg, tmp_path / "b", has_validation=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match="max_consecutive_nonfinite"):
        trainer.fit(module2, loader3)


def test_checkpoint_errors(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="not a readable checkpoint"):
        load_module(junk)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserInputError, match="not an AlphaSTomics checkpoint"):
        load_module(tmp_path / "other.ckpt")
    with pytest.raises(UserInputError, match="does not exist"):
        load_module(tmp_path / "missing.ckpt")


def test_seed_everything_gives_identical_training(tmp_path):
    expr, pos = small_slice(n_cells=60, n_genes=8)
    cfg = load_config(overrides=[*SMALL, "training.max_epochs=2"])
    states = []
    for run in ("a", "b"):
        pl.seed_everything(5, verbose=False)
        module = AlphaSTomicsModule(cfg, 8)
        trainer = build_trainer(
            cfg, tmp_path / run, has_validation=False, enable_progress_bar=False
        )
        trainer.fit(module, _loader(expr, pos))
        states.append(module.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_last_checkpoint_is_early_throttled_and_final(tmp_path, monkeypatch):
    from alphastomics.training import trainer as trainer_module

    writes = []
    save = trainer_module.AtomicCheckpointIO.save_checkpoint

    def counting(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint["global_step"]))
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(trainer_module.AtomicCheckpointIO, "save_checkpoint", counting)
    expr, pos = small_slice(n_cells=40, n_genes=8)
    cfg = load_config(
        overrides=[*SMALL, "training.max_epochs=4", "training.checkpoint_every_minutes=10"]
    )
    module = AlphaSTomicsModule(cfg, 8)
    trainer = build_trainer(cfg, tmp_path, has_validation=False, enable_progress_bar=False)
    trainer.fit(module, _loader(expr, pos))
    last_writes = [step for name, step in writes if name == "last.ckpt"]
    # 4 epochs of 2 steps: the first epoch end (a kill in the first minute can resume), then
    # nothing for 10 minutes, and always the end
    assert last_writes == [2, 8]


def test_validation_cadence_is_sized_to_the_budget():
    from datetime import timedelta

    from alphastomics.training.trainer import validation_schedule

    budget = load_config(overrides=["training.max_time_minutes=15"])
    assert validation_schedule(budget) == (1, timedelta(minutes=1.5))
    assert validation_schedule(load_config()) == (1, timedelta(minutes=2.0))
    fixed = load_config(overrides=["training.max_time_minutes=15", "training.val_every_minutes=4"])
    assert validation_schedule(fixed) == (1, timedelta(minutes=4))
    epochs = load_config(overrides=["training.val_every_n_epochs=3"])
    assert validation_schedule(epochs) == (3, None)


def test_training_frames_count_slices_not_store_entries():
    def entry(name: str, split: str, source: str | None = None) -> dict:
        info = {"name": name, "split": split, "scale": 1.0, "n_cells": 10}
        return info | ({"slice": source} if source else {})

    one_volume = [entry("e/train", "train", "e"), entry("e/val", "val", "e")]
    one_volume.append(entry("e/test", "test", "e"))
    assert DataInfo.from_metadata({"slices": one_volume}).n_training_frames == 1
    slices = [entry("a", "train"), entry("b", "train"), entry("c", "test")]
    assert DataInfo.from_metadata({"slices": slices}).n_training_frames == 2
    # a module built without the data's frames takes the invariant, aligned loss
    module = AlphaSTomicsModule(load_config(overrides=[*SMALL]), 8)
    assert module.cfg.loss.align_rotation is True
    single = AlphaSTomicsModule(
        load_config(overrides=[*SMALL]), 8, data_info={"n_training_frames": 1}
    )
    assert single.cfg.loss.align_rotation is False
    assert single.hparams["cfg"]["loss"]["align_rotation"] is False


def test_a_step_or_time_budget_is_not_cut_short_by_an_epoch_count(tmp_path):
    def limit(*overrides: str) -> int:
        return epoch_limit(load_config(overrides=list(overrides)).training)

    assert limit() == DEFAULT_MAX_EPOCHS  # nothing else bounds training
    assert limit("training.max_time_minutes=15") == -1 and limit("training.max_steps=9") == -1
    assert limit("training.max_epochs=3", "training.max_time_minutes=15") == 3
    rule = stop_rule(load_config(overrides=["training.max_time_minutes=15"]).training)
    assert rule == "the 15-minute budget"
    # one item per epoch: 210 steps need 210 epochs, more than the old fixed 200
    expr, pos = small_slice(n_cells=30, n_genes=8)
    cfg = load_config(overrides=[*SMALL, "model.n_layers=1", "training.max_steps=210"])
    module = AlphaSTomicsModule(cfg, 8)
    loader = DataLoader(
        [DataHolder.from_arrays(expr, pos)], batch_size=1, collate_fn=collate_holders
    )
    trainer = build_trainer(cfg, tmp_path, has_validation=False, enable_progress_bar=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 210
    # the learning rate decays over the step budget (Lightning's estimate), not a fixed 10,000
    assert module._total_steps() == 210


def test_progress_is_a_bar_on_a_terminal_and_log_lines_in_a_file(tmp_path, monkeypatch, caplog):
    """A log file gets one line per interval, never tqdm's carriage-return redraws."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    from alphastomics.training.trainer import ProgressLog

    expr, pos = small_slice(n_cells=40, n_genes=8)
    cfg = load_config(overrides=[*SMALL, "training.max_steps=3"])
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    on_terminal = build_trainer(cfg, tmp_path / "tty", has_validation=False)
    assert any(isinstance(c, TQDMProgressBar) for c in on_terminal.callbacks)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    in_file = build_trainer(cfg, tmp_path / "file", has_validation=False)
    assert not any(isinstance(c, TQDMProgressBar) for c in in_file.callbacks)
    (progress,) = [c for c in in_file.callbacks if isinstance(c, ProgressLog)]
    progress.interval_s = 0.0
    module = AlphaSTomicsModule(cfg, 8, gene_names=[f"g{i}" for i in range(8)])
    with caplog.at_level("INFO", logger="alphastomics.training.trainer"):
        in_file.fit(module, _loader(expr, pos))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3 and lines[-1].startswith("step 3 (epoch ")
    assert "train/loss" in lines[-1] and "\r" not in "".join(lines)
