"""What a checkpoint remembers of its store (`DataInfo`), and a store entry as a batch."""

from __future__ import annotations

import numpy as np

from alphastomics.data.store import DataInfo, StoreSlice


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
