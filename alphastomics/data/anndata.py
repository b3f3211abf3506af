"""Read, check and normalise AnnData: from an ``.h5ad`` to :class:`PreparedSlice` arrays.

Every problem with an input is a one-line :class:`UserInputError` naming the file, key or value.
:class:`~alphastomics.data.preprocess.SpatialDataPreprocessor` runs these steps over many files
to write a store; :func:`prepare_anndata` runs them on a new AnnData for a trained model. One
module (over 500 lines) so that training and new inputs pass the very same checks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from alphastomics import keys
from alphastomics.errors import UserInputError

if TYPE_CHECKING:  # torch is imported on use: preprocessing runs without it
    from alphastomics.data.batch import DataHolder

logger = logging.getLogger(__name__)

NormalizeMode = Literal["auto", "log1p", "none"]

AppliedNormalization = Literal["log1p", "none"]

TARGET_SUM = 1e4  # library size after normalisation (scanpy's normalize_total target_sum)

MAX_DIMS = 3  # coordinates have 2 or 3 columns; a store of 2D files keeps 2

MIN_SLICE_CELLS = 3  # fewest cells of a slice (or held-out part): position metrics need 3

_CHUNK_ROWS = 8192  # rows densified at a time

_MAX_LISTED = 5  # names quoted in an error message

FrameChoice = Literal["auto", "training", "own"]

# an input within the training extent widened by this share of it on each axis is read in the
# training frame: a neighbouring block of a registered volume is; another origin (coordinates of
# another specimen or system, usually far away) is not
FRAME_MARGIN = 1.0


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
    in_training_frame
        True when ``center`` and ``scale`` are the model's training frame's, not the slice's own.
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
    in_training_frame: bool = False

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

    def batch(self, n_dims: int) -> DataHolder:
        """The slice as a one-item batch: expression, gene mask and positions, zeros (N,
        ``n_dims``) where it has none (modes that generate them never read them)."""
        from alphastomics.data.batch import DataHolder

        positions = self.positions
        if positions is None:
            positions = np.zeros((self.n_cells, n_dims), np.float32)
        return DataHolder.from_arrays(self.expression, positions, gene_mask=self.gene_mask)

    def arrays(self, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
        """The store entry of ``rows`` (see :data:`alphastomics.data.store.ENTRY_ARRAYS`)."""
        assert self.positions is not None
        return {
            "expression": self.expression[rows],
            "positions": self.positions[rows],
            "cell_type": self.cell_type[rows],
            "obs_names": self.obs_names[rows],
        }


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


@dataclass
class CheckedAnnData:
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


def quote_names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"


def check_anndata(
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
) -> CheckedAnnData:
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
    return CheckedAnnData(
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
            f"{quote_names(list(duplicated))}; make them unique (adata.var_names_make_unique()) "
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
                f"{source} has no layer '{layer}' (layers: {quote_names(list(adata.layers))}); "
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
            f"existing keys: {quote_names(existing)}; pass --position_key {_likely_key(adata)}"
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
                f"{quote_names(list(adata.obs.columns))}); pass --slice_key with one of them, or "
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
            f"{quote_names(list(adata.obs.columns))}); pass --cell_type_key with one of them, or "
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


def _gene_columns(file_genes: list[str], genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(columns in the file, columns in the model) of the model genes the file measured."""
    position = {g: i for i, g in enumerate(file_genes)}
    model_cols = np.array([j for j, g in enumerate(genes) if g in position], dtype=np.int64)
    file_cols = np.array([position[genes[j]] for j in model_cols], dtype=np.int64)
    return file_cols, model_cols


@dataclass(frozen=True)
class TrainingFrame:
    """The one coordinate frame of a model trained on one slice or volume, in the user's units.

    Such a model reads absolute positions (registered coordinates: one frame, whose
    orientation and places it learns), so new coordinates in that frame must be centred and
    scaled as the training data were, not each input on its own.

    Attributes
    ----------
    center
        (D,) the training slice's centre; D is the model's number of dimensions.
    scale
        Its isotropic scale: ``user = model * scale + center``.
    low, high
        (D,) corners of the bounding box of the training cells.
    """

    center: tuple[float, ...]
    scale: float
    low: tuple[float, ...]
    high: tuple[float, ...]

    def holds(self, positions: np.ndarray) -> bool:
        """Whether raw coordinates (N, d <= D) lie in the training box, widened on each axis by
        :data:`FRAME_MARGIN` of its extent (2D input gets z = 0, as the model reads it)."""
        padded = np.zeros((len(positions), len(self.center)))
        padded[:, : positions.shape[1]] = positions
        low, high = np.asarray(self.low), np.asarray(self.high)
        slack = FRAME_MARGIN * (high - low) + 1e-6 * self.scale
        return bool(np.all(padded.min(axis=0) >= low - slack)) and bool(
            np.all(padded.max(axis=0) <= high + slack)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types (stored in a checkpoint's hyper-parameters)."""
        return {
            "center": list(self.center),
            "scale": self.scale,
            "low": list(self.low),
            "high": list(self.high),
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> TrainingFrame | None:
        """The frame :meth:`to_dict` wrote; None for None (a model of several frames)."""
        if not saved:
            return None
        return cls(
            center=tuple(float(c) for c in saved["center"]),
            scale=float(saved["scale"]),
            low=tuple(float(c) for c in saved["low"]),
            high=tuple(float(c) for c in saved["high"]),
        )


def _slice_geometry(
    positions: np.ndarray, n_dims: int | None = None, frame: TrainingFrame | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Centred (N, n_dims) float64, centre (n_dims,) and isotropic scale of raw (N, D) coordinates.

    ``n_dims`` (default D) may exceed D: 2D input in a 3D model gets z = 0. The centre and
    scale are the slice's own, or ``frame``'s when given.
    """
    input_dims = positions.shape[1]
    n_dims = input_dims if n_dims is None else n_dims
    if n_dims < input_dims:
        raise ValueError(f"cannot fit {input_dims}D coordinates into {n_dims} dimensions")
    padded = np.zeros((len(positions), n_dims), dtype=np.float64)
    padded[:, :input_dims] = positions
    if frame is not None:
        center = np.asarray(frame.center, dtype=np.float64)
        return padded - center, center, frame.scale
    center = padded.mean(axis=0)
    centred = padded - center
    # One factor for every axis, so that the per-axis standard deviation is about 1.
    scale = float(np.sqrt((centred**2).sum(axis=1).mean() / input_dims))
    return centred, center, scale


def _reading_frame(
    checked: CheckedAnnData,
    name: str,
    rows: np.ndarray,
    frame: TrainingFrame | None,
    choice: FrameChoice,
) -> TrainingFrame | None:
    """The training frame a slice's coordinates are read in, or None (its own centre and
    scale); ``auto`` takes the training frame when the slice lies within it, and logs it."""
    if frame is None or checked.positions is None or choice == "own":
        return None
    if choice == "training":
        return frame
    if frame.holds(checked.positions[rows]):
        logger.info(
            "%s: slice %r read in the model's training frame (its coordinates lie within the "
            "training data's extent; --frame own reads it centred and scaled on its own)",
            checked.source,
            name,
        )
        return frame
    logger.warning(
        "%s: slice %r lies outside the extent of the single slice or volume the model was "
        "trained on, so it is read centred and scaled on its own; pass --frame training if "
        "its coordinates are registered to the training data",
        checked.source,
        name,
    )
    return None


def build_slice(
    checked: CheckedAnnData,
    name: str,
    rows: np.ndarray,
    genes: Sequence[str],
    cell_types: Sequence[str] | None,
    n_dims: int,
    frame: TrainingFrame | None = None,
) -> PreparedSlice:
    """One slice's arrays on the model's genes; coordinates centred and scaled on their own, or
    in ``frame`` when given."""
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
        centred, center, scale = _slice_geometry(checked.positions[rows], n_dims, frame)
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
        in_training_frame=frame is not None and positions is not None,
    )


def check_normalize(normalize: str) -> None:
    if normalize not in ("auto", "log1p", "none"):
        raise UserInputError(f"normalize must be auto, log1p or none; got {normalize!r}")


def check_unique(names: Sequence[str], what: str) -> None:
    index = pd.Index(names)
    duplicated = index[index.duplicated()].unique()
    if len(duplicated):
        raise UserInputError(
            f"{what} has {len(duplicated)} duplicate gene names {quote_names(list(duplicated))}; "
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
    frame: TrainingFrame | None = None,
    frame_choice: FrameChoice = "auto",
) -> list[PreparedSlice]:
    """Prepare a new AnnData for an already-trained model, slice by slice.

    Same checks and transforms as :meth:`SpatialDataPreprocessor.preprocess_and_save`: the
    expression is put on ``genes`` (unmeasured genes are 0 and masked), normalised, and each
    slice's coordinates are centred and scaled with that slice's own centre and scale, or
    with the model's ``frame`` (see ``frame_choice``).

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
    frame
        The :class:`TrainingFrame` of a model trained on one slice or volume; None for a model
        of several slices (each input slice is then read on its own).
    frame_choice
        ``auto``: a slice whose coordinates lie within ``frame`` is read in it, any other on
        its own (logged either way); ``training``: every slice in ``frame``; ``own``: every
        slice on its own.

    Returns
    -------
    list[PreparedSlice]
        One per slice, in slice-name order.
    """
    check_normalize(normalize)
    genes = [str(g) for g in genes]
    check_unique(genes, "the model gene list")
    checked = check_anndata(
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
            f"{quote_names(genes)}); check var_names (gene symbols vs. IDs)"
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
        build_slice(
            checked,
            name,
            rows,
            genes,
            cell_types,
            n_dims,
            _reading_frame(checked, name, rows, frame, frame_choice),
        )
        for name, rows in checked.groups
    ]
