"""The observation model: measured values for generated cells, drawn near their state."""

from __future__ import annotations

import numpy as np
import pytest

from alphastomics.data.store import ProcessedStore
from alphastomics.diffusion_model import observation
from alphastomics.diffusion_model.observation import ObservationModel


def two_types(n: int = 200, n_genes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(2n, G) sparse measured cells of two types (type A expresses the first half of the
    genes, type B the second) and (2n,) their type."""
    rng = np.random.default_rng(seed)
    half = n_genes // 2
    cells = np.zeros((2 * n, n_genes), np.float32)
    detected = rng.random(cells.shape) < 0.4
    values = rng.gamma(2.0, 1.0, cells.shape).astype(np.float32)
    cells[:n, :half] = np.where(detected[:n, :half], 2.0 + values[:n, :half], 0.0)
    cells[n:, half:] = np.where(detected[n:, half:], 2.0 + values[n:, half:], 0.0)
    return cells, np.repeat([0, 1], n)


def test_each_gene_is_a_measured_value_of_a_cell_near_the_state():
    cells, kind = two_types()
    model = ObservationModel(cells, np.ones_like(cells, bool))
    state_a = cells[kind == 0].mean(0)
    draws = model.draw(np.repeat(state_a[None], 300, axis=0), seed=1)
    for g in range(cells.shape[1]):
        # every value is type A's measurement of that gene, never type B's
        assert np.isin(draws[:, g], cells[kind == 0, g]).all()
    half = cells.shape[1] // 2
    assert (draws[:, half:] == 0).all()  # type A never expresses type B's genes
    # its own genes are drawn with the exact zeros of measurements, which the state lacks
    assert (state_a[:half] > 0).all() and 0.2 < (draws[:, :half] > 0).mean() < 0.8


def test_genes_are_drawn_independently_not_as_copies_of_cells():
    cells, kind = two_types(n_genes=40)
    model = ObservationModel(cells, np.ones_like(cells, bool))
    draws = model.draw(np.repeat(cells[kind == 0].mean(0)[None], 200, axis=0), seed=2)
    copies = (draws[:, None, :] == cells[None, :, :]).all(-1).any(-1)
    assert not copies.any()
    # the states are all the same cell; the draws vary gene by gene like measurements
    assert (draws.std(0)[:5] > 0.5).all()


def test_a_gene_the_neighbours_did_not_measure_keeps_the_state():
    cells, _ = two_types()
    mask = np.ones_like(cells, bool)
    mask[:, 3] = False
    model = ObservationModel(cells, mask)
    states = cells[:20] + 0.25
    draws = model.draw(states, seed=0)
    np.testing.assert_array_equal(draws[:, 3], states[:, 3])
    assert not np.isin(draws[:, 0], states[:, 0]).any()


def test_draws_follow_the_seed_and_the_state_round_trips():
    cells, _ = two_types()
    model = ObservationModel(cells, np.ones_like(cells, bool))
    states = cells[::7]
    np.testing.assert_array_equal(model.draw(states, seed=3), model.draw(states, seed=3))
    assert not np.array_equal(model.draw(states, seed=3), model.draw(states, seed=4))
    again = ObservationModel.from_state(model.state())
    np.testing.assert_array_equal(again.expression, model.expression)
    np.testing.assert_array_equal(again.gene_mask, model.gene_mask)
    np.testing.assert_array_equal(again.draw(states, seed=3), model.draw(states, seed=3))
    assert ObservationModel.from_state(None) is None
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        model.draw(states[:, :4])


def test_from_slices_keeps_the_given_cells_and_caps_them(tiny_store, monkeypatch):
    store = ProcessedStore(tiny_store)
    train = [store.load_slice(i) for i in store.slice_indices("train")]
    slices = [(part.expression, part.gene_mask) for part in train]
    train_cells = np.concatenate([np.asarray(part.expression) for part in train])
    model = ObservationModel.from_slices(slices)
    assert model.n_cells == len(train_cells)
    np.testing.assert_array_equal(np.sort(model.expression, 0), np.sort(train_cells, 0))
    monkeypatch.setattr(observation, "MAX_CELLS", 30)
    capped = ObservationModel.from_slices(slices, seed=1)
    assert capped.n_cells == 30
    rows = (capped.expression[:, None, :] == train_cells[None]).all(-1)
    assert rows.any(1).all()  # each kept cell is a given cell
    monkeypatch.setattr(observation, "MAX_VALUES", 20 * train_cells.shape[1])
    assert ObservationModel.from_slices(slices).n_cells == 20
    assert ObservationModel.from_slices([]) is None


def test_positions_of_one_frame_make_an_atlas_only_when_every_cell_is_kept(tiny_store, monkeypatch):
    store = ProcessedStore(tiny_store)
    train = [store.load_slice(i) for i in store.slice_indices("train")]
    slices = [(part.expression, part.gene_mask) for part in train]
    positions = [part.positions for part in train]
    assert not ObservationModel.from_slices(slices).atlas  # no positions: several frames
    model = ObservationModel.from_slices(slices, positions=positions)
    assert model.atlas and model.n_training_cells == model.n_cells
    rows = np.concatenate([np.asarray(part.expression) for part in train])
    where = np.concatenate([np.asarray(part.positions) for part in train])
    for expression, position in zip(model.expression, model.positions, strict=True):
        match = (rows == expression).all(axis=1)  # each kept cell keeps its own position
        assert (where[match] == position).all(axis=1).any()
    again = ObservationModel.from_state(model.state())
    np.testing.assert_array_equal(again.positions, model.positions)
    assert again.atlas
    monkeypatch.setattr(observation, "MAX_CELLS", 30)
    capped = ObservationModel.from_slices(slices, positions=positions)
    assert capped.positions.shape == (30, 3) and not capped.atlas


def test_starting_states_are_stored_cells_with_unmeasured_genes_at_their_mean():
    cells, _ = two_types(n=20)
    mask = np.ones_like(cells, bool)
    mask[:10, 2] = False  # ten cells did not measure gene 2
    model = ObservationModel(cells, mask)
    start = model.starting_states(100, seed=5)  # more than stored: with replacement
    assert start.shape == (100, cells.shape[1])
    filled = cells.copy()
    filled[:10, 2] = cells[10:, 2].mean()
    assert (start[:, None, :] == filled[None]).all(-1).any(1).all()
    np.testing.assert_array_equal(start, model.starting_states(100, seed=5))
