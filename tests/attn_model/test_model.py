"""Contract of the Denoiser: shapes, masking, symmetries, gradients, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alphastomics.attn_model.model import Denoiser, DenoiserOutput
from alphastomics.attn_model.self_attention import masked_linear_attention
from alphastomics.config import ModelConfig
from alphastomics.data.batch import masked_mean

N_GENES = 12
FIELDS = ("expression", "positions", "hidden", "expression_embedding", "position_embedding")
ATOL = 1e-5


def make_model(n_dims: int, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(
        n_genes=N_GENES, n_dims=n_dims, hidden_dim=16, n_layers=2, n_heads=2, n_fourier_features=4
    )
    return model.eval()


def make_inputs(
    n_dims: int, n_real: tuple[int, ...] = (9, 6), n_cells: int = 11, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Padded batch whose padded rows hold garbage, not zeros."""
    gen = torch.Generator().manual_seed(seed)
    b = len(n_real)
    node_mask = torch.arange(n_cells).expand(b, n_cells) < torch.tensor(n_real).unsqueeze(1)
    gene_mask = torch.ones(b, N_GENES, dtype=torch.bool)
    gene_mask[0, :3] = False
    return {
        "expression_t": torch.randn(b, n_cells, N_GENES, generator=gen),
        "positions_t": torch.randn(b, n_cells, n_dims, generator=gen),
        "t_expression": torch.rand(b, generator=gen),
        "t_position": torch.rand(b, generator=gen),
        "node_mask": node_mask,
        "gene_mask": gene_mask,
    }


def assert_same(a: DenoiserOutput, b: DenoiserOutput, rows: slice | None = None) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if rows is not None:
            x, y = x[:, rows], y[:, rows]
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=name)


def test_builds_from_model_config() -> None:
    model = Denoiser(n_genes=N_GENES, n_dims=3, **dataclasses.asdict(ModelConfig()))
    assert model.position_encoder.fourier_weight.shape == (3, ModelConfig().n_fourier_features)
    assert "position_encoder.fourier_weight" in model.state_dict()


@pytest.mark.parametrize("n_dims", [2, 3])
def test_shapes_and_padded_rows_zero(n_dims: int) -> None:
    inputs = make_inputs(n_dims)
    out = make_model(n_dims)(**inputs)
    b, n = inputs["node_mask"].shape
    assert out.expression.shape == (b, n, N_GENES)
    assert out.positions.shape == (b, n, n_dims)
    for name in ("hidden", "expression_embedding", "position_embedding"):
        assert getattr(out, name).shape == (b, n, 16)
    padded = ~inputs["node_mask"]
    for name in FIELDS:
        value = getattr(out, name)
        assert torch.isfinite(value).all(), name
        assert (value[padded] == 0).all(), name


def test_wrong_shape_names_the_input() -> None:
    inputs = make_inputs(3)
    inputs["positions_t"] = inputs["positions_t"][..., :2]
    with pytest.raises(ValueError, match="positions_t"):
        make_model(3)(**inputs)


@pytest.mark.parametrize("n_dims", [2, 3])
def test_padding_invariance(n_dims: int) -> None:
    model = make_model(n_dims)
    inputs = make_inputs(n_dims, n_real=(9,), n_cells=9)
    extra = 7
    padded = {
        "expression_t": torch.cat([inputs["expression_t"], 50 * torch.randn(1, extra, N_GENES)], 1),
        "positions_t": torch.cat([inputs["positions_t"], 50 * torch.randn(1, extra, n_dims)], 1),
        "node_mask": torch.cat([inputs["node_mask"], torch.zeros(1, extra, dtype=torch.bool)], 1),
    }
    assert_same(model(**inputs), model(**{**inputs, **padded}), rows=slice(0, 9))


@pytest.mark.parametrize("n_dims", [2, 3])
def test_permutation_equivariance(n_dims: int) -> None:
    model = make_model(n_dims)
    inputs = make_inputs(n_dims)
    perm = torch.randperm(inputs["node_mask"].shape[1], generator=torch.Generator().manual_seed(3))
    permuted = {key: inputs[key][:, perm] for key in ("expression_t", "positions_t", "node_mask")}
    out = model(**inputs)
    out_perm = model(**{**inputs, **permuted})
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(out, name)[:, perm], getattr(out_perm, name), atol=ATOL, rtol=0, msg=name
        )


@pytest.mark.parametrize("n_dims", [2, 3])
def test_translation_invariance_and_centred_output(n_dims: int) -> None:
    model = make_model(n_dims)
    inputs = make_inputs(n_dims)
    shift = torch.tensor([[3.0, -2.0, 5.0][:n_dims], [-1.0, 4.0, 0.5][:n_dims]]).unsqueeze(1)
    out = model(**inputs)
    out_shifted = model(**{**inputs, "positions_t": inputs["positions_t"] + shift})
    assert_same(out, out_shifted)
    centroid = masked_mean(out.positions, inputs["node_mask"])  # (B, D)
    torch.testing.assert_close(centroid, torch.zeros_like(centroid), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_dims", [2, 3])
def test_clean_positions_are_read_in_their_frame(n_dims: int) -> None:
    # pos_to_expr: a part of a slice must be read where it lies, so a shift changes the output
    # of an item whose positions are clean and of no other item
    model = make_model(n_dims)
    inputs = make_inputs(n_dims)
    inputs["t_position"] = torch.tensor([0.0, 0.5])  # item 0 clean, item 1 noisy
    shift = torch.tensor([2.0, -1.0, 0.5][:n_dims])
    out = model(**inputs)
    out_shifted = model(**{**inputs, "positions_t": inputs["positions_t"] + shift})
    real = inputs["node_mask"][0]
    change = (out.expression[0, real] - out_shifted.expression[0, real]).abs().max()
    assert change > 1e-3
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(out, name)[1], getattr(out_shifted, name)[1], atol=ATOL, rtol=0, msg=name
        )


@pytest.mark.parametrize("n_dims", [2, 3])
def test_every_parameter_gets_a_gradient(n_dims: int) -> None:
    model = make_model(n_dims).train()
    inputs = make_inputs(n_dims)
    out = model(**inputs)
    gen = torch.Generator().manual_seed(5)
    loss = sum(
        (getattr(out, name) * torch.randn(getattr(out, name).shape, generator=gen)).sum()
        for name in FIELDS
    )
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    zero = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"


@pytest.mark.parametrize("n_dims", [2, 3])
def test_unmeasured_gene_is_not_read(n_dims: int) -> None:
    model = make_model(n_dims)
    inputs = make_inputs(n_dims)
    changed = inputs["expression_t"].clone()
    changed[0, :, :3] += 10.0  # genes 0-2 are unmeasured in item 0
    assert_same(model(**inputs), model(**{**inputs, "expression_t": changed}))


@pytest.mark.parametrize("n_dims", [2, 3])
def test_deterministic_with_fixed_seed(n_dims: int) -> None:
    inputs = make_inputs(n_dims)
    first, second = make_model(n_dims, seed=7), make_model(n_dims, seed=7)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    out_a, out_b = first(**inputs), second(**inputs)
    for name in FIELDS:
        assert torch.equal(getattr(out_a, name), getattr(out_b, name)), name


@pytest.mark.parametrize("n_dims", [2, 3])
def test_batch_items_are_independent(n_dims: int) -> None:
    model = make_model(n_dims)
    inputs = make_inputs(n_dims)
    other = make_inputs(n_dims, seed=9)
    changed = {key: value.clone() for key, value in inputs.items()}
    for key in ("expression_t", "positions_t", "t_expression", "t_position"):
        changed[key][1] = other[key][1]
    changed["node_mask"][1] = torch.arange(changed["node_mask"].shape[1]) < 3
    out, out_changed = model(**inputs), model(**changed)
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(out, name)[0], getattr(out_changed, name)[0], atol=ATOL, rtol=0, msg=name
        )


def test_item_without_cells_gives_zeros_and_finite_gradients() -> None:
    inputs = make_inputs(3, n_real=(5, 0))
    inputs["positions_t"].requires_grad_(True)
    model = make_model(3)
    out = model(**inputs)
    for name in FIELDS:
        value = getattr(out, name)
        assert torch.isfinite(value).all(), name
        assert (value[1] == 0).all(), name
    (out.expression.sum() + out.positions.square().sum()).backward()
    assert torch.isfinite(inputs["positions_t"].grad).all()
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name


def test_bfloat16_autocast_is_finite() -> None:
    inputs = make_inputs(3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = make_model(3)(**inputs)
    assert torch.isfinite(out.positions).all()
    assert torch.isfinite(out.expression).all()


def test_attention_matches_dense_reference_with_large_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    b, k, n, d = 2, 2, 30, 4
    q, key, v = (torch.randn(b, k, n, d, generator=gen) for _ in range(3))
    key = key * 500.0  # exp would overflow without the max subtraction
    mask = torch.arange(n).expand(b, n) < torch.tensor([[30], [17]])
    out = masked_linear_attention(q, key, v, mask)
    assert torch.isfinite(out).all()
    for i, n_real in enumerate((30, 17)):
        q_i, k_i, v_i = (x[i, :, :n_real].double() for x in (q, key, v))
        weights = q_i.softmax(-1) @ k_i.softmax(-2).transpose(-1, -2)  # (K, n, n) dense reference
        torch.testing.assert_close(out[i, :, :n_real].double(), weights @ v_i, atol=1e-5, rtol=1e-5)
