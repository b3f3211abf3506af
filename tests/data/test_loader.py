"""ProcessedStore and create_dataloaders: shapes, padding, masks, modes, seeding, sharding, memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_adata, write_h5ad

from alphastomics.data.batch import DataHolder, masked_mean
from alphastomics.data.loader import CellSampler, ItemKey, SpatialDataset, create_dataloaders
from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.store import ProcessedStore
from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.errors import UserInputError


def _signature(batches: list[DataHolder]) -> list[tuple]:
    return [(b.slice_index.tolist(), b.cell_index.tolist()) for b in batches]


def _epoch(loader: torch.utils.data.DataLoader, epoch: int = 0) -> list[DataHolder]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ------------------------------------------------------------------------------------------
# Store reader


def test_store_reader(tiny_store: Path) -> None:
    store = ProcessedStore(tiny_store)
    assert store.n_genes == 16 and store.gene_names == [f"gene_{g}" for g in range(16)]
    assert store.slice_names("train") == ["slice_0", "slice_1"]
    assert store.slice_names("val") == ["slice_2"] and store.slice_indices("test") == [3]
    assert store.slice_names() == [f"slice_{k}" for k in range(4)]
    lazy, eager = store.load_slice(1), store.load_slice(1, mmap=False)
    assert isinstance(lazy.expression, np.memmap) and not isinstance(eager.expression, np.memmap)
    assert lazy.n_cells == store.n_cells(1) == eager.expression.shape[0]
    np.testing.assert_array_equal(lazy.expression, eager.expression)
    assert lazy.positions.shape == (lazy.n_cells, 3) and lazy.gene_mask.dtype == bool


def test_missing_or_old_store_is_an_error(tmp_path: Path, tiny_store: Path) -> None:
    with pytest.raises(UserInputError, match="alphastomics preprocess"):
        ProcessedStore(tmp_path)
    meta = json.loads((tiny_store / "metadata.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="format 99"):
        ProcessedStore(tmp_path)


# ------------------------------------------------------------------------------------------
# Slice mode


def test_slice_mode_pads_and_masks(tiny_store: Path) -> None:
    train, val, test, meta = create_dataloaders(tiny_store, mode="slice", batch_size=2)
    store = ProcessedStore(tiny_store)
    assert meta["n_genes"] == 16 and meta["gene_names"] == store.gene_names
    assert len(meta["slices"]) == 4 and meta["mode"] == "slice"
    assert meta["n_train_cells"] == store.n_cells(0) + store.n_cells(1)
    (batch,) = _epoch(train)
    sizes = [store.n_cells(k) for k in batch.slice_index.tolist()]
    assert sorted(batch.slice_index.tolist()) == [0, 1] and sizes[0] != sizes[1]
    n_max = max(sizes)
    assert batch.expression.shape == (2, n_max, 16) and batch.positions.shape == (2, n_max, 3)
    assert batch.node_mask.dtype == torch.bool and batch.gene_mask.shape == (2, 16)
    assert batch.node_mask.sum(dim=1).tolist() == sizes
    for b, (k, n) in enumerate(zip(batch.slice_index.tolist(), sizes, strict=True)):
        pad = ~batch.node_mask[b]
        assert torch.all(batch.expression[b][pad] == 0) and torch.all(batch.positions[b][pad] == 0)
        assert torch.all(batch.cell_type[b][pad] == -1) and torch.all(
            batch.cell_index[b][pad] == -1
        )
        assert batch.cell_index[b][:n].tolist() == list(range(n))
        stored = store.load_slice(k)
        np.testing.assert_array_equal(batch.expression[b][:n].numpy(), stored.expression)
        np.testing.assert_array_equal(batch.cell_type[b][:n].numpy(), stored.cell_type)
        np.testing.assert_allclose(batch.positions[b][:n].numpy(), stored.positions, atol=1e-5)
    centroid = masked_mean(batch.positions, batch.node_mask)
    torch.testing.assert_close(centroid, torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert [b.slice_index.tolist() for b in val] == [[2]]
    assert [b.slice_index.tolist() for b in test] == [[3]]


def test_slice_mode_max_cells_subsamples(tiny_store: Path) -> None:
    store = ProcessedStore(tiny_store)
    train, val, _, _ = create_dataloaders(tiny_store, "slice", 1, max_cells=20, seed=3)
    epoch0, epoch0_again, epoch1 = _epoch(train, 0), _epoch(train, 0), _epoch(train, 1)
    assert all(b.expression.shape[1] == 20 and b.node_mask.all() for b in epoch0)
    assert _signature(epoch0) == _signature(epoch0_again)
    assert _signature(epoch0) != _signature(epoch1)
    for b in epoch0:
        rows = b.cell_index[0]
        assert torch.all(rows[1:] > rows[:-1])  # sorted, unique rows of the slice
        # a subsample keeps its place in the slice's frame (not re-centred)
        stored = np.asarray(store.load_slice(int(b.slice_index[0])).positions)[rows.numpy()]
        np.testing.assert_allclose(b.positions[0].numpy(), stored, atol=1e-6)
    _, val_again, _, _ = create_dataloaders(tiny_store, "slice", 1, max_cells=20, seed=3)
    assert _signature(_epoch(val, 0)) == _signature(_epoch(val, 5)) == _signature(list(val_again))


# ------------------------------------------------------------------------------------------
# Cell mode


def test_cell_mode_items(tiny_store: Path) -> None:
    train, val, test, meta = create_dataloaders(tiny_store, mode="cell", batch_size=16)
    store = ProcessedStore(tiny_store)
    assert len(train) == math.ceil(meta["n_train_cells"] / 16)
    batches = _epoch(train)
    assert len(batches) == len(train)
    for b in batches:
        assert b.expression.shape == (1, 16, 16) and b.node_mask.all()
        assert b.slice_index.item() in (0, 1)
        rows = b.cell_index[0].numpy()
        assert np.all(np.diff(rows) > 0)
        stored = store.load_slice(b.slice_index.item())
        np.testing.assert_array_equal(b.expression[0].numpy(), stored.expression[rows])
        # the item keeps its place in the slice's frame
        np.testing.assert_allclose(b.positions[0].numpy(), stored.positions[rows], atol=1e-6)
    # Evaluation holds whole slices, one per batch.
    assert [(b.slice_index.item(), b.node_mask.sum().item()) for b in val] == [
        (2, store.n_cells(2))
    ]
    assert [b.expression.shape[1] for b in test] == [store.n_cells(3)]
    train, _, _, _ = create_dataloaders(tiny_store, mode="cell", batch_size=16, items_per_epoch=5)
    assert len(train) == 5 and len(_epoch(train)) == 5


def _is_knn_ball(points: np.ndarray, rows: np.ndarray) -> bool:
    """True when some cell of ``rows`` has exactly ``rows`` as its len(rows) nearest cells."""
    outside = np.setdiff1d(np.arange(len(points)), rows)
    for centre in rows:
        distance = np.linalg.norm(points - points[centre], axis=1)
        if distance[rows].max() <= distance[outside].min() + 1e-6:
            return True
    return False


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_neighbourhood_items_are_contiguous(tiny_store: Path, fraction: float) -> None:
    store = ProcessedStore(tiny_store)
    sampler = CellSampler(
        store, [0, 1], n_cells=12, neighborhood_fraction=fraction, items_per_epoch=20, seed=1
    )
    dataset = SpatialDataset(store)
    keys = sampler.items()
    assert sum(k.kind == "neighborhood" for k in keys) == round(20 * fraction)
    contiguous = []
    for key in keys:
        rows = dataset.cell_rows(key)
        assert len(rows) == 12
        contiguous.append(
            _is_knn_ball(np.asarray(store.load_slice(key.slice_index).positions), rows)
        )
    for key, ball in zip(keys, contiguous, strict=True):
        if key.kind == "neighborhood":
            assert ball
    random_balls = [b for k, b in zip(keys, contiguous, strict=True) if k.kind == "random"]
    assert sum(random_balls) <= len(random_balls) // 4


def test_item_larger_than_slice_is_the_whole_slice(tiny_store: Path) -> None:
    dataset = SpatialDataset(ProcessedStore(tiny_store))
    for kind in ("random", "neighborhood", "slice"):
        rows = dataset.cell_rows(ItemKey(0, kind, 10_000, seed=0))  # type: ignore[arg-type]
        assert rows.tolist() == list(range(dataset.store.n_cells(0)))


# ------------------------------------------------------------------------------------------
# Seeding, workers, sharding


@pytest.mark.parametrize(("mode", "batch_size"), [("slice", 1), ("cell", 8)])
def test_seeded_and_reproducible(tiny_store: Path, mode: str, batch_size: int) -> None:
    kwargs = {"mode": mode, "batch_size": batch_size, "max_cells": 30}
    first = create_dataloaders(tiny_store, seed=5, **kwargs)[0]
    second = create_dataloaders(tiny_store, seed=5, **kwargs)[0]
    other = create_dataloaders(tiny_store, seed=6, **kwargs)[0]
    a, b = _epoch(first, 2), _epoch(second, 2)
    assert _signature(a) == _signature(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.expression, y.expression) and torch.equal(x.positions, y.positions)
    assert _signature(a) != _signature(_epoch(first, 3))
    assert _signature(a) != _signature(_epoch(other, 2))
    state = torch.random.get_rng_state()
    _epoch(first, 4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never used


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slice", "cell"])
def test_workers_give_the_same_items(tiny_store: Path, mode: str) -> None:
    kwargs = {"mode": mode, "batch_size": 8 if mode == "cell" else 2, "max_cells": 30, "seed": 2}
    serial = create_dataloaders(tiny_store, num_workers=0, **kwargs)[0]
    parallel = create_dataloaders(tiny_store, num_workers=2, **kwargs)[0]
    for epoch in (0, 1):
        a, b = _epoch(serial, epoch), _epoch(parallel, epoch)
        assert _signature(a) == _signature(b)
        assert all(torch.equal(x.expression, y.expression) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("mode", "batch_size"), [("slice", 1), ("cell", 8)])
def test_distributed_shards_are_disjoint(tiny_store: Path, mode: str, batch_size: int) -> None:
    def keys(**shard: int) -> list[ItemKey]:
        loader = create_dataloaders(
            tiny_store, mode=mode, batch_size=batch_size, items_per_epoch=10, seed=1, **shard
        )[0]
        loader.sampler.set_epoch(1)
        return loader.sampler.items()

    everything = keys(rank=0, world_size=1)
    rank0, rank1 = keys(rank=0, world_size=2), keys(rank=1, world_size=2)
    assert len(rank0) == len(rank1) == 5
    assert sorted(rank0 + rank1, key=repr) == sorted(everything, key=repr)
    assert not set(map(repr, rank0)) & set(map(repr, rank1))


# ------------------------------------------------------------------------------------------
# Arguments and empty splits


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "graph"}, "slice or cell"),
        ({"mode": "cell", "batch_size": 1}, "batch_size must be >= 2"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_cells": 1}, "max_cells"),
        ({"neighborhood_fraction": 1.5}, "neighborhood_fraction"),
        ({"items_per_epoch": 0}, "items_per_epoch"),
        ({"num_workers": -1}, "num_workers"),
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"world_size": 0}, "world_size must be >= 1"),
    ],
)
def test_bad_arguments(tiny_store: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserInputError, match=fragment):
        create_dataloaders(tiny_store, **kwargs)


def test_empty_splits_have_no_loader(tmp_path: Path) -> None:
    source = write_h5ad(make_tiny_adata(n_slices=2, n_cells=20), tmp_path / "a.h5ad")
    pre = SpatialDataPreprocessor(val_fraction=0, test_fraction=0, progress=False)
    pre.preprocess_and_save([source], tmp_path / "store")
    train, val, test, meta = create_dataloaders(tmp_path / "store")
    assert val is None and test is None and len(train) == 2
    assert meta["split"]["val"] == []


# ------------------------------------------------------------------------------------------
# Memory: cell mode reads only the rows it needs

_MEASURE = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import numpy as np
    from alphastomics.data.loader import create_dataloaders
    from alphastomics.data.store import ProcessedStore

    store_dir = sys.argv[1]
    train, _, _, _ = create_dataloaders(
        store_dir, mode="cell", batch_size=512, items_per_epoch=6, seed=0
    )
    tracemalloc.start()
    batches = list(train)
    cell_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    store = ProcessedStore(store_dir)
    whole = store.load_slice(store.slice_indices("train")[0], mmap=False).expression
    whole_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"cell": cell_peak, "whole": whole_peak, "nbytes": whole.nbytes,
                      "shapes": [list(b.expression.shape) for b in batches]}))
    """
)


@pytest.mark.slow
def test_cell_mode_reads_only_a_subset(tmp_path: Path) -> None:
    adata = synthetic_tissue(200_000, 40, n_slices=1, seed=0)
    source = write_h5ad(adata, tmp_path / "big.h5ad")
    del adata
    pre = SpatialDataPreprocessor(val_fraction=0.05, test_fraction=0.05, progress=False)
    pre.preprocess_and_save([source], tmp_path / "store")
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["shapes"] == [[1, 512, 40]] * 6
    assert measured["nbytes"] == 180_000 * 40 * 4
    assert measured["whole"] >= measured["nbytes"]
    # Items read 512 rows each; the k-d tree over positions is the largest allocation.
    assert measured["cell"] < 0.3 * measured["nbytes"]
