"""`extract`: per-cell embeddings of a processed store or an .h5ad, to .npz (and obsm)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from alphastomics.data.anndata import FrameChoice, NormalizeMode, read_h5ad
from alphastomics.data.store import ProcessedStore
from alphastomics.embedding import EmbeddingExtractor, ExtractMode
from alphastomics.keys import EMBEDDING, EMBEDDING_INFO
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.io import atomic_write, staged_outputs, write_h5ad
from alphastomics.workflows.inputs import prepare_input
from alphastomics.workflows.test import check_store_genes


def _names(codes: np.ndarray, names: list[str]) -> np.ndarray:
    return np.array([names[c] if 0 <= c < len(names) else "" for c in codes], dtype=str)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append .npz to a name
        np.savez_compressed(handle, **arrays)


def extract_store(
    module: AlphaSTomicsModule, data_dir: str | Path, output: Path, mode: ExtractMode
) -> dict[str, np.ndarray]:
    """Embeddings of every slice of a processed store, in store order, written to ``output``
    with each cell's ``obs_names`` (of its input file), ``slice`` and ``cell_types``."""
    store = ProcessedStore(data_dir)
    check_store_genes(module, store.gene_names, data_dir)
    holders, obs_names = [], []
    for index in range(len(store.metadata["slices"])):
        arrays = store.load_slice(index)
        obs_names.append(np.asarray(arrays.obs_names, dtype=str))
        holders.append(arrays.batch())
    result = EmbeddingExtractor(module, mode=mode).extract(holders)
    slice_names = [s["name"] for s in store.metadata["slices"]]
    result["cell_types"] = _names(result["cell_types"], store.metadata.get("cell_types", []))
    result["slice"] = np.array([slice_names[i] for i in result.pop("slice_index")], dtype=str)
    result["obs_names"] = np.concatenate(obs_names)  # holders keep each slice's cell order
    atomic_write(output, lambda tmp: _write_npz(tmp, result))
    return result


def extract_h5ad(
    module: AlphaSTomicsModule,
    input_path: Path,
    output: Path,
    mode: ExtractMode,
    *,
    keys: dict[str, str | None] | None = None,
    normalize: NormalizeMode | None = None,
    min_gene_overlap: float = 0.5,
    frame: FrameChoice = "auto",
) -> dict[str, np.ndarray]:
    """Embeddings of an .h5ad: ``output`` (.npz) plus ``output``'s stem + .h5ad with obsm.

    ``keys``, ``normalize``, ``min_gene_overlap`` and ``frame`` as for ``sample`` (see
    :func:`~alphastomics.workflows.inputs.prepare_input`).
    """
    adata = read_h5ad(input_path)
    out, stacked = embed_anndata(
        module,
        adata,
        mode,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        source=str(input_path),
        frame=frame,
    )
    with staged_outputs() as stage:  # both files, or neither
        stage.write(output, lambda tmp: _write_npz(tmp, stacked))
        stage.write(output.with_suffix(".h5ad"), lambda tmp: write_h5ad(out, tmp))
    return stacked


def embed_anndata(
    module: AlphaSTomicsModule,
    adata: ad.AnnData,
    mode: ExtractMode,
    *,
    keys: dict[str, str | None] | None = None,
    normalize: NormalizeMode | None = None,
    min_gene_overlap: float = 0.5,
    source: str = "input AnnData",
    frame: FrameChoice = "auto",
) -> tuple[ad.AnnData, dict[str, np.ndarray]]:
    """Embeddings of every cell of ``adata``, in memory.

    Returns a copy of ``adata`` with ``obsm["X_alphastomics"]`` (the transformer's embeddings
    when extracted, else the first kind) and ``uns["alphastomics_embedding"]``, and every kind
    of embedding by name (plus ``cell_types`` and ``obs_names``), in ``adata``'s cell order.
    """
    slices = prepare_input(
        module,
        adata,
        source,
        keys=keys,
        normalize=normalize,
        min_gene_overlap=min_gene_overlap,
        frame_choice=frame,
    ).slices
    extractor = EmbeddingExtractor(module, mode=mode)
    result: dict[str, np.ndarray] = {}
    order = np.concatenate([piece.obs_indices for piece in slices])
    for piece in slices:
        for key, arrays in extractor.embed(piece.batch(module.n_dims)).items():
            result.setdefault(key, []).extend(arrays)  # type: ignore[arg-type]
    inverse = np.argsort(order)
    stacked = {key: np.concatenate(parts)[inverse] for key, parts in result.items()}
    codes = np.concatenate([piece.cell_type for piece in slices])[inverse]
    stacked["cell_types"] = _names(codes, module.data_info.cell_types)
    stacked["obs_names"] = np.asarray(adata.obs_names, dtype=str)
    main_key = (
        "transformer_embeddings" if "transformer_embeddings" in stacked else next(iter(stacked))
    )
    out = adata.copy()
    out.obsm[EMBEDDING] = stacked[main_key]
    out.uns[EMBEDDING_INFO] = {"mode": mode, "source_key": main_key}
    return out, stacked
