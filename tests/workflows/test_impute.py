"""Gene imputation: hiding genes in training, the sampler's support, `Predictor.impute`, and
`alphastomics sample --sample_mode impute` (its bad inputs are in test_bad_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_OVERRIDES, make_tiny_adata, padded_batch, small_denoiser

from alphastomics.config import load_config, upgrade_saved_config
from alphastomics.data.batch import DataHolder, collate_holders
from alphastomics.diffusion_model.diffusion_utils import hide_genes
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler
from alphastomics.errors import UserInputError
from alphastomics.main import main
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.workflows.impute import impute_anndata

# ------------------------------------------------------------------------------------------
# hiding genes in training


def test_hide_genes_hides_only_measured_genes_and_keeps_one_visible() -> None:
    gene_mask = torch.ones(200, 10, dtype=torch.bool)
    gene_mask[:100, 6:] = False  # a smaller panel
    gene_mask[-1, 1:] = False  # one measured gene: nothing can be hidden
    gen = torch.Generator().manual_seed(0)
    hidden = hide_genes(gene_mask, 0.5, 0.2, 0.9, gen)
    assert not (hidden & ~gene_mask).any()
    n_hidden, n_measured = hidden.sum(1), gene_mask.sum(1)
    hiding = n_hidden > 0
    assert 0.3 < hiding.float().mean() < 0.7
    assert (n_hidden[hiding] <= n_measured[hiding] - 1).all()
    share = n_hidden[hiding].float() / n_measured[hiding]
    assert share.min() >= 0.1 and share.max() <= 0.9
    assert n_hidden[-1] == 0
    again = hide_genes(gene_mask, 0.5, 0.2, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(hidden, again)
    before = torch.get_rng_state()
    assert not hide_genes(gene_mask, 0.0, 0.2, 0.9).any()
    assert torch.equal(torch.get_rng_state(), before)  # p = 0 draws nothing


def test_training_hides_genes_from_the_input_and_scores_only_them() -> None:
    """Hiding items see their visible genes clean and the hidden ones not at all; their
    expression loss is that of the hidden genes alone."""
    cfg = load_config(overrides=[*TINY_OVERRIDES, "training.p_hide_genes=1.0"])
    module = AlphaSTomicsModule(cfg, num_genes=8)
    gen = torch.Generator().manual_seed(0)
    expr = torch.randn(3, 12, 8, generator=gen)
    batch = DataHolder(
        expression=expr, positions=torch.randn(3, 12, 3, generator=gen), node_mask=torch.ones(3, 12)
    )
    seen = {}
    forward = module.model.forward

    def exact_on_visible(expr_t, pos_t, t_expr, t_pos, node_mask, gene_mask):
        seen.update(t_expr=t_expr, gene_mask=gene_mask)
        out = forward(expr_t, pos_t, t_expr, t_pos, node_mask, gene_mask)
        # exact on every visible gene, 0 on the hidden ones
        out.expression = torch.where(gene_mask.unsqueeze(1), expr, torch.zeros_like(expr))
        return out

    module.model.forward = exact_on_visible
    result = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(1))
    visible = seen["gene_mask"]
    assert (~visible).any(1).all() and visible.any(1).all()  # every item hides some, keeps some
    assert (seen["t_expr"] == 0).all()  # the visible genes are given clean
    hidden_mse = expr.square().masked_select(~visible.unsqueeze(1)).mean()
    # items weigh equally; each scores the mean over its hidden entries
    per_item = [expr[b][:, ~visible[b]].square().mean() for b in range(3)]
    assert float(result.unweighted["expression_mse"]) == pytest.approx(
        float(torch.stack(per_item).mean()), rel=1e-5
    )
    assert float(hidden_mse) > 0.1


def test_expr_to_pos_models_hide_nothing() -> None:
    cfg = load_config(
        overrides=[*TINY_OVERRIDES, "training_mode=expr_to_pos", "training.p_hide_genes=1"]
    )
    module = AlphaSTomicsModule(cfg, num_genes=8)
    assert not module._hidden_genes(torch.ones(4, 8, dtype=torch.bool), None).any()


def test_hide_share_keys_are_checked_and_old_checkpoints_hid_nothing() -> None:
    with pytest.raises(UserInputError, match=r"training\.hide_share_min"):
        load_config(overrides=["training.hide_share_min=0.6", "training.hide_share_max=0.5"])
    with pytest.raises(UserInputError, match=r"training\.p_hide_genes"):
        load_config(overrides=["training.p_hide_genes=1.5"])
    assert load_config().training.p_hide_genes > 0
    saved = {"training": {"lr": 0.001}}
    assert upgrade_saved_config(saved)["training"]["p_hide_genes"] == 0.0


# ------------------------------------------------------------------------------------------
# sampler


def _sampler() -> tuple[DiffusionSampler, torch.Tensor, torch.Tensor, torch.Tensor]:
    expr, pos, mask = padded_batch()
    return DiffusionSampler(small_denoiser(), NoiseModel(diffusion_steps=20)), expr, pos, mask


def test_impute_mean_reads_only_the_known_genes_once() -> None:
    sampler, expr, pos, mask = _sampler()
    known = torch.tensor([[True, True, True, False, False, False]]).repeat(2, 1)
    calls = []
    forward = sampler.model.forward

    def recording(*args):
        calls.append(args)
        return forward(*args)

    sampler.model.forward = recording
    out = sampler.impute_mean(expr, pos, mask, known)
    assert len(calls) == 1
    _, _, t_expr, t_pos, _, gene_mask = calls[0]
    assert (t_expr == 0).all() and (t_pos == 0).all() and torch.equal(gene_mask, known)
    assert torch.equal(out[:, :, :3], expr[:, :, :3])
    assert torch.all(out[1, 6:] == 0)
    # the unknown genes' values in the input are never read
    other = expr.clone()
    other[:, :, 3:] = 99.0
    assert torch.allclose(sampler.impute_mean(other, pos, mask, known), out)
    calls.clear()
    sampler.impute_mean(expr, pos, mask, known, use_positions=False, n_draws=3)
    assert len(calls) == 3 and all((c[3] == 1).all() for c in calls)


@pytest.mark.parametrize("mode", ["pos_to_expr", "joint"])
def test_draws_hold_known_genes_to_their_values(mode: str) -> None:
    sampler, expr, pos, mask = _sampler()
    known = torch.tensor([[True, False, True, False, True, False]]).repeat(2, 1)
    gen = torch.Generator().manual_seed(0)
    out, _ = sampler.sample(expr, pos, mask, mode, steps=4, known_genes=known, generator=gen)
    assert torch.allclose(out[:, :, known[0]], expr[:, :, known[0]], atol=1e-6)
    assert not torch.allclose(out[0][:, ~known[0]], expr[0][:, ~known[0]], atol=1e-2)
    assert torch.all(out[1, 6:] == 0)
    with pytest.raises(ValueError, match="known_genes"):
        sampler.sample(expr, pos, mask, "expr_to_pos", steps=2, known_genes=known)
    with pytest.raises(ValueError, match=r"Predictor\.impute"):
        sampler.sample(expr, pos, mask, "impute", steps=2)


# ------------------------------------------------------------------------------------------
# the model learns to impute

N_GENES, N_VISIBLE = 10, 5


def _linked_genes(n_cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Expression (N, 10) whose last 5 genes are a known function of the first 5 (each the mean
    of two of them), and random positions (N, 3)."""
    visible = rng.gamma(2.0, 0.5, size=(n_cells, N_VISIBLE))
    hidden = 0.5 * (visible + np.roll(visible, -1, axis=1))
    expr = np.concatenate([visible, hidden], axis=1).astype(np.float32)
    return expr, rng.normal(size=(n_cells, 3)).astype(np.float32)


@pytest.mark.slow
def test_impute_beats_the_gene_mean_on_genes_that_follow_the_others() -> None:
    """A few seconds of training with the default gene hiding: the genes a query lacks are
    predicted from the ones it has far better than by their training mean."""
    rng = np.random.default_rng(0)
    train = [_linked_genes(60, rng) for _ in range(4)]
    expression = np.concatenate([x for x, _ in train])
    mean, std = expression.mean(0), expression.std(0)
    overrides = [
        "model.hidden_dim=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.local_neighbors=0",
        "neighbor_readout.n_neighbors=0",
        "diffusion.diffusion_steps=20",
        "sampling.steps=4",
        "training.lr=0.005",
        "training.warmup_steps=5",
    ]
    cfg = load_config(overrides=overrides)
    pl.seed_everything(0, verbose=False)
    module = AlphaSTomicsModule(cfg, N_GENES, gene_mean=mean.tolist(), gene_std=std.tolist())
    items = [DataHolder.from_arrays(x, p) for x, p in train]
    loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collate_holders)
    trainer = pl.Trainer(
        max_steps=150,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and fair to a busy machine
    try:
        trainer.fit(module, loader)
    finally:
        torch.set_num_threads(threads)
    module.eval()

    truth, positions = _linked_genes(200, rng)
    measured = np.arange(N_GENES) < N_VISIBLE
    query = DataHolder.from_arrays(np.where(measured, truth, 0.0), positions, gene_mask=measured)
    imputed = module.predictor.impute(query)[0].numpy()
    assert np.array_equal(imputed[:, measured], truth[:, measured])
    model_mse = ((imputed[:, ~measured] - truth[:, ~measured]) ** 2).mean()
    mean_mse = ((mean[~measured] - truth[:, ~measured]) ** 2).mean()
    assert model_mse < 0.5 * mean_mse, (model_mse, mean_mse)
    # from expression alone (positions carry nothing here), and as reverse-process draws
    gen = torch.Generator().manual_seed(0)
    alone = module.predictor.impute(query, use_positions=False, generator=gen)[0].numpy()
    assert ((alone[:, ~measured] - truth[:, ~measured]) ** 2).mean() < 0.5 * mean_mse
    drawn = module.predictor.impute(query, expression_estimate="sample", generator=gen)[0].numpy()
    assert np.array_equal(drawn[:, measured], truth[:, measured])
    assert ((drawn[:, ~measured] - truth[:, ~measured]) ** 2).mean() < mean_mse
    with pytest.raises(ValueError, match="measures no gene"):
        module.predictor.impute(
            DataHolder.from_arrays(truth, positions, gene_mask=np.zeros(N_GENES, bool))
        )


# ------------------------------------------------------------------------------------------
# CLI and AnnData API


@pytest.fixture(scope="module")
def checkpoint(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("impute") / "run"
    args = ["train", "--data_dir", str(tiny_store), "--output_dir", str(out), *TINY_OVERRIDES]
    args += ["training.max_epochs=1", "training.accelerator=cpu"]
    assert main(args) == 0
    return out / "checkpoints" / "last.ckpt"


def _panel(n_genes: int = 10, *, positions: bool = True) -> ad.AnnData:
    """30 cells with the first ``n_genes`` of the 16 model genes and an extra gene."""
    adata = make_tiny_adata(n_slices=1, n_cells=30, n_genes=17, seed=5)
    adata.var_names = [*(f"gene_{i}" for i in range(16)), "not_in_model"]
    panel = adata[:, [*(f"gene_{i}" for i in range(n_genes)), "not_in_model"]].copy()
    if not positions:
        del panel.obsm["ccf"]
    return panel


def test_sample_impute_writes_the_model_genes(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "panel.h5ad"
    panel = _panel()
    panel.write_h5ad(source)
    out = tmp_path / "imputed.h5ad"
    args = ["sample", "--checkpoint", checkpoint, "--input_data", source, "--output", out]
    assert main([str(a) for a in [*args, "--sample_mode", "impute"]]) == 0
    result = ad.read_h5ad(out)
    genes = [f"gene_{i}" for i in range(16)]
    assert list(result.var_names) == genes and list(result.obs_names) == list(panel.obs_names)
    flags = result.var["alphastomics_imputed"].to_numpy()
    assert flags.tolist() == [i >= 10 for i in range(16)]
    layer = result.layers["alphastomics_expression"]
    counts = panel.X[:, :11].astype(np.float64)  # normalised as preprocess does: over the file
    given = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, :10]
    assert np.allclose(layer[:, :10], given, atol=1e-4)
    assert np.isfinite(layer).all() and np.array_equal(result.X, layer)
    meta = result.uns["alphastomics"]
    assert list(meta["imputed_genes"]) == genes[10:] and meta["mode"] == "impute"
    assert list(meta["genes_not_in_model"]) == ["not_in_model"]
    assert meta["positions"] == "adata.obsm['ccf']"
    assert np.array_equal(result.obsm["ccf"], panel.obsm["ccf"])
    assert out.with_suffix(".png").is_file()


def test_impute_without_positions_says_so(checkpoint: Path, tmp_path: Path) -> None:
    from alphastomics.training.checkpoint import load_module

    module = load_module(checkpoint)
    panel = _panel(positions=False)
    result = impute_anndata(module, panel, num_samples=2, seed=3)
    assert "from expression alone" in result.uns["alphastomics"]["positions"]
    std = result.layers["alphastomics_expression_std"]
    assert (std[:, 10:] > 0).all() and np.allclose(std[:, :10], 0)
    again = impute_anndata(module, panel, num_samples=2, seed=3)
    assert np.array_equal(result.X, again.X)
    # an explicit position key must exist
    with pytest.raises(UserInputError, match="ccf"):
        impute_anndata(module, panel, keys={"position_key": "ccf"})


def test_which_checkpoints_serve_impute(caplog: pytest.LogCaptureFixture) -> None:
    from alphastomics.workflows.sampling import check_sample_request

    pos_to_expr = AlphaSTomicsModule(
        load_config(overrides=[*TINY_OVERRIDES, "training_mode=pos_to_expr"]), num_genes=4
    )
    check_sample_request(pos_to_expr, "impute", None, 1)
    expr_to_pos = AlphaSTomicsModule(
        load_config(overrides=[*TINY_OVERRIDES, "training_mode=expr_to_pos"]), num_genes=4
    )
    with pytest.raises(UserInputError, match="cannot sample impute"):
        check_sample_request(expr_to_pos, "impute", None, 1)
    untrained = AlphaSTomicsModule(
        load_config(overrides=[*TINY_OVERRIDES, "training.p_hide_genes=0"]), num_genes=4
    )
    with caplog.at_level("WARNING"):
        check_sample_request(untrained, "impute", None, 1)
    assert "training.p_hide_genes=0" in caplog.text
