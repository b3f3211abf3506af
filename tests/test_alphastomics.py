"""alphastomics.model.AlphaSTomics: AnnData in, AnnData out, with the documented keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, make_tiny_adata

from alphastomics import keys
from alphastomics.model import AlphaSTomics

TINY = [
    *TINY_OVERRIDES,
    "training.max_epochs=1",
    "training.val_every_n_epochs=5",
    "training.accelerator=cpu",
]


@pytest.mark.slow
def test_train_load_and_every_mode_on_anndata(tmp_path: Path) -> None:
    adata = make_tiny_adata(n_slices=3, n_cells=60, n_genes=16)
    model = AlphaSTomics.train(
        adata, tmp_path / "a", overrides=TINY, cell_type_key="cell_type", test_slices=["slice_2"]
    )
    assert (tmp_path / "a" / "store" / "metadata.json").is_file()
    cells = adata[adata.obs["slice"] == "slice_2"].copy()
    n = cells.n_obs

    placed = model.place(cells)
    assert placed.obsm[keys.POSITIONS].shape == (n, 3)
    assert placed.uns[keys.UNS]["mode"] == "expr_to_pos"
    predicted = model.predict_expression(cells)
    assert predicted.layers[keys.EXPRESSION].shape == (n, 16)
    panel = cells[:, :10].copy()
    imputed = model.predict_expression(panel)
    assert imputed.shape == (n, 16) and imputed.var[keys.IMPUTED].sum() == 6
    tissue = model.generate(cells, n_cells=40)
    assert tissue.obsm[keys.GENERATED_POSITIONS].shape == (40, 3)
    embedded = model.embed(cells)
    assert embedded.obsm[keys.EMBEDDING].shape == (n, 16)

    again = AlphaSTomics.load(model.checkpoint)
    assert again.module.hparams["gene_names"] == model.module.hparams["gene_names"]
    np.testing.assert_array_equal(
        again.place(cells).obsm[keys.POSITIONS], model.place(cells).obsm[keys.POSITIONS]
    )
    off = AlphaSTomics.load(model.checkpoint, sampling_overrides=["sampling.consensus=0"])
    assert off.module.cfg.sampling.consensus == 0 and again.module.cfg.sampling.consensus == 0.5
    unpulled = off.place(cells)
    assert list(unpulled.uns[keys.UNS]["sampling_overrides"]) == ["sampling.consensus=0"]
    assert not np.allclose(unpulled.obsm[keys.POSITIONS], placed.obsm[keys.POSITIONS])
