"""The processed store: its format, its one writer and its one reader.

Layout::

    OUT/metadata.json
    OUT/slices/<k>/expression.npy   float32 (N, G) normalised, model gene order, unmeasured = 0
    OUT/slices/<k>/positions.npy    float32 (N, D) centred and scaled, D = metadata n_dims
    OUT/slices/<k>/cell_type.npy    int64 (N,) codes into metadata["cell_types"], -1 = unknown
    OUT/slices/<k>/obs_names.npy    unicode (N,) the input obs_names

A store is built in a temporary sibling folder (:func:`building_store`) and renamed into place,
so a reader never sees half of one. :class:`ProcessedStore` reads it lazily, one entry at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from alphastomics.data.anndata import MAX_DIMS, TrainingFrame
from alphastomics.errors import UserInputError
from alphastomics.utils.io import (
    remove_stale_siblings,
    stale_siblings,
    temporary_sibling,
    writing,
)

if TYPE_CHECKING:  # torch is imported on use: preprocessing runs without it
    from alphastomics.data.batch import DataHolder

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]

FORMAT_VERSION = 1

ENTRY_ARRAYS = ("expression", "positions", "cell_type", "obs_names")  # the arrays of an entry
STORE_ARRAYS = tuple(f"{name}.npy" for name in ENTRY_ARRAYS)


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


@contextmanager
def building_store(output_dir: str | Path) -> Iterator[Path]:
    """A new, empty folder to write a store into; renamed to ``output_dir`` when the block ends.

    The folder is a temporary sibling of ``output_dir``; an existing ``output_dir`` is replaced
    only after the rename succeeds. On any error the temporary folder, and parent folders this
    made, are removed, and a failed write (full disk, read-only folder) is an
    :class:`~alphastomics.errors.OutputWriteError` naming ``output_dir``.
    """
    output_dir = Path(output_dir)
    target = output_dir.resolve()
    with writing(output_dir):
        parent_created = _make_parents(target.parent)
    tmp = temporary_sibling(target)
    try:
        with writing(output_dir):
            tmp.mkdir()
            yield tmp
            _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in parent_created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def write_entry(root: Path, k: int, arrays: Mapping[str, np.ndarray]) -> str:
    """Write entry ``k``'s :data:`ENTRY_ARRAYS` under ``root``; returns its metadata ``path``."""
    path = f"slices/{k}"
    folder = root / path
    folder.mkdir(parents=True)
    for name in ENTRY_ARRAYS:
        np.save(folder / f"{name}.npy", np.ascontiguousarray(arrays[name]))
    return path


def write_metadata(root: Path, metadata: dict[str, Any]) -> None:
    """Write ``root/metadata.json`` (last, once every entry is written)."""
    (root / "metadata.json").write_text(json.dumps(metadata, indent=1))


def foreign_entries(folder: Path) -> list[str]:
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


def recover_interrupted_store(output_dir: Path) -> None:
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


@dataclass(frozen=True)
class DataInfo:
    """What a checkpoint remembers of the store it was trained on (``hparams["data_info"]``),
    so ``sample``, ``test`` and ``extract`` need no extra flags.

    Attributes
    ----------
    keys
        AnnData keys used at preprocess time (``position_key``, ``slice_key``, ``cell_type_key``,
        ``layer``): the defaults for new files.
    normalization
        What preprocess did to the expression (``applied``, ``target_sum``, ...), so new files
        are normalised the same way.
    cell_types
        Names of the cell-type codes.
    typical_scale
        Median scale of the store's slices: the size of a generated slice without a reference.
    n_training_frames
        Distinct training slices or volumes (:func:`training_frames`; None: not recorded).
    frame
        :meth:`TrainingFrame.to_dict` of the one training slice or volume
        (:meth:`ProcessedStore.training_frame`); None for several, or not recorded.
    """

    keys: dict[str, str | None] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    cell_types: list[str] = field(default_factory=list)
    typical_scale: float = 1.0
    n_training_frames: int | None = None
    frame: dict[str, Any] | None = None

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], frame: TrainingFrame | None = None
    ) -> DataInfo:
        """Summarise a store's ``metadata.json`` (and its training ``frame``, when it has one)."""
        scales = sorted(float(s["scale"]) for s in metadata["slices"])
        return cls(
            keys=dict(metadata.get("keys", {})),
            normalization=dict(metadata.get("normalization", {})),
            cell_types=list(metadata.get("cell_types", [])),
            typical_scale=scales[len(scales) // 2] if scales else 1.0,
            n_training_frames=training_frames(metadata),
            frame=None if frame is None else frame.to_dict(),
        )

    @property
    def training_frame(self) -> TrainingFrame | None:
        """The recorded frame of a model trained on one slice or volume."""
        return TrainingFrame.from_dict(self.frame)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any] | None) -> DataInfo:
        """Read the dict form back; fields an older checkpoint lacks keep their defaults, and
        fields this version no longer keeps are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in known and v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (it is stored in the checkpoint's hyperparameters)."""
        return asdict(self)


def training_frames(metadata: Mapping[str, Any]) -> int:
    """Distinct slices (frames) among a store's training entries: cell-split entries of one
    slice (``<slice>/train``, ...) are one frame."""
    return len({s.get("slice", s["name"]) for s in metadata["slices"] if s["split"] == "train"})


@dataclass(frozen=True)
class StoreSlice:
    """Arrays of one store entry (memory-mapped when loaded with ``mmap=True``).

    Attributes
    ----------
    index
        Position of the entry in ``metadata["slices"]``.
    name
        Entry name (``metadata["slices"][index]["name"]``).
    expression
        (N, G) float32 normalised expression; unmeasured genes are 0.
    positions
        (N, 3) float32 centred and scaled coordinates.
    cell_type
        (N,) int64 codes into ``metadata["cell_types"]``, -1 = unknown.
    obs_names
        (N,) str obs_names of the input cells.
    gene_mask
        (G,) bool, True for a gene the slice measured.
    """

    index: int
    name: str
    expression: np.ndarray
    positions: np.ndarray
    cell_type: np.ndarray
    obs_names: np.ndarray
    gene_mask: np.ndarray

    @property
    def n_cells(self) -> int:
        """Number of cells N."""
        return self.expression.shape[0]

    def batch(self) -> DataHolder:
        """The entry as a one-item batch (cell types and ``slice_index`` = :attr:`index`)."""
        from alphastomics.data.batch import DataHolder

        return DataHolder.from_arrays(
            self.expression,
            self.positions,
            gene_mask=self.gene_mask,
            cell_type=self.cell_type,
            slice_index=self.index,
        )


class ProcessedStore:
    """Read-only view of a store written by :class:`SpatialDataPreprocessor`.

    Parameters
    ----------
    data_dir
        Folder holding ``metadata.json`` and ``slices/``.

    Examples
    --------
    >>> store = ProcessedStore("processed")  # doctest: +SKIP
    >>> first = store.load_slice(store.slice_indices("train")[0])  # doctest: +SKIP
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        path = self.data_dir / "metadata.json"
        if not path.is_file():
            raise UserInputError(
                f"{self.data_dir} is not a processed store (no metadata.json); run "
                "`alphastomics preprocess --output_dir DIR` and pass that DIR as --data_dir"
            )
        try:
            self.metadata: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path} is not valid JSON; run preprocess again") from err
        check_store(self.data_dir, self.metadata)
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise UserInputError(
                f"{self.data_dir} has store format {version}, this alphastomics reads format "
                f"{FORMAT_VERSION}; run preprocess again with this version"
            )

    @property
    def n_genes(self) -> int:
        """Number of genes G."""
        return int(self.metadata["n_genes"])

    @property
    def gene_names(self) -> list[str]:
        """The model's genes, in order."""
        return list(self.metadata["genes"])

    @property
    def n_slices(self) -> int:
        """Number of store entries."""
        return len(self.metadata["slices"])

    def slice_indices(self, split: Split | None = None) -> list[int]:
        """Indices of the entries of ``split`` (all entries when None)."""
        return [
            k
            for k, info in enumerate(self.metadata["slices"])
            if split is None or info["split"] == split
        ]

    def slice_names(self, split: Split | None = None) -> list[str]:
        """Names of the entries of ``split`` (all entries when None)."""
        return [self.metadata["slices"][k]["name"] for k in self.slice_indices(split)]

    def n_cells(self, index: int) -> int:
        """Number of cells of entry ``index``."""
        return int(self.metadata["slices"][index]["n_cells"])

    def training_frame(self) -> TrainingFrame | None:
        """The frame of the training entries when they are one slice or volume (cell-split
        parts of one slice share its centre and scale); None for several slices."""
        train = self.slice_indices("train")
        if training_frames(self.metadata) != 1 or not train:
            return None
        info = self.metadata["slices"][train[0]]
        center, scale = np.asarray(info["center"], dtype=np.float64), float(info["scale"])
        boxes = []
        for index in train:
            positions = np.asarray(self.load_slice(index).positions, dtype=np.float64)
            if len(positions):
                boxes.append((positions.min(axis=0), positions.max(axis=0)))
        if not boxes:
            return None
        low = np.min([b[0] for b in boxes], axis=0) * scale + center
        high = np.max([b[1] for b in boxes], axis=0) * scale + center
        return TrainingFrame(
            center=tuple(center.tolist()),
            scale=scale,
            low=tuple(low.tolist()),
            high=tuple(high.tolist()),
        )

    def load_slice(self, index: int, mmap: bool = True) -> StoreSlice:
        """Arrays of entry ``index``; with ``mmap`` nothing is read until indexed."""
        info = self.metadata["slices"][index]
        folder = self.data_dir / info["path"]
        mode = "r" if mmap else None

        def load(name: str) -> np.ndarray:
            try:
                return np.load(folder / f"{name}.npy", mmap_mode=mode)
            except (OSError, ValueError) as err:
                raise UserInputError(
                    f"cannot read {folder / name}.npy ({err}); the store is damaged, run "
                    "preprocess again"
                ) from err

        return StoreSlice(
            index=index,
            name=info["name"],
            expression=load("expression"),
            positions=load("positions"),
            cell_type=load("cell_type"),
            obs_names=load("obs_names"),
            gene_mask=np.asarray(info["gene_mask"], dtype=bool),
        )
