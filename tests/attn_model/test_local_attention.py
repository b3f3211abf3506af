"""Local attention: the neighbour graph, masking, symmetries, and recomputation per evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from alphastomics.attn_model import local_attention, neighbors
from alphastomics.attn_model import model as model_module
from alphastomics.attn_model.local_attention import LocalAttention
from alphastomics.attn_model.local_graphs import LOCAL_GRAPH_WORDS, LOCAL_GRAPHS
from alphastomics.attn_model.model import Denoiser
from alphastomics.attn_model.neighbors import (
    EXPRESSION_AXES,
    expression_coordinates,
    knn_graph,
    nearest_neighbors,
    nearest_references,
    neighbor_index,
)
from alphastomics.attn_model.transformer import TransformerLayer
from alphastomics.config import load_config
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler
from alphastomics.workflows.train import local_attention_note

N_GENES = 8


def _net(seed: int = 0, k: int = 6, n_dims: int = 2, graph: str = "positions") -> Denoiser:
    torch.manual_seed(seed)
    net = Denoiser(
        n_genes=N_GENES,
        n_dims=n_dims,
        hidden_dim=16,
        n_layers=2,
        n_heads=2,
        n_fourier_features=4,
        local_neighbors=k,
        local_graph=graph,
    )
    return net.eval()


def _inputs(n: int, n_dims: int = 2, seed: int = 1, t_position: float = 0.3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "expression_t": torch.randn(1, n, N_GENES, generator=gen),
        "positions_t": torch.randn(1, n, n_dims, generator=gen),
        "t_expression": torch.tensor([0.5]),
        "t_position": torch.tensor([t_position]),
        "node_mask": torch.ones(1, n, dtype=torch.bool),
        "gene_mask": torch.ones(1, N_GENES, dtype=torch.bool),
    }


def _rotation(n_dims: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n_dims, n_dims, generator=torch.Generator().manual_seed(seed))
    )
    return q


def test_graph_is_the_brute_force_knn_and_never_links_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    positions = torch.randn(2, 30, 3, generator=gen)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    positions[1, 20:] = positions[1, :10] + 1e-3  # padded cells right beside real ones
    graph = knn_graph(positions, mask, 5)
    for b, n in ((0, 30), (1, 20)):
        dist = torch.cdist(positions[b, :n], positions[b, :n])
        dist.fill_diagonal_(math.inf)
        want = dist.topk(5, largest=False).indices
        assert torch.equal(graph.index[b, :n].sort(-1).values, want.sort(-1).values)
        assert graph.valid[b, :n].all()
    assert not graph.valid[1, 20:].any()
    assert (graph.index[1, :20] < 20).all()


def test_small_items_get_fewer_valid_neighbors() -> None:
    positions = torch.randn(3, 4, 2)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    graph = knn_graph(positions, mask, 6)
    assert graph.valid.sum(dim=2).tolist() == [[3, 3, 3, 3], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert torch.isfinite(graph.distance).all()


def test_graph_distances_are_rigid_motion_and_scale_invariant() -> None:
    positions = torch.randn(1, 50, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 50, dtype=torch.bool)
    moved = 7.0 * positions @ _rotation(3) + torch.tensor([3.0, -1.0, 2.0])
    a, b = knn_graph(positions, mask, 8), knn_graph(moved, mask, 8)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.distance, b.distance, atol=1e-5, rtol=1e-5)
    assert abs(float(a.distance[a.valid].mean()) - 1.0) < 1e-5  # in neighbour length scales


def test_nearest_references_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    query, reference = torch.randn(25, 2, generator=gen), torch.randn(40, 2, generator=gen)
    got = nearest_references(query, reference, 4)
    want = torch.cdist(query, reference).topk(4, largest=False).indices
    assert torch.equal(got, want)


@pytest.mark.parametrize("n_dims", [2, 3])
def test_local_block_is_rotation_invariant_and_ignores_padding(n_dims: int) -> None:
    torch.manual_seed(0)
    block = LocalAttention(16, 2, 0.0).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 24, 16, generator=gen)
    positions = torch.randn(1, 24, n_dims, generator=gen)
    mask = torch.ones(1, 24, dtype=torch.bool)
    mask[0, 18:] = False
    x[0, 18:] = 100.0  # garbage in padded states
    positions[0, 18:] = positions[0, :6]  # padded cells on top of real ones
    out = block(x, knn_graph(positions, mask, 5))
    rotated = block(x, knn_graph(positions @ _rotation(n_dims), mask, 5))
    torch.testing.assert_close(out[0, :18], rotated[0, :18], atol=1e-5, rtol=0)
    clean = block(x[:, :18], knn_graph(positions[:, :18], mask[:, :18], 5))
    torch.testing.assert_close(out[0, :18], clean[0], atol=1e-5, rtol=0)


def test_expression_coordinates_are_each_items_principal_axes_and_skip_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    expression = torch.randn(2, 40, N_GENES, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    expression[1, 30:] = 50.0  # padded rows must not move the axes
    coords = expression_coordinates(expression, mask, 3)
    assert coords.shape == (2, 40, 3) and (coords[1, 30:] == 0).all()
    alone = expression_coordinates(expression[1:, :30], mask[1:, :30], 3)
    # the same axes up to sign: the same distances between cells
    torch.testing.assert_close(
        torch.cdist(coords[1, :30], coords[1, :30]),
        torch.cdist(alone[0], alone[0]),
        atol=1e-4,
        rtol=0,
    )
    x = expression[0].double()
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    top = torch.linalg.svdvals(x)[:3].square()
    torch.testing.assert_close(coords[0].double().square().sum(0).sort(descending=True).values, top)
    assert expression_coordinates(expression, mask, 99).shape[-1] == N_GENES  # capped at G


def test_expression_coordinates_read_in_chunks_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(2)
    expression = 5 * torch.rand(1, 300, N_GENES, generator=gen)
    mask = torch.ones(1, 300, dtype=torch.bool)
    whole = expression_coordinates(expression, mask, 4)
    monkeypatch.setattr(neighbors, "_PCA_CHUNK", 7)
    torch.testing.assert_close(expression_coordinates(expression, mask, 4), whole)
    # genes left out by a gene mask read as 0, without a zeroed copy of the expression
    read = torch.arange(N_GENES).remainder(3).ne(0).unsqueeze(0)  # (1, G)
    zeroed = expression * read.unsqueeze(1)
    torch.testing.assert_close(
        expression_coordinates(expression, mask, 4, read),
        expression_coordinates(zeroed, mask, 4),
    )


def test_graph_found_in_expression_keeps_distances_of_the_positions() -> None:
    gen = torch.Generator().manual_seed(1)
    # two expression groups, scattered in space: neighbours come from the cell's own group
    groups = torch.arange(30) % 2
    expression = groups.float().unsqueeze(1) * 10 + 0.1 * torch.randn(30, N_GENES, generator=gen)
    positions = torch.randn(1, 30, 2, generator=gen)
    mask = torch.ones(1, 30, dtype=torch.bool)
    search = expression_coordinates(expression.unsqueeze(0), mask, 4)
    graph = knn_graph(positions, mask, 5, search=search)
    assert (groups[graph.index[0]] == groups.unsqueeze(1)).all()
    spatial = knn_graph(positions, mask, 5)
    assert not torch.equal(graph.index.sort(-1).values, spatial.index.sort(-1).values)
    offset = positions[0, graph.index[0]] - positions[0].unsqueeze(1)  # (30, 5, 2)
    ratio = offset.norm(dim=-1) / graph.distance[0]
    torch.testing.assert_close(ratio, ratio[0, 0].expand_as(ratio))  # one scale for the item


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, note: Callable[..., object]) -> list:
    """A list that gets ``note(*args)`` at every call the denoiser makes to its ``name``."""
    seen: list = []
    real = getattr(model_module, name)

    def spy(*args: torch.Tensor | int):
        seen.append(note(*args))
        return real(*args)

    monkeypatch.setattr(model_module, name, spy)
    return seen


def _record_graphs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of (positions, index) of every neighbour graph the denoiser builds."""
    return _spy(
        monkeypatch, "graph_at", lambda positions, index, _: (positions.clone(), index.clone())
    )


def test_cleaner_graph_reads_expression_in_expr_to_pos_and_positions_in_pos_to_expr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graphs = _record_graphs(monkeypatch)
    net = _net(graph="cleaner")
    inputs = _inputs(25)
    both = {
        **inputs,
        **{key: inputs[key].expand(2, *inputs[key].shape[1:]) for key in inputs},
        "positions_t": torch.cat([inputs["positions_t"], inputs["positions_t"].flip(1)]),
        "t_expression": torch.tensor([0.0, 0.7]),
        "t_position": torch.tensor([0.6, 0.0]),
    }
    net(**both)
    _, index = graphs[-1]
    mask = inputs["node_mask"]
    axes = expression_coordinates(inputs["expression_t"], mask, EXPRESSION_AXES)
    by_expression = knn_graph(inputs["positions_t"], mask, 6, search=axes).index[0]
    by_positions = knn_graph(both["positions_t"][1:], mask, 6).index[0]
    assert not torch.equal(by_expression.sort(-1).values, by_positions.sort(-1).values)
    assert torch.equal(index[0], by_expression)  # expr_to_pos: the cells of similar expression
    assert torch.equal(index[1], by_positions)  # pos_to_expr: the nearest cells where they lie


@pytest.mark.parametrize("graph", ["positions", "expression", "cleaner"])
def test_denoiser_with_local_attention_ignores_padding_beside_real_cells(graph: str) -> None:
    net = _net(graph=graph)
    inputs = _inputs(20)
    extra = 6
    padded = dict(inputs)
    padded["expression_t"] = torch.cat(
        [inputs["expression_t"], 30 * torch.randn(1, extra, N_GENES)], 1
    )
    padded["positions_t"] = torch.cat([inputs["positions_t"], inputs["positions_t"][:, :extra]], 1)
    padded["node_mask"] = torch.cat(
        [inputs["node_mask"], torch.zeros(1, extra, dtype=torch.bool)], 1
    )
    out, out_padded = net(**inputs), net(**padded)
    torch.testing.assert_close(out.expression, out_padded.expression[:, :20], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.positions, out_padded.positions[:, :20], atol=1e-5, rtol=0)
    assert (out_padded.positions[:, 20:] == 0).all()


@pytest.mark.parametrize("graph", ["positions", "expression", "cleaner"])
def test_denoiser_with_local_attention_is_permutation_equivariant(graph: str) -> None:
    net = _net(graph=graph)
    inputs = _inputs(40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    permuted = {**inputs, **{k: inputs[k][:, perm] for k in ("expression_t", "positions_t")}}
    out, out_perm = net(**inputs), net(**permuted)
    torch.testing.assert_close(out.expression[:, perm], out_perm.expression, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.positions[:, perm], out_perm.positions, atol=1e-5, rtol=0)


def test_neighbor_displacement_rotates_with_the_positions() -> None:
    # the displacement along neighbour offsets is equivariant: rotating the noisy positions
    # rotates it (the rest of the position head sees the axes, so test the block itself)
    net = _net(n_dims=3)
    inputs = _inputs(30, n_dims=3)
    positions = inputs["positions_t"]
    h = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(6))
    mask = inputs["node_mask"]
    rot = _rotation(3, seed=1)
    assert net.displacement is not None
    shift = net.displacement(h, positions, knn_graph(positions, mask, 6))
    shift_rot = net.displacement(h, positions @ rot, knn_graph(positions @ rot, mask, 6))
    torch.testing.assert_close(shift @ rot, shift_rot, atol=1e-5, rtol=0)
    assert shift.abs().max() > 0


def test_a_cell_reads_exactly_its_current_neighbors() -> None:
    torch.manual_seed(0)
    block = LocalAttention(16, 2, 0.0).eval()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 30, 16, generator=gen)
    positions = torch.randn(1, 30, 2, generator=gen)
    mask = torch.ones(1, 30, dtype=torch.bool)

    def cell0_change(pos: torch.Tensor, cell: int) -> float:
        graph = knn_graph(pos, mask, 4)
        bumped = x.clone()
        bumped[0, cell] += 5.0
        return float((block(x, graph)[0, 0] - block(bumped, graph)[0, 0]).abs().max())

    neighbors = set(knn_graph(positions, mask, 4).index[0, 0].tolist())
    far = next(i for i in range(1, 30) if i not in neighbors)
    assert cell0_change(positions, far) == 0.0
    assert cell0_change(positions, min(neighbors)) > 1e-3
    moved = positions.clone()
    moved[0, far] = positions[0, 0] + 1e-3  # now the nearest cell of cell 0
    assert cell0_change(moved, far) > 1e-3


def _place(net: Denoiser, inputs: dict) -> None:
    """A 6-step ``expr_to_pos`` sample of ``inputs`` with ``net`` (seed 0)."""
    sampler = DiffusionSampler(net, NoiseModel(diffusion_steps=50), steps=6)
    sampler.sample(
        inputs["expression_t"],
        inputs["positions_t"],
        inputs["node_mask"],
        "expr_to_pos",
        generator=torch.Generator().manual_seed(0),
    )


def test_neighbors_are_recomputed_at_every_network_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graphs = _record_graphs(monkeypatch)
    net = _net()
    inputs = _inputs(25)
    _place(net, inputs)
    assert len(graphs) == 6
    assert all(not torch.equal(a[0], b[0]) for a, b in itertools.pairwise(graphs))


def test_recomputed_neighbors_in_backward_give_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _net().train()
    inputs = _inputs(60)

    def grads() -> list[torch.Tensor]:
        net.zero_grad()
        out = net(**inputs)
        (out.expression.square().sum() + out.positions.square().sum()).backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    monkeypatch.setattr(local_attention, "_CHECKPOINT_CELLS", 10)
    recomputed = grads()
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_local_attention_costs_memory_linear_in_cells() -> None:
    # the graph holds k entries per cell and no N x N tensor is built at 20,000 cells
    positions = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 20_000, 2))).float()
    graph = knn_graph(positions, torch.ones(1, 20_000, dtype=torch.bool), 8)
    assert graph.index.shape == (1, 20_000, 8)
    out = LocalAttention(16, 2, 0.0)(torch.randn(1, 20_000, 16), graph)
    assert out.shape == (1, 20_000, 16) and torch.isfinite(out).all()


def test_attention_blocks_keep_their_parameter_names_shapes_and_order() -> None:
    """Checkpoints (keys) and optimiser states (parameter order) saved earlier still load."""
    layer = TransformerLayer(16, 2, 2, 0.0, 1e-5, local_attention=True)
    attention = [
        (name, tuple(p.shape))
        for name, p in layer.named_parameters()
        if name.startswith(("attention.", "local."))
    ]
    assert attention == [
        ("attention.qkv.weight", (48, 16)),
        ("attention.qkv.bias", (48,)),
        ("attention.out.weight", (16, 16)),
        ("attention.out.bias", (16,)),
        ("local.qkv.weight", (48, 16)),
        ("local.qkv.bias", (48,)),
        ("local.distance_bias.0.weight", (32, 16)),
        ("local.distance_bias.0.bias", (32,)),
        ("local.distance_bias.2.weight", (2, 32)),
        ("local.distance_value.weight", (16, 32)),
        ("local.distance_value.bias", (16,)),
        ("local.out.weight", (16, 16)),
        ("local.out.bias", (16,)),
    ]
    assert list(layer.state_dict()) == [name for name, _ in layer.named_parameters()]


def test_the_train_log_says_which_cells_each_cell_reads() -> None:
    assert "global attention only" in local_attention_note(0, "cleaner")
    note = local_attention_note(16, "cleaner")
    assert "16 cells per cell" in note and "expression in expr_to_pos" in note
    assert "current positions" in local_attention_note(8, "positions")


@pytest.mark.parametrize("graph", LOCAL_GRAPHS)
def test_every_local_graph_is_accepted_by_the_config_the_network_and_the_log(graph: str) -> None:
    cfg = load_config(overrides=[f"model.local_graph={graph}", "model.local_neighbors=4"])
    net = Denoiser(n_genes=N_GENES, n_dims=2, **dataclasses.asdict(cfg.model))
    assert net.local_graph == graph
    assert LOCAL_GRAPH_WORDS[graph] in local_attention_note(4, graph)
    assert set(LOCAL_GRAPH_WORDS) == set(LOCAL_GRAPHS)


def test_large_items_search_expression_approximately(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    search = torch.randn(1, 400, 6, generator=gen)
    positions = torch.randn(1, 400, 2, generator=gen)
    mask = torch.ones(1, 400, dtype=torch.bool)
    exact = knn_graph(positions, mask, 8, search=search)
    monkeypatch.setattr(neighbors, "_EXACT_SEARCH_CELLS", 100)
    approximate = knn_graph(positions, mask, 8, search=search)
    assert approximate.valid.all() and (approximate.index != torch.arange(400).view(1, -1, 1)).all()
    kept = [
        len(set(a.tolist()) & set(b.tolist())) / 8
        for a, b in zip(exact.index[0], approximate.index[0], strict=True)
    ]
    assert 0.5 < np.mean(kept) < 1.0  # mostly the same cells, not all: the search did change
    dist = torch.cdist(positions[0], positions[0]).fill_diagonal_(math.inf)
    spatial = knn_graph(positions, mask, 8).index[0].sort(-1).values  # positions: still exact
    assert torch.equal(spatial, dist.topk(8, largest=False).indices.sort(-1).values)


@pytest.mark.parametrize("rows", [7, 512])
def test_brute_force_search_is_exact_in_blocks_and_never_returns_the_cell_itself(
    monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    monkeypatch.setattr(neighbors, "_BRUTE_FORCE_ROWS", rows)  # 7: many blocks, a ragged last
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    points[1] = points[0]  # two cells at one location: each is the other's nearest
    found = nearest_neighbors(points, 6, brute_force=True)
    dist = torch.cdist(points.double(), points.double()).fill_diagonal_(math.inf)
    assert torch.equal(found[2:], dist.topk(6, largest=False).indices[2:])  # nearest first
    assert found[0, 0] == 1 and found[1, 0] == 0
    assert (found != torch.arange(300).view(-1, 1)).all()
    assert nearest_neighbors(points[:4], 10, brute_force=True).shape == (4, 3)  # capped at n - 1
    mask = torch.ones(1, 300, dtype=torch.bool)
    index, valid = neighbor_index(points.unsqueeze(0), mask, 6, high_dimensional=True)
    assert valid.all() and torch.equal(index[0], found)


def _count_expression_searches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every computation of the expression axes by the denoiser."""
    return _spy(monkeypatch, "expression_neighbor_index", lambda *_: 1)


def test_expr_to_pos_searches_the_constant_expression_once_and_measures_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_expression_searches(monkeypatch)
    graphs = _record_graphs(monkeypatch)
    net = _net(graph="cleaner")
    inputs = _inputs(30)
    with torch.no_grad():
        _place(net, inputs)
    assert len(calls) == 1 and len(graphs) == 6
    assert all(not torch.equal(a[0], b[0]) for a, b in itertools.pairwise(graphs))
    mask = inputs["node_mask"]
    search = expression_coordinates(inputs["expression_t"], mask, EXPRESSION_AXES)
    fresh = knn_graph(graphs[-1][0], mask, 6, search=search)
    assert torch.equal(fresh.index, graphs[-1][1])


def test_the_expression_search_is_kept_only_within_constant_expression(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_expression_searches(monkeypatch)
    net = _net(graph="cleaner")
    inputs = {**_inputs(30), "t_expression": torch.tensor([0.0])}
    with torch.no_grad():
        first = net(**inputs)
        net(**inputs)
        assert len(calls) == 2  # outside the block: searched at every evaluation
        with net.constant_expression():
            within = net(**inputs)
            moved = net(**{**inputs, "positions_t": inputs["positions_t"] * 2 + 1})
            assert len(calls) == 3
            # pos_to_expr items search positions: nothing read from the kept search
            net(
                **{**inputs, "t_expression": torch.tensor([0.5]), "t_position": torch.tensor([0.0])}
            )
            assert len(calls) == 3
        net(**inputs)
        assert len(calls) == 4 and net._expression_search is None
    torch.testing.assert_close(first.positions, within.positions)
    assert not torch.allclose(moved.positions, within.positions)
