"""`AlphaSTomics`: the model on AnnData, for notebooks; no batches, no units, no files.

Each method takes an AnnData laid out like the training files (the keys, layer and
normalisation used at preprocess time are the defaults) and returns a new one with the outputs
of :mod:`alphastomics.keys`; the CLI's ``sample`` and ``extract`` go through the same
functions (:func:`~alphastomics.workflows.sampling.sample_anndata`,
:func:`~alphastomics.workflows.impute.impute_anndata`,
:func:`~alphastomics.workflows.generate.generate_tissue`,
:func:`~alphastomics.workflows.extract.embed_anndata`) and only add the files.

Examples
--------
>>> model = AlphaSTomics.load("runs/a/checkpoints/best.ckpt")  # doctest: +SKIP
>>> placed = model.place(cells)  # obsm["alphastomics_positions"]  # doctest: +SKIP
>>> predicted = model.predict_expression(slab)  # layers["alphastomics_expression"]  # doctest: +SKIP
>>> tissue = model.generate(reference, n_cells=2000)  # obsm["spatial"]  # doctest: +SKIP
>>> embedded = model.embed(cells)  # obsm["X_alphastomics"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad

if TYPE_CHECKING:
    from alphastomics.training.module import AlphaSTomicsModule
    from alphastomics.workflows.generate import NCells


class AlphaSTomics:
    """A trained AlphaSTomics model.

    Parameters
    ----------
    module
        The trained :class:`~alphastomics.training.module.AlphaSTomicsModule`.
    checkpoint
        Where it was loaded from (recorded in ``uns["alphastomics"]``).
    """

    def __init__(self, module: AlphaSTomicsModule, checkpoint: str | Path | None = None) -> None:
        self.module = module
        self.checkpoint = "" if checkpoint is None else str(checkpoint)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        map_location: str = "cpu",
        sampling_overrides: Sequence[str] = (),
    ) -> AlphaSTomics:
        """Load ``RUN/checkpoints/best.ckpt`` (or ``last.ckpt``) written by training.

        ``sampling_overrides``: dotted ``sampling.KEY=VALUE`` words that change how it samples,
        as on the command line (e.g. ``["sampling.consensus=0"]``); other keys are refused.
        """
        from alphastomics.training.checkpoint import load_module

        module = load_module(checkpoint, map_location, sampling_overrides)
        return cls(module, checkpoint)

    @classmethod
    def train(
        cls,
        data: str | Path | ad.AnnData | Sequence[str | Path],
        output_dir: str | Path,
        *,
        config: str | Path | None = None,
        overrides: Sequence[str] = (),
        resume: bool = False,
        overwrite: bool = False,
        **preprocess: Any,
    ) -> AlphaSTomics:
        """Train a model and load its best checkpoint.

        Parameters
        ----------
        data
            A processed store (a folder written by ``preprocess``), or AnnData: an object, an
            ``.h5ad`` path or several; these are preprocessed into ``output_dir/store`` first,
            with ``preprocess`` passed to
            :class:`~alphastomics.data.preprocess.SpatialDataPreprocessor`.
        output_dir
            The run folder: ``output_dir/run`` holds checkpoints, config and logs.
        config, overrides
            A YAML config and dotted ``KEY=VALUE`` overrides, as ``alphastomics train`` takes.
        resume, overwrite
            As ``alphastomics train --resume / --overwrite``.
        """
        from alphastomics.config import load_config
        from alphastomics.workflows.train import run_training

        output_dir = Path(output_dir)
        store = _store_of(data, output_dir, overwrite=overwrite, **preprocess)
        run_dir = output_dir / "run"
        run_training(
            load_config(config, list(overrides)),
            store,
            run_dir,
            resume=resume,
            overwrite=overwrite,
            enable_progress_bar=False,
        )
        best = run_dir / "checkpoints" / "best.ckpt"
        return cls.load(best if best.is_file() else run_dir / "checkpoints" / "last.ckpt")

    # ------------------------------------------------------------------ conditional modes
    def place(self, adata: ad.AnnData, **options: Any) -> ad.AnnData:
        """``expr_to_pos``: positions of the cells of ``adata`` from their expression.

        Returns a copy with ``obsm["alphastomics_positions"]`` (N, D) in ``adata``'s units
        (and ``obs["alphastomics_position_spread"]`` with ``num_samples`` > 1). ``options``:
        ``sampler``, ``steps``, ``num_samples``, ``seed``, ``keys``, ``normalize``,
        ``min_gene_overlap``, ``frame`` (see :func:`~alphastomics.workflows.sampling.sample_anndata`).
        """
        return self._sample(adata, "expr_to_pos", **options)

    def predict_expression(self, adata: ad.AnnData, **options: Any) -> ad.AnnData:
        """Expression from positions; when ``adata`` measures some of the model's genes, the
        others are imputed from those and the positions (``impute``).

        Returns, for ``pos_to_expr`` (``adata`` has all of the model's genes, or none), a copy
        with ``layers["alphastomics_expression"]`` (``obsm`` on the model's genes when its genes
        differ); for ``impute``, the cells on the model's genes with
        ``layers["alphastomics_expression"]`` and ``var["alphastomics_imputed"]``. A model of
        one slice or volume reads coordinates within its extent in its training frame, and
        ``pos_to_expr`` there reads its stored training cells (``frame`` option, README
        ``sample``).
        """
        genes = set(self.module.hparams["gene_names"])
        shared = genes & set(map(str, adata.var_names))
        if shared and shared != genes:
            from alphastomics.workflows.impute import impute_anndata

            options.pop("checkpoint", None)
            return impute_anndata(self.module, adata, **options)
        return self._sample(adata, "pos_to_expr", **options)

    def generate(
        self, reference: ad.AnnData, *, n_cells: NCells = None, **options: Any
    ) -> ad.AnnData:
        """``joint``: a virtual tissue per slice of ``reference`` (its cell count and extent).

        Returns a new AnnData: ``X`` (measurement-like expression),
        ``layers["alphastomics_denoised"]`` (the denoised states), ``obsm["spatial"]``,
        ``obs["slice"]``, ``obs["alphastomics_reference_slice"]`` (see
        :func:`~alphastomics.workflows.generate.generate_tissue`).
        """
        from alphastomics.keys import UNS
        from alphastomics.workflows.generate import generate_tissue

        tissue = generate_tissue(self.module, reference, n_cells=n_cells, **options)
        tissue.uns[UNS]["checkpoint"] = self.checkpoint
        return tissue

    def embed(self, adata: ad.AnnData, mode: str = "transformer", **options: Any) -> ad.AnnData:
        """Per-cell embeddings: a copy of ``adata`` with ``obsm["X_alphastomics"]``.

        ``mode``: ``transformer`` (the network's per-cell output), ``expression``,
        ``position`` or ``all``.
        """
        from alphastomics.workflows.extract import embed_anndata

        out, _ = embed_anndata(self.module, adata, mode, **options)  # type: ignore[arg-type]
        return out

    def _sample(self, adata: ad.AnnData, mode: str, **options: Any) -> ad.AnnData:
        from alphastomics.workflows.sampling import sample_anndata

        options.setdefault("checkpoint", self.checkpoint)
        result, _ = sample_anndata(self.module, adata, mode=mode, **options)
        return result


def _store_of(
    data: str | Path | ad.AnnData | Sequence[str | Path],
    output_dir: Path,
    *,
    overwrite: bool,
    **preprocess: Any,
) -> Path:
    """``data`` if it is a processed store, else the store preprocessed from its AnnData."""
    from alphastomics.data.preprocess import SpatialDataPreprocessor
    from alphastomics.utils.io import atomic_write, write_h5ad

    if isinstance(data, str | Path) and Path(data).is_dir():
        return Path(data)
    if isinstance(data, ad.AnnData):
        path = output_dir / "input.h5ad"
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, partial(write_h5ad, data))
        files: list[str | Path] = [path]
    elif isinstance(data, str | Path):
        files = [data]
    else:
        files = list(data)
    store = output_dir / "store"
    SpatialDataPreprocessor(**preprocess).preprocess_and_save(files, store, overwrite=overwrite)
    return store
