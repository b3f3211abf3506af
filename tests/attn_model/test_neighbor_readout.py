import numpy as np
import pytest
import torch
from conftest import small_slice
from sklearn.neighbors import NearestNeighbors

from alphastomics.attn_model.neighbor_readout import (
    NeighborReadout,
    nearest_references,
    readout_split,
)
from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder, collate_holders
from alphastomics.errors import UserInputError
from alphastomics.training.checkpoint import load_module
from alphastomics.training.module import AlphaSTomicsModule

SMALL = ["model.hidden_dim=32", "model.n_layers=1", "diffusion.diffusion_steps=50"]


def test_nearest_references_match_sklearn_across_query_blocks():
    rng = np.random.default_rng(0)
    reference, query = rng.normal(size=(300, 3)), rng.normal(size=(2500, 3))  # > one block
    want = NearestNeighbors(n_neighbors=7).fit(reference).kneighbors(query)[1]
    got = nearest_references(torch.tensor(query), torch.tensor(reference), 7).numpy()
    assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
    assert nearest_references(torch.tensor(query[:3]), torch.tensor(reference[:2]), 7).shape == (
        3,
        2,
    )


def test_readout_split_hides_bands_and_random_cells():
    positions = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    hidden_shares = []
    for _ in range(200):
        queries, references = readout_split(positions, max_queries=50, generator=generator)
        assert 1 <= queries.numel() <= 50 and references.numel() >= 1
        assert not set(queries.tolist()) & set(references.tolist())
        hidden_shares.append(1 - references.numel() / 200)
    shares = np.array(hidden_shares)
    assert shares.min() >= 0.04 and shares.max() <= 0.75  # 60 % of 200 cells, drawn
    assert (shares < 0.1).any() and (shares > 0.4).any()  # small bands and large random shares


def test_readout_split_band_is_a_contiguous_strip():
    # with 1-D positions every direction projects onto the same line: a band is an interval
    positions = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    generator = torch.Generator().manual_seed(3)
    bands = 0
    for _ in range(50):
        queries, _ = readout_split(positions, max_queries=1000, generator=generator)
        hidden = sorted(queries.tolist())
        if hidden == list(range(hidden[0], hidden[-1] + 1)) and len(hidden) >= 5:
            bands += 1
    assert bands >= 15


def test_readout_is_a_local_translation_invariant_weighted_average():
    torch.manual_seed(0)
    readout = NeighborReadout(n_genes=4, n_dims=3, n_neighbors=5)
    nn_init = torch.nn.init
    for layer in readout.offset_mlp:
        if isinstance(layer, torch.nn.Linear):
            nn_init.normal_(layer.weight)
    query, reference = torch.randn(6, 3), torch.randn(30, 3)
    constant = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(30, 4)
    assert torch.allclose(readout(query, reference, constant), constant[:6], atol=1e-5)
    expression = torch.randn(30, 4)
    out = readout(query, reference, expression)
    assert torch.allclose(readout(query + 7.0, reference + 7.0, expression), out, atol=1e-4)
    # a reference that is no query's neighbour does not matter
    used = set(nearest_references(query, reference, 5).flatten().tolist())
    far = next(i for i in range(30) if i not in used)
    changed = expression.clone()
    changed[far] += 100.0
    assert torch.allclose(readout(query, reference, changed), out)
    lo, hi = expression.min(dim=0).values, expression.max(dim=0).values
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())  # convex combination


def test_readout_learns_to_interpolate_across_a_gap_better_than_the_knn_average():
    """A field linear in x with a hidden strip: the uniform kNN average copies the nearer
    side, the trained read-out weights both sides and lands closer to the truth."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    grid = rng.uniform(-1, 1, size=(600, 2))
    positions = torch.tensor(np.c_[grid, np.zeros(600)], dtype=torch.float32)
    expression = torch.stack([positions[:, 0], -2 * positions[:, 0]], dim=1)  # (600, 2)
    readout = NeighborReadout(n_genes=2, n_dims=3, n_neighbors=16)
    optimizer = torch.optim.Adam(readout.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        queries, references = readout_split(positions, 256, generator)
        predicted = readout(positions[queries], positions[references], expression[references])
        loss = (predicted - expression[queries]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gap = (positions[:, 0] > -0.15) & (positions[:, 0] < 0.15)
    query, reference = positions[gap], positions[~gap]
    with torch.no_grad():
        learned = readout(query, reference, expression[~gap])
    index = nearest_references(query, reference, 16)
    uniform = expression[~gap][index].mean(dim=1)
    truth = expression[gap]
    learned_mse = (learned - truth).square().mean().item()
    uniform_mse = (uniform - truth).square().mean().item()
    assert learned_mse < 0.5 * uniform_mse


def _module(expr, overrides=()):
    cfg = load_config(overrides=[*SMALL, *overrides])
    return AlphaSTomicsModule(
        cfg, expr.shape[1], gene_mean=expr.mean(0).tolist(), gene_std=(expr.std(0) + 1e-3).tolist()
    )


def test_training_loss_has_a_neighbor_term_and_every_parameter_learns():
    expr, pos = small_slice(120, 8)
    module = _module(expr)
    batch = module.on_after_batch_transfer(DataHolder.from_arrays(expr, pos), 0)
    result = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    assert set(result.terms) >= {"expression_mse", "neighbor_mse"}
    assert torch.isclose(result.total, sum(result.terms.values()))
    result.total.backward()
    assert all(p.grad is not None for p in module.parameters())
    readout_grads = [p.grad.abs().sum() for p in module.neighbor_readout.parameters()]
    assert all(float(g) > 0 for g in readout_grads)
    module.trainer = None
    optimized = {
        id(p)
        for group in module.configure_optimizers()["optimizer"].param_groups
        for p in group["params"]
    }
    assert optimized == {id(p) for p in module.parameters()}  # the read-out is trained too


def test_imputation_keeps_known_cells_and_fills_the_rest():
    expr, pos = small_slice(120, 8)
    module = _module(expr).eval()
    holder = DataHolder.from_arrays(expr, pos)
    known = torch.zeros(1, 120, dtype=torch.bool)
    known[0, :80] = True
    out, positions = module.predictor.sample(
        holder, "pos_to_expr", known=known, expression_estimate="mean"
    )
    assert torch.allclose(out[0, :80], torch.from_numpy(expr[:80]), atol=1e-5)
    assert torch.isfinite(out).all() and not torch.allclose(out[0, 80:], out[0, 79])
    assert torch.allclose(positions.mean(dim=1), torch.zeros(1, 3), atol=1e-5)
    # genes the item did not measure come from the conditional mean, in every cell
    gene_mask = np.ones(8, dtype=bool)
    gene_mask[[2, 5]] = False
    partial = DataHolder.from_arrays(expr, pos, gene_mask=gene_mask)
    generator = torch.Generator().manual_seed(0)
    out, _ = module.predictor.sample(
        partial, "pos_to_expr", known=known, expression_estimate="mean", generator=generator
    )
    mean, _ = module.predictor.sample(
        partial,
        "pos_to_expr",
        expression_estimate="mean",
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.allclose(out[0, :, [2, 5]], mean[0, :, [2, 5]], atol=1e-5)
    assert torch.allclose(
        out[0, :80][:, gene_mask], torch.from_numpy(expr[:80][:, gene_mask]), atol=1e-5
    )
    with pytest.raises(ValueError, match="known marks no real cell"):
        module.predictor.impute_from_neighbors(holder, torch.zeros(1, 120, dtype=torch.bool))


def test_models_without_a_readout():
    expr, pos = small_slice(60, 8)
    assert _module(expr, ["training_mode=expr_to_pos"]).neighbor_readout is None
    off = _module(expr, ["neighbor_readout.n_neighbors=0"])
    assert off.neighbor_readout is None
    with pytest.raises(ValueError, match="no neighbour read-out"):
        off.predictor.impute_from_neighbors(
            DataHolder.from_arrays(expr, pos), torch.ones(1, 60, dtype=torch.bool)
        )
    # a checkpoint saved before the read-out existed: its config has no such section
    saved = off.hparams["cfg"]
    saved.pop("neighbor_readout")
    assert AlphaSTomicsModule(saved, 8).neighbor_readout is None


def test_a_checkpoint_from_before_the_readout_loads_and_samples(tmp_path):
    expr, pos = small_slice(60, 8)
    old = _module(expr, ["neighbor_readout.n_neighbors=0"])
    hparams = dict(old.hparams)
    hparams["cfg"] = {k: v for k, v in hparams["cfg"].items() if k != "neighbor_readout"}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": old.state_dict()}, path)
    loaded = load_module(path)
    assert loaded.neighbor_readout is None and loaded.cfg.neighbor_readout.n_neighbors == 0
    known = torch.zeros(1, 60, dtype=torch.bool)
    known[0, :40] = True
    out, _ = loaded.predictor.sample(
        DataHolder.from_arrays(expr, pos),
        "pos_to_expr",
        known=known,
        steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out).all()  # inpainting, as before the read-out
    with pytest.raises(UserInputError, match=r"neighbor_readout\.loss_weight"):
        load_config(overrides=["neighbor_readout.loss_weight=0"])


def test_readout_loss_over_a_padded_batch_never_reads_padding():
    expr, pos = small_slice(120, 8)
    module = _module(expr)
    gene_mask = np.ones(8, dtype=bool)
    gene_mask[3] = False  # the second item did not measure gene 3
    items = [
        DataHolder.from_arrays(expr[:70], pos[:70]),
        DataHolder.from_arrays(expr[70:], pos[70:], gene_mask=gene_mask),
    ]
    batch = module.on_after_batch_transfer(collate_holders(items), 0)
    padded = ~batch.node_mask.unsqueeze(-1)  # (B, N, 1): 20 padded rows in item 0
    garbage = batch.replace(
        expression=torch.where(padded, torch.full_like(batch.expression, 1e6), batch.expression),
        positions=torch.where(padded, torch.full_like(batch.positions, -1e3), batch.positions),
    )
    clean = module.neighbor_readout_loss(batch, torch.Generator().manual_seed(4))
    noisy = module.neighbor_readout_loss(garbage, torch.Generator().manual_seed(4))
    assert torch.isfinite(clean) and torch.equal(clean, noisy)
    # an unmeasured gene's (zero) values are not scored: changing them changes nothing
    unmeasured = batch.expression.clone()
    unmeasured[1, :, 3] = 5.0
    changed = module.neighbor_readout_loss(
        batch.replace(expression=unmeasured), torch.Generator().manual_seed(4)
    )
    scored = module.neighbor_readout_loss(batch, torch.Generator().manual_seed(4))
    assert torch.isfinite(scored) and torch.equal(changed, scored)
