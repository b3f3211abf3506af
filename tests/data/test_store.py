"""What a checkpoint remembers of its store (`DataInfo`), and a store entry as a batch."""

from __future__ import annotations

import numpy as np
from conftest import make_tiny_adata, write_h5ad

from alphastomics.data.anndata import TrainingFrame
from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.store import DataInfo, ProcessedStore, StoreSlice


def _metadata() -> dict:
    entry = {"n_cells": 10, "split": "train"}
    return {
        "keys": {"position_key": "spatial", "slice_key": "slice"},
        "normalization": {"applied": "none"},
        "cell_types": ["a", "b"],
        "slices": [
            entry | {"name": "s0", "scale": 1.0},
            entry | {"name": "s1", "scale": 3.0},
            entry | {"name": "s2", "scale": 2.0, "split": "test"},
        ],
    }


def test_data_info_summarises_a_store_and_round_trips():
    info = DataInfo.from_metadata(_metadata())
    assert info.keys["position_key"] == "spatial" and info.cell_types == ["a", "b"]
    assert info.typical_scale == 2.0  # the median slice scale
    assert info.n_training_frames == 2
    assert DataInfo.from_dict(info.to_dict()) == info


def test_data_info_reads_older_and_newer_checkpoints():
    # a checkpoint of an earlier version: fields this version dropped, others missing
    old = DataInfo.from_dict({"cell_types": ["x"], "n_dims": 2, "typical_n_cells": 40})
    assert old.cell_types == ["x"] and old.typical_scale == 1.0
    assert old.n_training_frames is None and old.keys == {}
    assert DataInfo.from_dict(None) == DataInfo()


def test_store_entry_as_a_batch_keeps_types_and_index():
    n, g = 5, 3
    entry = StoreSlice(
        index=4,
        name="s",
        expression=np.ones((n, g), np.float32),
        positions=np.zeros((n, 2), np.float32),
        cell_type=np.arange(n),
        obs_names=np.array([f"c{i}" for i in range(n)]),
        gene_mask=np.array([True, False, True]),
    )
    batch = entry.batch()
    assert batch.expression.shape == (1, n, g) and batch.positions.shape == (1, n, 2)
    assert batch.gene_mask.tolist() == [[True, False, True]]
    assert batch.cell_type.tolist() == [list(range(n))] and batch.slice_index.tolist() == [4]


def test_training_frame_holds_what_lies_within_its_extent_and_round_trips():
    frame = TrainingFrame(
        center=(5.0, 5.0, 0.0), scale=2.0, low=(0.0, 0.0, 0.0), high=(10.0, 10.0, 0.0)
    )
    assert frame.holds(np.array([[4.0, 6.0], [9.0, 1.0]]))  # 2D input: z = 0, as trained
    assert frame.holds(np.array([[-8.0, 19.0]]))  # within the extent beyond it: a neighbour
    assert not frame.holds(np.array([[4.0, 6.0], [21.0, 5.0]]))
    assert not frame.holds(np.array([[4.0, 6.0, 1.0]]))  # off the trained plane
    assert TrainingFrame.from_dict(frame.to_dict()) == frame
    assert TrainingFrame.from_dict(None) is None
    info = DataInfo.from_metadata(_metadata(), frame)
    assert info.training_frame == frame
    assert DataInfo.from_dict(info.to_dict()).training_frame == frame


def test_a_store_of_one_slice_has_a_training_frame_and_one_of_several_none(tmp_path, tiny_store):
    assert ProcessedStore(tiny_store).training_frame() is None
    adata = make_tiny_adata(n_slices=1, n_cells=80)
    source = write_h5ad(adata, tmp_path / "volume.h5ad")
    SpatialDataPreprocessor(progress=False).preprocess_and_save([source], tmp_path / "store")
    store = ProcessedStore(tmp_path / "store")
    frame = store.training_frame()
    assert frame is not None
    entry = store.metadata["slices"][store.slice_indices("train")[0]]
    assert frame.center == tuple(entry["center"]) and frame.scale == entry["scale"]
    coordinates = np.asarray(adata.obsm["ccf"], dtype=np.float64)
    names = np.concatenate([store.load_slice(k).obs_names for k in store.slice_indices("train")])
    rows = adata.obs_names.get_indexer(names)
    np.testing.assert_allclose(frame.low, coordinates[rows].min(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(frame.high, coordinates[rows].max(axis=0), rtol=1e-5, atol=1e-3)
