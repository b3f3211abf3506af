"""`preprocess`: ``.h5ad`` files -> one processed store (one gene list, a train/val/test split).

Pass 1 checks every file and plans genes and split; pass 2 re-reads each file, one at a time,
and writes its slices through :mod:`alphastomics.data.store`. The two passes share the plan
they make (genes, split, per-file summaries), so they stay in one class (over 500 lines).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import alphastomics
from alphastomics import keys
from alphastomics.data.anndata import (
    MIN_SLICE_CELLS,
    TARGET_SUM,
    AppliedNormalization,
    CheckedAnnData,
    NormalizeMode,
    build_slice,
    check_anndata,
    check_normalize,
    check_unique,
    quote_names,
    read_h5ad,
)
from alphastomics.data.store import (
    FORMAT_VERSION,
    building_store,
    foreign_entries,
    recover_interrupted_store,
    write_entry,
    write_metadata,
)
from alphastomics.errors import UserInputError
from alphastomics.utils.io import (
    check_output_dir,
    writing,
)

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1

MIN_TRAIN_SLICES_WITH_VAL = 5  # the default holds out validation slices only above this

GENE_STD_FLOOR = 1e-2  # gene_std floor: flatter genes carry no signal; keeps z-scores bounded


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
        check_normalize(normalize)
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
            check_unique(gene_list, "the gene list")
        overlap = set(val_slices or ()) & set(test_slices or ())
        if overlap:
            raise UserInputError(
                f"slices {quote_names(sorted(overlap))} are in both --val_slices and --test_slices; "
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
            recover_interrupted_store(output_dir)
        check_output_dir(
            output_dir,
            overwrite=overwrite,
            inputs=paths,
            foreign=foreign_entries,
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

        with building_store(output_dir) as tmp:
            metadata = self._write_store(
                tmp, summaries, genes, masks, slice_names, cell_types, entries, split
            )
        logger.info(
            "wrote %d slices (%d cells, %d genes) to %s",
            len(metadata["slices"]),
            metadata["n_cells"],
            len(genes),
            output_dir,
        )
        return metadata

    # -- pass 1: checks ----------------------------------------------------------------------

    def _check(self, path: Path, normalize: NormalizeMode | None = None) -> CheckedAnnData:
        adata = read_h5ad(path)
        return check_anndata(
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
                    f"{quote_names(nowhere)}; remove them from --gene_list_file or check the names"
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
                f"unknown slice names {quote_names(unknown)} in --val_slices/--test_slices; "
                f"existing slices: {quote_names(names)}"
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
            total=n_entries,
            desc="preprocess",
            unit="slice",
            disable=None if self.progress else True,
        ) as bar:
            for summary, names, file_entries, mask in zip(
                summaries, slice_names, entries, masks, strict=True
            ):
                # Pass 2 re-reads the file and applies the normalisation decided in pass 1.
                checked = self._check(summary.path, normalize=summary.normalization)
                for (_, rows), name, slice_entries in zip(
                    checked.groups, names, file_entries, strict=True
                ):
                    prepared = build_slice(checked, name, rows, genes, cell_types, n_dims)
                    assert np.array_equal(prepared.gene_mask, mask)
                    for entry in slice_entries:
                        part = slice(None) if entry.rows is None else entry.rows
                        k = len(slices_meta)
                        expression = prepared.expression[part]
                        path = write_entry(root, k, prepared.arrays(part))
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
                                "path": path,
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
        write_metadata(root, metadata)
        return metadata


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
            quote_names([g for g, u in zip(genes, unseen, strict=True) if u]),
        )
    n = np.maximum(count, 1)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std = np.maximum(std, GENE_STD_FLOOR)
    mean[unseen], std[unseen] = 0.0, 1.0
    return [float(m) for m in mean], [float(s) for s in std]
