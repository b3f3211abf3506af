"""Shared test helpers and fixtures: tiny generated data, CPU only, each built in well under 1 s.

- :func:`make_tiny_adata` builds a small AnnData in memory (see its docstring).
- ``tiny_adata``: ``make_tiny_adata()``; 3 slices of about 60 cells, 16 genes, raw counts,
  ``obsm["ccf"]`` 3D, ``obs["slice"]`` and ``obs["cell_type"]``.
- ``tiny_h5ad``: ``tiny_adata`` written to ``tmp_path / "tiny.h5ad"``.
- ``tiny_store``: a processed store (session-scoped, READ-ONLY: copy it before changing it)
  made by ``SpatialDataPreprocessor(cell_type_key="cell_type", val_slices=["slice_2"],
  test_slices=["slice_3"])`` from ``make_tiny_adata(n_slices=4, n_cells=50)``: train =
  slice_0 and slice_1, val = slice_2, test = slice_3; slices have different cell counts.
- ``seqfish_path`` / ``bdtnp_path``: the shared real data sets; the test is skipped when absent.
- :func:`small_slice`: one generated slice as log-normalised expression and positions scaled to
  unit RMS radius, the units the model works in.
- :func:`load_bench_script`: a script of ``bench/`` as a module.
- CLI runs: ``TINY_OVERRIDES`` (config overrides of a tiny, fast model), :func:`cli` (the
  command in-process) and ``PYTHON_CLI`` (the command as a subprocess).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from alphastomics.attn_model.model import Denoiser
from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.synthetic import synthetic_tissue
from alphastomics.main import main

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
SEQFISH = SHARED_DATA / "seqfish_embryo" / "seqfish_embryo.h5ad"
BDTNP = SHARED_DATA / "bdtnp_drosophila" / "bdtnp_drosophila.h5ad"
BENCH = Path(__file__).parents[1] / "bench"

# 16 wide, 1 layer, 2 heads, 20 diffusion steps, 4 sampling steps; tests add their training
TINY_OVERRIDES = [
    "model.hidden_dim=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "diffusion.diffusion_steps=20",
    "sampling.steps=4",
]
PYTHON_CLI = [sys.executable, "-m", "alphastomics.main"]


def cli(*words: object) -> int:
    """Exit status of ``alphastomics WORDS`` run in-process, each word passed through ``str``."""
    return main([str(word) for word in words])


def small_slice(
    n_cells: int = 600, n_genes: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(N, G) log-normalised float32 expression and (N, 3) float32 positions, unit RMS radius."""
    adata = synthetic_tissue(n_cells=n_cells, n_genes=n_genes, n_slices=1, seed=seed)
    counts = np.asarray(adata.X, dtype=np.float64)
    expr = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    pos = adata.obsm["ccf"].astype(np.float64)
    pos -= pos.mean(0)
    pos /= np.sqrt((pos**2).sum(1).mean() / 3)
    return expr, pos.astype(np.float32)


def padded_batch(
    n_cells: int = 9, n_real_second: int = 6, n_dims: int = 3, n_genes: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two items of random expression (2, N, G) and positions (2, N, D), and their mask (2, N):
    the second item has ``n_real_second`` real cells, its padded rows 0. Seeded."""
    gen = torch.Generator().manual_seed(1)
    expr = torch.randn(2, n_cells, n_genes, generator=gen)
    pos = torch.randn(2, n_cells, n_dims, generator=gen)
    mask = torch.ones(2, n_cells, dtype=torch.bool)
    mask[1, n_real_second:] = False
    expr[1, n_real_second:] = 0
    pos[1, n_real_second:] = 0
    return expr, pos, mask


def small_denoiser(n_genes: int = 6, n_dims: int = 3) -> Denoiser:
    """A one-layer width-16 Denoiser in eval mode, weights seeded."""
    torch.manual_seed(0)
    return Denoiser(n_genes=n_genes, n_dims=n_dims, hidden_dim=16, n_layers=1, n_heads=2).eval()


def make_tiny_adata(
    n_slices: int = 3,
    n_cells: int = 60,
    n_genes: int = 16,
    n_dims: int = 3,
    seed: int = 0,
    *,
    counts: bool = True,
    sparse: bool = False,
    n_cell_types: int = 4,
    position_key: str = "ccf",
) -> ad.AnnData:
    """A small synthetic tissue (:func:`synthetic_tissue`) for tests.

    Parameters
    ----------
    n_slices
        Slices ``slice_0`` … in ``obs["slice"]``.
    n_cells
        Cells per slice on average (slice sizes differ a little: cells are uniform in space).
    n_genes
        Genes ``gene_0`` … .
    n_dims
        3: ``obsm[position_key]`` is (N, 3); 2: the z column is dropped.
    seed
        Seed of the generator.
    counts
        True: integer counts in ``X``; False: log-normalised expression.
    sparse
        Store ``X`` as a CSR matrix.
    n_cell_types
        Labels ``type_0`` … in ``obs["cell_type"]``.
    position_key
        ``obsm`` key of the coordinates.
    """
    adata = synthetic_tissue(
        n_cells=n_slices * n_cells,
        n_genes=n_genes,
        n_slices=n_slices,
        n_cell_types=n_cell_types,
        seed=seed,
        counts=counts,
        size=(300.0, 200.0, 100.0 * n_slices),
    )
    coordinates = adata.obsm.pop("ccf")
    adata.obsm[position_key] = coordinates[:, :n_dims].copy()
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    return adata


def load_bench_script(name: str) -> ModuleType:
    """``bench/{name}.py`` as the module ``bench_{name}``, with ``bench/`` on ``sys.path`` as
    when the script runs (it imports ``bench_common`` by name)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    """Write ``adata`` to ``path`` and return the path."""
    adata.write_h5ad(path)
    return path


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    return make_tiny_adata()


@pytest.fixture
def tiny_h5ad(tmp_path: Path, tiny_adata: ad.AnnData) -> Path:
    return write_h5ad(tiny_adata, tmp_path / "tiny.h5ad")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_store")
    source = write_h5ad(make_tiny_adata(n_slices=4, n_cells=50), folder / "tiny4.h5ad")
    pre = SpatialDataPreprocessor(
        cell_type_key="cell_type",
        val_slices=["slice_2"],
        test_slices=["slice_3"],
        progress=False,
    )
    pre.preprocess_and_save([source], folder / "store")
    return folder / "store"


@pytest.fixture
def seqfish_path() -> Path:
    if not SEQFISH.is_file():
        pytest.skip(f"real data not found at {SEQFISH}")
    return SEQFISH


@pytest.fixture
def bdtnp_path() -> Path:
    if not BDTNP.is_file():
        pytest.skip(f"real data not found at {BDTNP}")
    return BDTNP


def assert_nothing_written(output_dir: Path) -> None:
    """``output_dir`` was not created and no temporary sibling folder is left behind."""
    assert not output_dir.exists()
    leftovers = [p.name for p in output_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
