"""Turn ``.h5ad`` files into a processed store: one gene list, normalised expression, centred and
isotropically scaled 3D positions, a train/val/test split, written atomically.

Store layout (read lazily by :mod:`alphastomics.utils.dataloader`)::

    OUT/metadata.json
    OUT/slices/<k>/expression.npy   float32 (N, G) normalised, model gene order, unmeasured = 0
    OUT/slices/<k>/positions.npy    float32 (N, D) centred and scaled, D = metadata n_dims
    OUT/slices/<k>/cell_type.npy    int64 (N,) codes into metadata["cell_types"], -1 = unknown
    OUT/slices/<k>/obs_names.npy    unicode (N,) the input obs_names

:func:`prepare_anndata` applies the same steps to a new AnnData for an already-trained model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

import alphastomics
from alphastomics import keys
from alphastomics.errors import UserInputError
from alphastomics.utils.io import (
    check_output_dir,
    remove_stale_siblings,
    stale_siblings,
    temporary_sibling,
    writing,
)

logger = logging.getLogger(__name__)

NormalizeMode = Literal["auto", "log1p", "none"]
AppliedNormalization = Literal["log1p", "none"]

FORMAT_VERSION = 1
TARGET_SUM = 1e4  # library size after normalisation (scanpy's normalize_total target_sum)
GENE_STD_FLOOR = 1e-2  # gene_std floor: flatter genes carry no signal; keeps z-scores bounded
DEFAULT_VAL_FRACTION = 0.1
MIN_TRAIN_SLICES_WITH_VAL = 5  # the default holds out validation slices only above this
MAX_DIMS = 3  # coordinates have 2 or 3 columns; a store of 2D files keeps 2
MIN_SLICE_CELLS = 3  # fewest cells of a slice (or held-out part): position metrics need 3
_CHUNK_ROWS = 8192  # rows densified at a time
_MAX_LISTED = 5  # names quoted in an error message


@dataclass(frozen=True)
class PreparedSlice:
    """One slice of an AnnData, ready for the model.

    Attributes
    ----------
    name
        Slice name (the ``slice_key`` value, or the file stem when there is no such column).
    source
        File (or label) the slice came from, for messages.
    obs_indices
        (N,) int64 rows of the slice in the input AnnData.
    obs_names
        (N,) str obs_names of those rows.
    expression
        (N, G) float32 normalised expression on the model's genes; unmeasured genes are 0.
    gene_mask
        (G,) bool, True for a gene the input measured.
    positions
        (N, D) float32 centred and scaled coordinates, D the model's number of dimensions
        (2D input in a 3D model gets z = 0), or None when the position key is absent and
        positions were not required.
    center
        (D,) float64 centroid in input units (None without positions).
    scale
        Isotropic scale: ``user = positions * scale + center`` (None without positions).
    input_dims
        2 or 3: columns of the input coordinates (None without positions).
    cell_type
        (N,) int64 codes into the cell-type list, -1 = unknown or no key.
    normalization
        What was applied to the expression: ``"log1p"`` (library size + log1p) or ``"none"``.
    missing_genes
        Model genes the input did not measure.
    """

    name: str
    source: str
    obs_indices: np.ndarray
    obs_names: np.ndarray
    expression: np.ndarray
    gene_mask: np.ndarray
    positions: np.ndarray | None
    center: np.ndarray | None
    scale: float | None
    input_dims: int | None
    cell_type: np.ndarray
    normalization: AppliedNormalization
    missing_genes: tuple[str, ...] = field(default=())

    @property
    def n_cells(self) -> int:
        """Number of cells N."""
        return len(self.obs_indices)

    @property
    def n_missing_genes(self) -> int:
        """Number of model genes the input did not measure."""
        return len(self.missing_genes)

    @property
    def missing_gene_share(self) -> float:
        """Share of the model's genes the input did not measure, in [0, 1]."""
        return self.n_missing_genes / max(len(self.gene_mask), 1)


def to_user_units(positions: np.ndarray, center: Sequence[float], scale: float) -> np.ndarray:
    """Map scaled positions (N, D) back to input units (N, D) float64: ``positions * scale + center``."""
    return np.asarray(positions, dtype=np.float64) * scale + np.asarray(center, dtype=np.float64)


def to_model_units(positions: np.ndarray, center: Sequence[float], scale: float) -> np.ndarray:
    """Map input-unit positions (N, D) to scaled positions (N, D) float32."""
    centred = np.asarray(positions, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    return (centred / scale).astype(np.float32)


def read_gene_list(path: str | Path) -> list[str]:
    """Read a gene list file: one gene per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"gene list file {path} is a folder; pass --gene_list_file FILE")
    if not path.is_file():
        raise UserInputError(f"gene list file {path} does not exist; pass --gene_list_file FILE")
    raw = path.read_bytes()
    # a byte-order mark says the encoding (Windows editors write UTF-16, or UTF-8 with a BOM)
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserInputError(
            f"gene list file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 "
            "with one gene per line"
        ) from err
    if "\0" in text:
        raise UserInputError(
            f"gene list file {path} holds NUL characters (UTF-16 without a byte-order mark?); "
            "save it as UTF-8 with one gene per line"
        )
    genes = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise UserInputError(f"gene list file {path} lists no genes; write one gene per line")
    return genes


# --------------------------------------------------------------------------------------------
# Reading and checking one AnnData (shared by preprocess_and_save and prepare_anndata)


@dataclass
class _CheckedAnnData:
    """An AnnData whose keys, shapes and values were checked; nothing is densified."""

    source: str
    adata: ad.AnnData
    matrix: Any  # (N, G_file) CSR matrix or ndarray
    genes: list[str]
    positions: np.ndarray | None  # (N, D) float64 raw coordinates
    input_dims: int | None
    groups: list[tuple[str, np.ndarray]]  # (slice name, rows (n,) int64)
    cell_labels: np.ndarray | None  # (N,) object: str label or None
    normalization: AppliedNormalization
    library_size: np.ndarray | None  # (N,) float64 row sums over all genes when log1p


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file; a missing, non-.h5ad or unreadable file is a UserInputError."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"input file {path} does not exist; check the path")
    if path.is_dir() or path.suffix != ".h5ad":
        raise UserInputError(f"input {path} is not an .h5ad file; pass AnnData files (*.h5ad)")
    try:
        return ad.read_h5ad(path)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserInputError(
            f"cannot read {path} as AnnData ({reason}); check that it is a valid .h5ad file"
        ) from err


def _quote(names: Sequence[str]) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"


def _check_anndata(
    adata: ad.AnnData,
    source: str,
    *,
    position_key: str,
    slice_key: str | None,
    cell_type_key: str | None,
    layer: str | None,
    normalize: NormalizeMode,
    require_positions: bool,
    default_slice_name: str,
    require_expression: bool = True,
) -> _CheckedAnnData:
    """Check everything that can be wrong with one AnnData, in the order a user would fix it.

    With ``require_expression=False`` an expression problem is not an error: the expression
    is reported as unused and the result has no matrix.
    """
    if adata.n_obs == 0:
        raise UserInputError(f"{source} has no cells; remove it from the inputs")
    try:
        genes, matrix = _check_genes(adata, layer, source)
    except UserInputError as err:
        if require_expression:
            raise
        logger.info("%s: expression not read (%s)", source, str(err).split("; ")[0])
        genes, matrix = [], None
    positions = _read_positions(adata, position_key, source, required=require_positions)
    groups = _slice_groups(adata, slice_key, source, default_slice_name)
    cell_labels = _cell_labels(adata, cell_type_key, source)
    if positions is not None:
        what = f"coordinates adata.obsm['{position_key}']"
        _check_finite_rows(~np.isfinite(positions).all(axis=1), groups, source, what)
        for name, rows in groups:
            if not _slice_geometry(positions[rows])[2] > 0:
                raise UserInputError(
                    f"{source}: all {len(rows)} cells of slice '{name}' have the same {what}; "
                    "pass --position_key with the real coordinates"
                )
    applied: AppliedNormalization = "none"
    library_size = None
    if matrix is not None:
        try:
            _check_finite_rows(_nonfinite_rows(matrix), groups, source, _matrix_label(layer))
            applied = _decide_normalization(matrix, normalize, source, layer)
            library_size = _row_sums(matrix) if applied == "log1p" else None
            _check_expressed_slices(matrix, library_size, groups, source, layer)
        except UserInputError as err:
            if require_expression:
                raise
            logger.info("%s: expression not read (%s)", source, str(err).split("; ")[0])
            genes, matrix, applied, library_size = [], None, "none", None
    return _CheckedAnnData(
        source=source,
        adata=adata,
        matrix=matrix,
        genes=genes,
        positions=positions,
        input_dims=None if positions is None else positions.shape[1],
        groups=groups,
        cell_labels=cell_labels,
        normalization=applied,
        library_size=library_size,
    )


def _check_genes(adata: ad.AnnData, layer: str | None, source: str) -> tuple[list[str], Any]:
    """Gene names (unique) and the expression matrix of ``adata``."""
    if adata.n_vars == 0:
        raise UserInputError(
            f"{source} has no genes (adata.var is empty), so it holds no expression; "
            "add the expression matrix with its genes"
        )
    genes = [str(g) for g in adata.var_names]
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(duplicated):
        raise UserInputError(
            f"{source} has {len(duplicated)} duplicate gene names in var_names "
            f"{_quote(list(duplicated))}; make them unique (adata.var_names_make_unique()) "
            "or drop the duplicates"
        )
    return genes, _expression_matrix(adata, layer, source)


def _check_expressed_slices(
    matrix: Any,
    library_size: np.ndarray | None,
    groups: list[tuple[str, np.ndarray]],
    source: str,
    layer: str | None,
) -> None:
    """A slice whose expression is all zero cannot be library-size normalised: an error when
    log1p is applied (``library_size`` given), a warning otherwise."""
    what = _matrix_label(layer)
    for name, rows in groups:
        if library_size is not None:
            if not (library_size[rows] != 0).any():
                raise UserInputError(
                    f"{source}: all {len(rows)} cells of slice '{name}' have zero expression in "
                    f"{what}, so they cannot be library-size normalised; drop that slice, pick "
                    "the counts with --layer NAME, or pass --normalize none"
                )
        elif (
            matrix[rows].count_nonzero() == 0
            if sp.issparse(matrix)
            else not any(bool(np.any(block != 0)) for block in _row_chunks(matrix, rows))
        ):
            logger.warning(
                "%s: slice '%s' has zero expression in %s everywhere", source, name, what
            )


def _matrix_label(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers['{layer}']"


def _expression_matrix(adata: ad.AnnData, layer: str | None, source: str) -> Any:
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise UserInputError(f"{source} has no expression in adata.X; pass --layer NAME")
    else:
        if layer not in adata.layers:
            raise UserInputError(
                f"{source} has no layer '{layer}' (layers: {_quote(list(adata.layers))}); "
                "pass --layer with one of them, or omit --layer to use adata.X"
            )
        matrix = adata.layers[layer]
    if sp.issparse(matrix):
        matrix = matrix.tocsr()
    elif not isinstance(matrix, np.ndarray):
        matrix = np.asarray(matrix)
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(
        matrix.dtype, np.complexfloating
    ):
        raise UserInputError(
            f"{source}: {_matrix_label(layer)} has dtype {matrix.dtype}; expected real numbers"
        )
    return matrix


def _read_positions(
    adata: ad.AnnData, position_key: str, source: str, *, required: bool
) -> np.ndarray | None:
    if position_key not in adata.obsm:
        if not required:
            return None
        existing = list(adata.obsm.keys())
        hint = (
            f"existing keys: {_quote(existing)}; pass --position_key {_likely_key(adata)}"
            if existing
            else "adata.obsm is empty; store (N, 2) or (N, 3) coordinates there"
        )
        raise UserInputError(
            f"{source} has no coordinates in adata.obsm['{position_key}'] ({hint})"
        )
    try:
        positions = np.asarray(adata.obsm[position_key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise UserInputError(
            f"{source}: coordinates adata.obsm['{position_key}'] are not numeric; "
            "store (N, 2) or (N, 3) float coordinates"
        ) from err
    if positions.ndim != 2 or positions.shape[1] not in (2, 3):
        raise UserInputError(
            f"{source}: coordinates adata.obsm['{position_key}'] have shape {positions.shape}; "
            "expected 2 or 3 columns (x, y[, z]); pass --position_key with such a key"
        )
    return positions


def _likely_key(adata: ad.AnnData) -> str:
    """The obsm key most likely to hold coordinates: 'spatial', else the first (N, 2|3) one."""
    keys = list(adata.obsm.keys())
    shaped = [
        k for k in keys if np.ndim(adata.obsm[k]) == 2 and np.shape(adata.obsm[k])[1] in (2, 3)
    ]
    for candidates in (["spatial"], [k for k in shaped if "spatial" in k.lower()], shaped, keys):
        present = [k for k in candidates if k in keys]
        if present:
            return present[0]
    return keys[0]


def _slice_groups(
    adata: ad.AnnData, slice_key: str | None, source: str, default_slice_name: str
) -> list[tuple[str, np.ndarray]]:
    """(slice name, rows) pairs sorted by name; categories without cells are ignored."""
    if slice_key is None or (slice_key not in adata.obs and slice_key == keys.SLICE_KEY):
        groups = [(default_slice_name, np.arange(adata.n_obs, dtype=np.int64))]
    else:
        if slice_key not in adata.obs:
            raise UserInputError(
                f"{source} has no obs column '{slice_key}' (columns: "
                f"{_quote(list(adata.obs.columns))}); pass --slice_key with one of them, or "
                f"leave the default '{keys.SLICE_KEY}' to treat each file as one slice"
            )
        column = adata.obs[slice_key]
        n_missing = int(column.isna().sum())
        if n_missing:
            raise UserInputError(
                f"{source}: {n_missing} {'cell has' if n_missing == 1 else 'cells have'} no value "
                f"in obs['{slice_key}']; "
                "fill it in or drop those cells"
            )
        codes, names = pd.factorize(column.astype(str), sort=True)
        order = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]
        groups = [
            (str(name), rows.astype(np.int64))
            for name, rows in zip(names, np.split(order, bounds), strict=True)
        ]
    for name, rows in groups:
        if len(rows) < MIN_SLICE_CELLS:
            fix = (
                f"drop it (adata = adata[adata.obs['{slice_key}'] != '{name}'])"
                if len(groups) > 1 or (slice_key is not None and slice_key in adata.obs)
                else "remove the file from the inputs"
            )
            raise UserInputError(
                f"{source}: slice '{name}' has {len(rows)} {'cell' if len(rows) == 1 else 'cells'}; "
                f"every slice needs at least {MIN_SLICE_CELLS} cells; {fix}"
            )
    return groups


def _cell_labels(adata: ad.AnnData, cell_type_key: str | None, source: str) -> np.ndarray | None:
    if cell_type_key is None:
        return None
    if cell_type_key not in adata.obs:
        raise UserInputError(
            f"{source} has no obs column '{cell_type_key}' (columns: "
            f"{_quote(list(adata.obs.columns))}); pass --cell_type_key with one of them, or "
            "omit it"
        )
    column = adata.obs[cell_type_key]
    labels = column.astype(object).to_numpy()
    missing = column.isna().to_numpy()
    labels = np.where(missing, None, labels.astype(str)).astype(object)
    return labels


def _row_chunks(matrix: Any, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Dense float blocks of ``matrix`` rows (all rows when None), ``_CHUNK_ROWS`` at a time."""
    n = matrix.shape[0] if rows is None else len(rows)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        block = matrix[start:stop] if rows is None else matrix[rows[start:stop]]
        yield block.toarray() if sp.issparse(block) else np.asarray(block)


def _nonfinite_rows(matrix: Any) -> np.ndarray:
    """(N,) bool, True for a row with a NaN or infinite value."""
    if sp.issparse(matrix):
        bad_entries = np.flatnonzero(~np.isfinite(matrix.data))
        bad = np.zeros(matrix.shape[0], dtype=bool)
        bad[np.searchsorted(matrix.indptr, bad_entries, side="right") - 1] = True
        return bad
    if np.issubdtype(matrix.dtype, np.integer):
        return np.zeros(matrix.shape[0], dtype=bool)
    return np.concatenate([~np.isfinite(block).all(axis=1) for block in _row_chunks(matrix)])


def _check_finite_rows(
    bad_rows: np.ndarray, groups: list[tuple[str, np.ndarray]], source: str, what: str
) -> None:
    if not bad_rows.any():
        return
    counts = [(name, int(bad_rows[rows].sum())) for name, rows in groups]
    name, count = next((n, c) for n, c in counts if c > 0)
    total = int(bad_rows.sum())
    raise UserInputError(
        f"{source}: {total} {'cell has' if total == 1 else 'cells have'} NaN or infinite values "
        f"in {what} ({count} in slice "
        f"'{name}'); drop or fix those cells before preprocessing"
    )


def _value_summary(matrix: Any) -> tuple[bool, bool]:
    """(has a negative value, every value is an integer)."""
    values = [matrix.data] if sp.issparse(matrix) else _row_chunks(matrix)
    negative, integer = False, True
    integral_dtype = np.issubdtype(matrix.dtype, np.integer)
    for block in values:
        negative = negative or bool((block < 0).any())
        integer = integer and (integral_dtype or bool((block == np.round(block)).all()))
    return negative, integer


def _decide_normalization(
    matrix: Any, normalize: NormalizeMode, source: str, layer: str | None
) -> AppliedNormalization:
    if normalize == "none":
        return "none"
    negative, integer = _value_summary(matrix)
    if normalize == "log1p":
        if negative:
            raise UserInputError(
                f"{source}: {_matrix_label(layer)} has negative values, so it cannot be "
                "library-size normalised and log1p-transformed; use --normalize none (or auto), "
                "or pick the raw counts with --layer NAME"
            )
        return "log1p"
    if not negative and integer:
        logger.info("%s: raw counts detected; applying library-size normalisation + log1p", source)
        return "log1p"
    logger.info("%s: expression is not raw counts; using it as is", source)
    return "none"


def _row_sums(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    return np.concatenate([block.sum(axis=1, dtype=np.float64) for block in _row_chunks(matrix)])


# --------------------------------------------------------------------------------------------
# Building one prepared slice


def _gene_columns(file_genes: list[str], genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(columns in the file, columns in the model) of the model genes the file measured."""
    position = {g: i for i, g in enumerate(file_genes)}
    model_cols = np.array([j for j, g in enumerate(genes) if g in position], dtype=np.int64)
    file_cols = np.array([position[genes[j]] for j in model_cols], dtype=np.int64)
    return file_cols, model_cols


def _slice_geometry(
    positions: np.ndarray, n_dims: int | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Centred (N, n_dims) float64, centre (n_dims,) and isotropic scale of raw (N, D) coordinates.

    ``n_dims`` (default D) may exceed D: 2D input in a 3D model gets z = 0.
    """
    input_dims = positions.shape[1]
    n_dims = input_dims if n_dims is None else n_dims
    if n_dims < input_dims:
        raise ValueError(f"cannot fit {input_dims}D coordinates into {n_dims} dimensions")
    padded = np.zeros((len(positions), n_dims), dtype=np.float64)
    padded[:, :input_dims] = positions
    center = padded.mean(axis=0)
    centred = padded - center
    # One factor for every axis, so that the per-axis standard deviation is about 1.
    scale = float(np.sqrt((centred**2).sum(axis=1).mean() / input_dims))
    return centred, center, scale


def _build_slice(
    checked: _CheckedAnnData,
    name: str,
    rows: np.ndarray,
    genes: Sequence[str],
    cell_types: Sequence[str] | None,
    n_dims: int,
) -> PreparedSlice:
    file_cols, model_cols = _gene_columns(checked.genes, genes)
    expression = np.zeros((len(rows), len(genes)), dtype=np.float32)  # (N, G)
    blocks = () if checked.matrix is None else _row_chunks(checked.matrix, rows)
    for start, block in zip(range(0, len(rows), _CHUNK_ROWS), blocks, strict=False):
        block = block[:, file_cols].astype(np.float64)
        if checked.normalization == "log1p":
            library = checked.library_size[rows[start : start + len(block)]]  # type: ignore[index]
            factor = np.divide(TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)
            block = np.log1p(block * factor[:, None])
        expression[start : start + len(block), model_cols] = block
    gene_mask = np.zeros(len(genes), dtype=bool)
    gene_mask[model_cols] = True

    positions = center = scale = None
    if checked.positions is not None:
        centred, center, scale = _slice_geometry(checked.positions[rows], n_dims)
        positions = (centred / scale).astype(np.float32)

    cell_type = np.full(len(rows), -1, dtype=np.int64)
    if checked.cell_labels is not None and cell_types:
        codes = pd.Categorical(checked.cell_labels[rows], categories=list(cell_types)).codes
        cell_type = codes.astype(np.int64)
    return PreparedSlice(
        name=name,
        source=checked.source,
        obs_indices=rows,
        obs_names=np.asarray(checked.adata.obs_names[rows], dtype=str),
        expression=expression,
        gene_mask=gene_mask,
        positions=positions,
        center=center,
        scale=scale,
        input_dims=checked.input_dims,
        cell_type=cell_type,
        normalization=checked.normalization,
        missing_genes=tuple(g for g, m in zip(genes, gene_mask, strict=True) if not m),
    )


def _check_normalize(normalize: str) -> None:
    if normalize not in ("auto", "log1p", "none"):
        raise UserInputError(f"normalize must be auto, log1p or none; got {normalize!r}")


def _check_unique(names: Sequence[str], what: str) -> None:
    index = pd.Index(names)
    duplicated = index[index.duplicated()].unique()
    if len(duplicated):
        raise UserInputError(
            f"{what} has {len(duplicated)} duplicate gene names {_quote(list(duplicated))}; "
            "list every gene once"
        )


def prepare_anndata(
    adata: ad.AnnData,
    *,
    genes: Sequence[str],
    position_key: str = keys.POSITION_KEY,
    slice_key: str | None = keys.SLICE_KEY,
    cell_type_key: str | None = None,
    layer: str | None = None,
    normalize: NormalizeMode = "auto",
    require_positions: bool = True,
    cell_types: Sequence[str] | None = None,
    source: str = "input AnnData",
    n_dims: int | None = None,
    require_expression: bool = True,
) -> list[PreparedSlice]:
    """Prepare a new AnnData for an already-trained model, slice by slice.

    Same checks and transforms as :meth:`SpatialDataPreprocessor.preprocess_and_save`: the
    expression is put on ``genes`` (unmeasured genes are 0 and masked), normalised, and each
    slice's coordinates are centred and scaled with that slice's own centre and scale.

    Parameters
    ----------
    adata
        The data; ``adata.obsm[position_key]`` (N, 2|3), optional ``adata.obs[slice_key]``.
    genes
        The model's gene list (G names), usually ``metadata["genes"]`` or the checkpoint's.
    position_key, slice_key, cell_type_key, layer, normalize
        As for :class:`SpatialDataPreprocessor`.
    require_positions
        True: a missing ``position_key`` is an error. False: slices get ``positions=None``.
    cell_types
        Cell-type list to code labels into (labels not in it get -1); None = the sorted labels
        found in ``adata``.
    source
        Name used in messages; its stem names the single slice when there is no slice column.
    n_dims
        The model's spatial dimensions; None = the input's. 2D input to a 3D model gets
        z = 0; 3D input to a 2D model is an error.
    require_expression
        True: an expression problem (no matrix, no model gene, NaN, …) is an error. False
        (expression is not an input, e.g. ``pos_to_expr``): it is logged and the slices get
        zero expression with every gene masked as unmeasured.

    Returns
    -------
    list[PreparedSlice]
        One per slice, in slice-name order.
    """
    _check_normalize(normalize)
    genes = [str(g) for g in genes]
    _check_unique(genes, "the model gene list")
    checked = _check_anndata(
        adata,
        source,
        position_key=position_key,
        slice_key=slice_key,
        cell_type_key=cell_type_key,
        layer=layer,
        normalize=normalize,
        require_positions=require_positions,
        default_slice_name=Path(source).stem or "slice",
        require_expression=require_expression,
    )
    measured = set(checked.genes).intersection(genes)
    if not measured and require_expression:
        raise UserInputError(
            f"{source} measures none of the model's {len(genes)} genes (e.g. "
            f"{_quote(genes)}); check var_names (gene symbols vs. IDs)"
        )
    if measured and len(measured) < len(genes):
        logger.warning(
            "%s: %d of the model's %d genes (%.1f%%) were not measured; they are masked",
            source,
            len(genes) - len(measured),
            len(genes),
            100.0 * (len(genes) - len(measured)) / len(genes),
        )
    if cell_types is None:
        labels = checked.cell_labels
        cell_types = [] if labels is None else sorted({x for x in labels if x is not None})
    dims = checked.input_dims or MAX_DIMS
    if n_dims is not None and checked.input_dims is not None and checked.input_dims > n_dims:
        raise UserInputError(
            f"{source}: adata.obsm[{position_key!r}] has {checked.input_dims} columns, but the "
            f"model was trained on {n_dims}D coordinates; pass --position_key with "
            f"{n_dims}-column coordinates"
        )
    n_dims = dims if n_dims is None else n_dims
    return [
        _build_slice(checked, name, rows, genes, cell_types, n_dims)
        for name, rows in checked.groups
    ]


# --------------------------------------------------------------------------------------------
# The processed store


@dataclass
class _FileSummary:
    path: Path
    genes: list[str]
    slices: list[tuple[str, int]]  # (name in the file, n_cells)
    normalization: AppliedNormalization
    input_dims: int
    cell_labels: set[str]


@dataclass
class _Entry:
    """One store entry: a slice, or a part of the single slice when cells are split."""

    name: str
    split: str
    rows: np.ndarray | None = None  # rows within the slice (cell split only)


class SpatialDataPreprocessor:
    """Write ``.h5ad`` files as one processed store (see the module docstring for the layout).

    Parameters
    ----------
    gene_list
        The model's genes, in order. A gene a file lacks is masked for that file's slices;
        a gene no file has is an error. None: the genes common to all files (logged).
    position_key
        Key in ``adata.obsm`` with (N, 2) or (N, 3) coordinates; 2D is read as z = 0.
    slice_key
        Column in ``adata.obs`` naming each cell's slice. When the default ``"slice"`` is
        absent, the whole file is one slice named after the file stem; another absent key is
        an error. None: every file is one slice.
    cell_type_key
        Optional column in ``adata.obs`` with cell-type labels (coded into ``cell_types``).
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    normalize
        ``auto``: raw counts (non-negative integers) get library-size normalisation to
        ``TARGET_SUM`` + log1p, anything else is used as is. ``log1p``: always normalise +
        log1p (negative values are an error). ``none``: use as is.
    position_is_3d
        Informative: the input dimensionality is read from the data; a mismatch is logged.
    val_slices, test_slices
        Slice names held out; otherwise ``val_fraction`` / ``test_fraction`` of the slices
        (at least one when the fraction is > 0, rounded up) are drawn with ``seed``, always
        keeping at least one training slice. With a single slice overall, those fractions of
        its cells are held out instead.
    val_fraction
        None (the default): 0.1 of the cells of a single slice; of several slices, 0.1 only
        when at least ``MIN_TRAIN_SLICES_WITH_VAL`` slices are left to train on, else none.
        Few slices are worth more as training data than as a validation score (three slices,
        one for testing and one for validation, would leave one to learn from).
    seed
        Seed of the split.
    progress
        Show a progress bar over slices.

    Examples
    --------
    >>> pre = SpatialDataPreprocessor(position_key="spatial", cell_type_key="cell_type")
    >>> metadata = pre.preprocess_and_save(["embryo.h5ad"], "processed")  # doctest: +SKIP
    """

    def __init__(
        self,
        gene_list: Sequence[str] | None = None,
        position_key: str = keys.POSITION_KEY,
        slice_key: str | None = keys.SLICE_KEY,
        cell_type_key: str | None = None,
        layer: str | None = None,
        normalize: NormalizeMode = "auto",
        position_is_3d: bool = True,
        val_slices: Sequence[str] | None = None,
        test_slices: Sequence[str] | None = None,
        val_fraction: float | None = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        _check_normalize(normalize)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if value is not None and not 0.0 <= value < 1.0:
                raise UserInputError(f"--{name} must be in [0, 1); got {value}")
        held_out = (DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction) + test_fraction
        if held_out >= 1.0:
            raise UserInputError(f"--val_fraction + --test_fraction must be < 1; got {held_out}")
        if gene_list is not None:
            gene_list = [str(g) for g in gene_list]
            if not gene_list:
                raise UserInputError("the gene list is empty; list at least one gene")
            _check_unique(gene_list, "the gene list")
        overlap = set(val_slices or ()) & set(test_slices or ())
        if overlap:
            raise UserInputError(
                f"slices {_quote(sorted(overlap))} are in both --val_slices and --test_slices; "
                "hold each slice out once"
            )
        self.gene_list = gene_list
        self.position_key = position_key
        self.slice_key = slice_key
        self.cell_type_key = cell_type_key
        self.layer = layer
        self.normalize: NormalizeMode = normalize
        self.position_is_3d = position_is_3d
        self.val_slices = list(val_slices) if val_slices is not None else None
        self.test_slices = list(test_slices) if test_slices is not None else None
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.progress = progress

    def preprocess_and_save(
        self, files: Sequence[str | Path], output_dir: str | Path, overwrite: bool = False
    ) -> dict[str, Any]:
        """Check every input, then write the processed store to ``output_dir`` atomically.

        Parameters
        ----------
        files
            ``.h5ad`` files; each is read twice (checks, then writing), one at a time.
        output_dir
            Destination folder. It must not exist or be empty unless ``overwrite``; the store is
            built in a temporary sibling folder and renamed into place, so on any error nothing
            is left behind.
        overwrite
            Replace an existing non-empty ``output_dir``.

        Returns
        -------
        dict
            The metadata written to ``output_dir/metadata.json``.
        """
        if not files:
            raise UserInputError("no input files; pass --input FILE [FILE ...] or --input_dir DIR")
        paths = [Path(f) for f in files]
        output_dir = Path(output_dir)
        with writing(output_dir):
            _recover_interrupted_store(output_dir)
        check_output_dir(
            output_dir,
            overwrite=overwrite,
            inputs=paths,
            foreign=_foreign_entries,
            writer="preprocess",
        )
        seen: dict[Path, int] = {}
        for i, p in enumerate(paths):
            first = paths[seen.setdefault(p.resolve(), i)]
            if seen[p.resolve()] != i:
                same = "" if first == p else f" (as {first} and {p})"
                raise UserInputError(f"input file {p} is listed twice{same}; list each file once")

        summaries = [self._summarise(path) for path in paths]
        genes, masks = self._unify_genes(summaries)
        slice_names = _unique_slice_names(summaries)
        cell_types = sorted(set().union(*(s.cell_labels for s in summaries)))
        entries, split = self._plan_split(summaries, slice_names)

        target = output_dir.resolve()
        with writing(output_dir):
            parent_created = _make_parents(target.parent)
        tmp = temporary_sibling(target)
        try:
            with writing(output_dir):
                tmp.mkdir()
                metadata = self._write_store(
                    tmp, summaries, genes, masks, slice_names, cell_types, entries, split
                )
                _move_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in parent_created:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
        logger.info(
            "wrote %d slices (%d cells, %d genes) to %s",
            len(metadata["slices"]),
            metadata["n_cells"],
            len(genes),
            output_dir,
        )
        return metadata

    # -- pass 1: checks ----------------------------------------------------------------------

    def _check(self, path: Path, normalize: NormalizeMode | None = None) -> _CheckedAnnData:
        adata = read_h5ad(path)
        return _check_anndata(
            adata,
            str(path),
            position_key=self.position_key,
            slice_key=self.slice_key,
            cell_type_key=self.cell_type_key,
            layer=self.layer,
            normalize=self.normalize if normalize is None else normalize,
            require_positions=True,
            default_slice_name=path.stem,
        )

    def _summarise(self, path: Path) -> _FileSummary:
        checked = self._check(path)
        assert checked.input_dims is not None  # positions are required here
        if (checked.input_dims == 3) != self.position_is_3d:
            logger.info(
                "%s: coordinates have %d columns but position_is_3d=%s; using the data's %dD",
                path,
                checked.input_dims,
                self.position_is_3d,
                checked.input_dims,
            )
        labels = checked.cell_labels
        return _FileSummary(
            path=path,
            genes=checked.genes,
            slices=[(name, len(rows)) for name, rows in checked.groups],
            normalization=checked.normalization,
            input_dims=checked.input_dims,
            cell_labels=set() if labels is None else {x for x in labels if x is not None},
        )

    def _unify_genes(self, summaries: list[_FileSummary]) -> tuple[list[str], list[np.ndarray]]:
        """Model genes (G,) and one measured mask (G,) bool per file."""
        if self.gene_list is not None:
            genes = self.gene_list
            masks = [np.isin(genes, s.genes) for s in summaries]
            nowhere = [g for g, m in zip(genes, np.any(masks, axis=0), strict=True) if not m]
            if nowhere:
                raise UserInputError(
                    f"{len(nowhere)} genes of the gene list are in no input file "
                    f"{_quote(nowhere)}; remove them from --gene_list_file or check the names"
                )
            for s, mask in zip(summaries, masks, strict=True):
                if not mask.all():
                    logger.warning(
                        "%s lacks %d of the %d listed genes; they are masked for its slices",
                        s.path,
                        int((~mask).sum()),
                        len(genes),
                    )
            return genes, masks
        common = set(summaries[0].genes).intersection(*(s.genes for s in summaries[1:]))
        genes = [g for g in summaries[0].genes if g in common]
        if not genes:
            raise UserInputError(
                f"the {len(summaries)} input files have no gene in common; pass "
                "--gene_list_file to fix the genes (missing ones are masked per file)"
            )
        for s in summaries:
            dropped = len(s.genes) - len(genes)
            logger.info("%s: using %d common genes, dropping %d", s.path, len(genes), dropped)
        logger.info("using the %d genes common to all %d files", len(genes), len(summaries))
        return genes, [np.ones(len(genes), dtype=bool) for _ in summaries]

    def _plan_split(
        self, summaries: list[_FileSummary], slice_names: list[list[str]]
    ) -> tuple[list[list[list[_Entry]]], dict[str, Any]]:
        """Store entries per file per slice, and the ``split`` metadata."""
        names = [name for file_names in slice_names for name in file_names]
        val = list(self.val_slices or [])
        test = list(self.test_slices or [])
        unknown = [n for n in val + test if n not in names]
        if unknown:
            raise UserInputError(
                f"unknown slice names {_quote(unknown)} in --val_slices/--test_slices; "
                f"existing slices: {_quote(names)}"
            )
        if len(names) == 1:
            if val or test:
                raise UserInputError(
                    f"there is only one slice ('{names[0]}'), so cells are split, not slices; "
                    "use --val_fraction/--test_fraction instead of --val_slices/--test_slices"
                )
            n_cells = summaries[0].slices[0][1]
            return self._plan_cell_split(names[0], n_cells)

        rng = np.random.default_rng(self.seed)
        remaining = [n for n in names if n not in val and n not in test]
        order = [remaining[i] for i in rng.permutation(len(remaining))]
        n_test = 0 if self.test_slices is not None else _held_out(self.test_fraction, len(names))
        n_val = 0
        if self.val_slices is None:
            fraction = DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction
            n_val = _held_out(fraction, len(names))
            left = len(remaining) - n_test - n_val
            if self.val_fraction is None and left < MIN_TRAIN_SLICES_WITH_VAL:
                logger.info(
                    "no validation slice: %d slices are left to train on, fewer than %d; pass "
                    "--val_slices or --val_fraction to hold some out anyway",
                    len(remaining) - n_test,
                    MIN_TRAIN_SLICES_WITH_VAL,
                )
                n_val = 0
        while len(remaining) - n_test - n_val < 1 and n_val + n_test > 0:
            # Keep at least one training slice: give up validation slices first.
            if n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
            logger.warning("too few slices for the requested fractions; holding out fewer")
        if len(remaining) - n_test - n_val < 1:
            raise UserInputError(
                "--val_slices and --test_slices hold out every slice; leave at least one for "
                "training"
            )
        test += order[:n_test]
        val += order[n_test : n_test + n_val]
        split_of = {n: "test" if n in test else "val" if n in val else "train" for n in names}
        entries = [
            [[_Entry(name, split_of[name])] for name in file_names] for file_names in slice_names
        ]
        split = {
            "by": "slice",
            "train": [n for n in names if split_of[n] == "train"],
            "val": [n for n in names if split_of[n] == "val"],
            "test": [n for n in names if split_of[n] == "test"],
            "seed": self.seed,
        }
        return entries, split

    def _plan_cell_split(
        self, name: str, n_cells: int
    ) -> tuple[list[list[list[_Entry]]], dict[str, Any]]:
        n_test = _held_out_cells(self.test_fraction, n_cells)
        n_val = _held_out_cells(
            DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction, n_cells
        )
        if n_cells - n_test - n_val < MIN_SLICE_CELLS:
            raise UserInputError(
                f"slice '{name}' has {n_cells} cells, too few to hold out {n_val} validation and "
                f"{n_test} test cells; lower --val_fraction/--test_fraction"
            )
        permutation = np.random.default_rng(self.seed).permutation(n_cells)
        parts = {
            "val": permutation[:n_val],
            "test": permutation[n_val : n_val + n_test],
            "train": permutation[n_val + n_test :],
        }
        entries = [
            _Entry(f"{name}/{split}", split, np.sort(rows).astype(np.int64))
            for split, rows in parts.items()
            if len(rows)
        ]
        entries.sort(key=lambda e: ("train", "val", "test").index(e.split))
        split = {"by": "cells", "seed": self.seed}
        for part in ("train", "val", "test"):
            split[part] = [e.name for e in entries if e.split == part]
        logger.info(
            "one slice only: splitting its cells (%d train, %d val, %d test)",
            len(parts["train"]),
            n_val,
            n_test,
        )
        return [[entries]], split

    # -- pass 2: writing ---------------------------------------------------------------------

    def _write_store(
        self,
        root: Path,
        summaries: list[_FileSummary],
        genes: list[str],
        masks: list[np.ndarray],
        slice_names: list[list[str]],
        cell_types: list[str],
        entries: list[list[list[_Entry]]],
        split: dict[str, Any],
    ) -> dict[str, Any]:
        n_genes = len(genes)
        # 2D files give a 2D store; any 3D file makes it 3D (2D slices then get z = 0)
        n_dims = max(s.input_dims for s in summaries)
        total = np.zeros(n_genes)  # (G,) sums over train cells where measured
        total_sq = np.zeros(n_genes)
        count = np.zeros(n_genes)
        slices_meta: list[dict[str, Any]] = []
        n_entries = sum(len(e) for file_entries in entries for e in file_entries)
        with tqdm(
            total=n_entries, desc="preprocess", unit="slice", disable=not self.progress
        ) as bar:
            for summary, names, file_entries, mask in zip(
                summaries, slice_names, entries, masks, strict=True
            ):
                # Pass 2 re-reads the file and applies the normalisation decided in pass 1.
                checked = self._check(summary.path, normalize=summary.normalization)
                for (_, rows), name, slice_entries in zip(
                    checked.groups, names, file_entries, strict=True
                ):
                    prepared = _build_slice(checked, name, rows, genes, cell_types, n_dims)
                    assert np.array_equal(prepared.gene_mask, mask)
                    for entry in slice_entries:
                        part = slice(None) if entry.rows is None else entry.rows
                        k = len(slices_meta)
                        expression = prepared.expression[part]
                        _write_entry(root / "slices" / str(k), prepared, part)
                        if entry.split == "train":
                            measured = expression[:, mask].astype(np.float64)
                            total[mask] += measured.sum(axis=0)
                            total_sq[mask] += (measured**2).sum(axis=0)
                            count[mask] += len(expression)
                        slices_meta.append(
                            {
                                "name": entry.name,
                                "slice": name,
                                "source_file": str(summary.path),
                                "n_cells": len(expression),
                                "path": f"slices/{k}",
                                "split": entry.split,
                                "center": [float(c) for c in prepared.center],  # type: ignore[union-attr]
                                "scale": prepared.scale,
                                "input_dims": prepared.input_dims,
                                "normalization": prepared.normalization,
                                "gene_mask": [bool(m) for m in mask],
                            }
                        )
                        bar.update(1)
                del checked

        gene_mean, gene_std = _gene_moments(total, total_sq, count, genes)
        metadata: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "alphastomics_version": alphastomics.__version__,
            "genes": genes,
            "n_genes": n_genes,
            "n_dims": n_dims,
            "n_cells": sum(s["n_cells"] for s in slices_meta),
            "input_files": [str(s.path) for s in summaries],
            "keys": {
                "position_key": self.position_key,
                "slice_key": self.slice_key,
                "cell_type_key": self.cell_type_key,
                "layer": self.layer,
            },
            "position_is_3d": self.position_is_3d,
            "normalization": {
                "requested": self.normalize,
                "target_sum": TARGET_SUM,
                "applied": {str(s.path): s.normalization for s in summaries},
            },
            "cell_types": cell_types,
            "split": split,
            "slices": slices_meta,
            "gene_mean": gene_mean,
            "gene_std": gene_std,
            "gene_std_floor": GENE_STD_FLOOR,
        }
        (root / "metadata.json").write_text(json.dumps(metadata, indent=1))
        return metadata


def check_store(data_dir: str | Path, metadata: Any) -> None:
    """Check a store's ``metadata.json`` (already parsed) and its arrays' shapes.

    Only array headers are read. A store written by another format version is left to the
    caller's version check. Raises a :class:`UserInputError` naming the file and the key.
    """
    data_dir = Path(data_dir)
    path = data_dir / "metadata.json"
    fix = f"run preprocess again into {data_dir} (with --overwrite), or restore the file"
    if not isinstance(metadata, dict):
        raise UserInputError(
            f"{path} holds a JSON {type(metadata).__name__}, not the metadata of a processed "
            f"store; {fix}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        return
    kinds = {"genes": list, "n_genes": int, "slices": list, "split": dict}
    kinds |= {"gene_mean": list, "gene_std": list, "cell_types": list}
    for key, kind in kinds.items():
        if key not in metadata:
            raise UserInputError(f"{path} has no key {key!r}; {fix}")
        if not isinstance(metadata[key], kind) or isinstance(metadata[key], bool):
            raise UserInputError(f"{path}: {key!r} is not a JSON {kind.__name__}; {fix}")
    n_genes = len(metadata["genes"])
    for key in ("n_genes", "gene_mean", "gene_std"):
        value = metadata[key]
        count = value if key == "n_genes" else len(value)
        if count != n_genes:
            raise UserInputError(
                f"{path}: {key!r} says {count} genes but 'genes' lists {n_genes}; {fix}"
            )
    if not metadata["slices"]:
        raise UserInputError(f"{path} lists no slices; {fix}")
    n_dims = metadata.get("n_dims", MAX_DIMS)
    for k, info in enumerate(metadata["slices"]):
        _check_store_entry(data_dir, path, k, info, (n_genes, n_dims), fix)


def _check_store_entry(
    data_dir: Path, path: Path, k: int, info: Any, sizes: tuple[int, int], fix: str
) -> None:
    n_genes, n_dims = sizes
    where = f"{path}: slices[{k}]"
    if not isinstance(info, dict):
        raise UserInputError(f"{where} is not a JSON object; {fix}")
    for key in ("name", "path", "n_cells", "split", "gene_mask"):
        if key not in info:
            raise UserInputError(f"{where} has no key {key!r}; {fix}")
    n_cells = info["n_cells"]
    if not isinstance(n_cells, int) or isinstance(n_cells, bool) or n_cells < 1:
        raise UserInputError(f"{where}: 'n_cells' must be a positive whole number; {fix}")
    if info["split"] not in ("train", "val", "test"):
        raise UserInputError(f"{where}: 'split' must be train, val or test; {fix}")
    if not isinstance(info["gene_mask"], list) or len(info["gene_mask"]) != n_genes:
        raise UserInputError(f"{where}: 'gene_mask' must list {n_genes} booleans; {fix}")
    if not isinstance(info["path"], str):
        raise UserInputError(f"{where}: 'path' is not a string; {fix}")
    folder = data_dir / info["path"]
    expected = {
        "expression": (n_cells, n_genes),
        "positions": (n_cells, n_dims),
        "cell_type": (n_cells,),
        "obs_names": (n_cells,),
    }
    for name, shape in expected.items():
        file = folder / f"{name}.npy"
        try:
            found = np.load(file, mmap_mode="r").shape
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserInputError(
                f"cannot read {file} ({reason}); the store is damaged, {fix}"
            ) from err
        if tuple(found) != shape:
            raise UserInputError(
                f"{file} has shape {tuple(found)}, but {path} says {shape} (slice "
                f"{info['name']!r}); the store is damaged, {fix}"
            )


def _held_out(fraction: float, n: int) -> int:
    return math.ceil(fraction * n) if fraction > 0 else 0


def _held_out_cells(fraction: float, n: int) -> int:
    return max(MIN_SLICE_CELLS, round(fraction * n)) if fraction > 0 else 0


def _unique_slice_names(summaries: list[_FileSummary]) -> list[list[str]]:
    """Slice names per file; names that occur in several files get a ``<file stem>/`` prefix."""
    seen: dict[str, int] = {}
    for s in summaries:
        for name, _ in s.slices:
            seen[name] = seen.get(name, 0) + 1
    result = []
    for s in summaries:
        names = []
        for name, _ in s.slices:
            if seen[name] > 1:
                renamed = f"{s.path.stem}/{name}"
                logger.warning("slice '%s' is in several files; renamed '%s'", name, renamed)
                name = renamed
            names.append(name)
        result.append(names)
    flat = [n for names in result for n in names]
    if len(set(flat)) < len(flat):
        raise UserInputError(
            "slice names are not unique across files even after prefixing the file stem; "
            "rename the files or the slices"
        )
    return result


def _gene_moments(
    total: np.ndarray, total_sq: np.ndarray, count: np.ndarray, genes: list[str]
) -> tuple[list[float], list[float]]:
    """Per-gene mean and std (floored at ``GENE_STD_FLOOR``) over train cells where measured."""
    unseen = count == 0
    if unseen.any():
        logger.warning(
            "%d genes are measured in no training slice %s; their mean/std are set to 0/1",
            int(unseen.sum()),
            _quote([g for g, u in zip(genes, unseen, strict=True) if u]),
        )
    n = np.maximum(count, 1)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std = np.maximum(std, GENE_STD_FLOOR)
    mean[unseen], std[unseen] = 0.0, 1.0
    return [float(m) for m in mean], [float(s) for s in std]


def _write_entry(folder: Path, prepared: PreparedSlice, part: slice | np.ndarray) -> None:
    folder.mkdir(parents=True)
    np.save(folder / "expression.npy", np.ascontiguousarray(prepared.expression[part]))
    np.save(folder / "positions.npy", np.ascontiguousarray(prepared.positions[part]))  # type: ignore[index]
    np.save(folder / "cell_type.npy", np.ascontiguousarray(prepared.cell_type[part]))
    np.save(folder / "obs_names.npy", np.ascontiguousarray(prepared.obs_names[part]))


STORE_ARRAYS = ("expression.npy", "positions.npy", "cell_type.npy", "obs_names.npy")


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that are not part of a processed store."""
    foreign = [
        p.name for p in sorted(folder.iterdir()) if p.name not in ("metadata.json", "slices")
    ]
    slices = folder / "slices"
    if slices.is_symlink() or (slices.exists() and not slices.is_dir()):
        return [*foreign, "slices"]
    if slices.is_dir():
        for entry in sorted(slices.iterdir()):
            ours = (
                entry.is_dir()
                and not entry.is_symlink()
                and entry.name.isdigit()
                and all(f.name in STORE_ARRAYS for f in entry.iterdir())
            )
            if not ours:
                foreign.append(f"slices/{entry.name}")
    return foreign


def _recover_interrupted_store(output_dir: Path) -> None:
    """Clean up after a preprocess run that died (SIGKILL, power loss) writing ``output_dir``.

    Its half-written temporary store is removed; a previous store it had moved aside to replace
    is put back when nothing took its place, else removed.
    """
    target = output_dir.resolve()
    remove_stale_siblings(target, "tmp")
    for old, pid in stale_siblings(target, "old"):
        if target.exists():
            logger.info("removing %s, the store replaced by process %d", old, pid)
            shutil.rmtree(old, ignore_errors=True)
        else:
            logger.warning(
                "putting back %s: process %d moved it aside to replace it and died", target, pid
            )
            os.replace(old, target)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created, deepest first."""
    created = []
    current = folder
    while not current.exists():
        created.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    """Rename ``tmp`` to ``output_dir``, replacing an existing folder only after success."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    old = temporary_sibling(output_dir, "old")
    os.replace(output_dir, old)
    try:
        os.replace(tmp, output_dir)
    except BaseException:
        os.replace(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
