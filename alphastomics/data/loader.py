"""Lazy reading of a processed store and the train/val/test DataLoaders (slice and cell modes).

Every item is a single-item :class:`DataHolder` (B = 1); batches are padded by
:func:`collate_holders`. All randomness comes from the samplers: each epoch's item list is drawn
from a generator seeded with ``(seed, epoch)`` in the main process, and each item carries its own
seed, so items are the same for any ``num_workers``.

Distributed training: every rank builds the same per-epoch item list and keeps the share
``items[rank::world_size]`` (the list is first padded by wrapping so all ranks get the same
number). Pass ``rank``/``world_size`` to :func:`create_dataloaders`, or leave them None to read
them from ``torch.distributed`` when iterating; with Lightning, set
``Trainer(use_distributed_sampler=False)`` so it keeps these samplers (Lightning calls their
``set_epoch`` every epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, Dataset, Sampler

from alphastomics.data.batch import DataHolder, collate_holders
from alphastomics.data.store import ProcessedStore, StoreSlice
from alphastomics.errors import UserInputError

logger = logging.getLogger(__name__)

DataMode = Literal["slice", "cell"]
ItemKind = Literal["slice", "random", "neighborhood"]
_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class ItemKey:
    """What one item is; samplers yield these and :class:`SpatialDataset` turns them into data.

    Attributes
    ----------
    slice_index
        Store entry the cells come from.
    kind
        ``slice``: the whole entry (or a random ``n_cells`` subset); ``random``: ``n_cells``
        random cells; ``neighborhood``: the ``n_cells`` cells nearest a random centre cell.
    n_cells
        Cells wanted (None = all); never more than the entry has.
    seed
        Seed of the item's own draws.
    """

    slice_index: int
    kind: ItemKind
    n_cells: int | None
    seed: int


class SpatialDataset(Dataset):
    """Map-style dataset indexed by :class:`ItemKey`; returns single-item ``DataHolder``s.

    Positions stay in the store's per-slice frame (a part of a slice keeps its place in it;
    the noise model centres what it noises). Only the rows an item needs are read
    from the memory-mapped expression file. Memory maps and k-d trees (one per entry, built on
    first use) are cached per process and never pickled to workers.
    """

    def __init__(self, store: ProcessedStore) -> None:
        self.store = store
        self._slices: dict[int, StoreSlice] = {}
        self._trees: dict[int, cKDTree] = {}

    def __len__(self) -> int:
        return self.store.n_slices

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "_slices": {}, "_trees": {}}

    def _slice(self, index: int) -> StoreSlice:
        if index not in self._slices:
            self._slices[index] = self.store.load_slice(index, mmap=True)
        return self._slices[index]

    def _tree(self, index: int) -> cKDTree:
        if index not in self._trees:
            self._trees[index] = cKDTree(np.asarray(self._slice(index).positions))
        return self._trees[index]

    def cell_rows(self, key: ItemKey) -> np.ndarray:
        """Sorted (n,) int64 rows of the entry that make up item ``key``."""
        n_total = self.store.n_cells(key.slice_index)
        n = n_total if key.n_cells is None else min(key.n_cells, n_total)
        if n == n_total:
            return np.arange(n_total, dtype=np.int64)
        rng = np.random.default_rng(key.seed)
        if key.kind == "neighborhood":
            positions = self._slice(key.slice_index).positions
            centre = np.asarray(positions[rng.integers(n_total)], dtype=np.float64)  # (3,)
            _, rows = self._tree(key.slice_index).query(centre, k=n)
        else:
            rows = rng.choice(n_total, size=n, replace=False)
        return np.sort(np.asarray(rows, dtype=np.int64))

    def __getitem__(self, key: ItemKey) -> DataHolder:
        data = self._slice(key.slice_index)
        rows = self.cell_rows(key)  # (n,)
        if len(rows) == data.n_cells:
            expression = np.array(data.expression, dtype=np.float32)
            positions = np.array(data.positions, dtype=np.float64)
            cell_type = np.array(data.cell_type, dtype=np.int64)
        else:
            expression = np.asarray(data.expression[rows], dtype=np.float32)  # reads n rows
            positions = np.asarray(data.positions[rows], dtype=np.float64)
            cell_type = np.asarray(data.cell_type[rows], dtype=np.int64)
        n = len(rows)
        return DataHolder(
            expression=torch.from_numpy(expression).unsqueeze(0),  # (1, n, G)
            positions=torch.from_numpy(positions.astype(np.float32)).unsqueeze(0),  # (1, n, 3)
            node_mask=torch.ones(1, n, dtype=torch.bool),
            gene_mask=torch.from_numpy(data.gene_mask.copy()).unsqueeze(0),  # (1, G)
            cell_type=torch.from_numpy(cell_type).unsqueeze(0),  # (1, n)
            cell_index=torch.from_numpy(rows).unsqueeze(0),  # (1, n)
            slice_index=torch.tensor([key.slice_index], dtype=torch.long),  # (1,)
        )


# --------------------------------------------------------------------------------------------
# Samplers


def _fixed_seed(seed: int, slice_index: int) -> int:
    return int(np.random.SeedSequence([seed, slice_index]).generate_state(1, np.uint64)[0] >> 1)


class SamplerOptions(TypedDict, total=False):
    """Keyword options every item sampler passes on to :class:`_ItemSampler`."""

    items_per_epoch: int | None
    seed: int
    rank: int | None
    world_size: int | None


class _ItemSampler(Sampler[ItemKey]):
    """Per-epoch list of :class:`ItemKey`, drawn from ``(seed, epoch)``, sharded over ranks.

    Parameters
    ----------
    indices
        Store entries to draw from.
    items_per_epoch
        Items per epoch; None = the sampler's own count (see its ``_n_items``).
    seed, rank, world_size
        See the module docstring.
    """

    def __init__(
        self,
        indices: Sequence[int],
        *,
        items_per_epoch: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if world_size is not None and world_size < 1:
            raise UserInputError(f"world_size must be >= 1; got {world_size}")
        if rank is not None and not 0 <= rank < (world_size or rank + 1):
            raise UserInputError(f"rank must be in [0, world_size); got {rank} of {world_size}")
        self.indices = list(indices)
        self.items_per_epoch = items_per_epoch
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self._skip: tuple[int, int] | None = None  # (epoch, items) to leave out of one pass

    def set_epoch(self, epoch: int) -> None:
        """Use the items of ``epoch`` (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (
                rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
            )
            world_size = world_size or (torch.distributed.get_world_size() if distributed else 1)
        return rank, world_size

    def _n_items(self) -> int:
        raise NotImplementedError

    def _items(self, rng: np.random.Generator) -> list[ItemKey]:
        raise NotImplementedError

    def items(self) -> list[ItemKey]:
        """This rank's items of the current epoch, in order."""
        everything = self._items(np.random.default_rng([self.seed, self.epoch]))
        rank, world_size = self._shard()
        if world_size == 1 or not everything:
            return everything
        total = math.ceil(len(everything) / world_size) * world_size
        padded = (everything * math.ceil(total / len(everything)))[:total]
        return padded[rank::world_size]

    def resume_at(self, epoch: int, n_items: int) -> None:
        """Start at ``epoch`` and leave its first ``n_items`` items out of the next pass (resume)."""
        self.epoch = epoch
        self._skip = (epoch, n_items) if n_items > 0 else None

    def __iter__(self) -> Iterator[ItemKey]:
        items = self.items()
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            items = items[skip[1] :]
        return iter(items)

    def __len__(self) -> int:
        _, world_size = self._shard()
        return math.ceil(self._n_items() / world_size)


class SliceSampler(_ItemSampler):
    """Whole slices (optionally subsampled to ``max_cells``).

    Parameters
    ----------
    store, indices
        The processed store and the entries to draw from.
    shuffle
        True (training): a new order and new subsamples every epoch. False (evaluation): store
        order, and each entry's subsample is fixed by ``seed``.
    max_cells
        Subsample entries larger than this (None = never).
    options
        ``items_per_epoch`` (shuffled passes over ``indices``; None = one pass), ``seed``,
        ``rank``, ``world_size``: see :class:`_ItemSampler`.
    """

    def __init__(
        self,
        store: ProcessedStore,
        indices: Sequence[int],
        *,
        shuffle: bool,
        max_cells: int | None = None,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(indices, **options)
        self.shuffle = shuffle
        self.max_cells = max_cells

    def _n_items(self) -> int:
        return self.items_per_epoch if self.items_per_epoch is not None else len(self.indices)

    def _items(self, rng: np.random.Generator) -> list[ItemKey]:
        n_items = self._n_items()
        if not self.shuffle:
            order = [self.indices[i % len(self.indices)] for i in range(n_items)]
            return [ItemKey(k, "slice", self.max_cells, _fixed_seed(self.seed, k)) for k in order]
        passes = math.ceil(n_items / len(self.indices)) if self.indices else 0
        order = [self.indices[i] for _ in range(passes) for i in rng.permutation(len(self.indices))]
        seeds = rng.integers(0, _MAX_SEED, size=n_items)
        return [
            ItemKey(k, "slice", self.max_cells, int(s))
            for k, s in zip(order[:n_items], seeds, strict=True)
        ]


class CellSampler(_ItemSampler):
    """Items of ``n_cells`` cells, each from one slice drawn in proportion to its cell count.

    A ``neighborhood_fraction`` share of the items are spatially contiguous (the cells nearest
    a random centre cell); the rest are random subsets.

    Parameters
    ----------
    store, indices
        The processed store and the entries to draw from.
    n_cells
        Cells per item.
    neighborhood_fraction
        Share of contiguous items, in [0, 1].
    options
        ``items_per_epoch`` (None = ceil(cells in ``indices`` / ``n_cells``)), ``seed``,
        ``rank``, ``world_size``: see :class:`_ItemSampler`.
    """

    def __init__(
        self,
        store: ProcessedStore,
        indices: Sequence[int],
        *,
        n_cells: int,
        neighborhood_fraction: float = 0.5,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(indices, **options)
        self.n_cells = n_cells
        self.neighborhood_fraction = neighborhood_fraction
        self._sizes = np.array([store.n_cells(k) for k in self.indices], dtype=np.float64)

    def _n_items(self) -> int:
        if self.items_per_epoch is not None:
            return self.items_per_epoch
        return math.ceil(self._sizes.sum() / self.n_cells)

    def _items(self, rng: np.random.Generator) -> list[ItemKey]:
        n_items = self._n_items()
        if n_items == 0:
            return []
        slices = rng.choice(len(self.indices), size=n_items, p=self._sizes / self._sizes.sum())
        n_neighborhood = round(self.neighborhood_fraction * n_items)
        is_neighborhood = rng.permutation(np.arange(n_items) < n_neighborhood)
        seeds = rng.integers(0, _MAX_SEED, size=n_items)
        return [
            ItemKey(self.indices[s], "neighborhood" if nb else "random", self.n_cells, int(seed))
            for s, nb, seed in zip(slices, is_neighborhood, seeds, strict=True)
        ]


# --------------------------------------------------------------------------------------------
# Loaders


class ResumableDataLoader(DataLoader):
    """Training loader whose place in the epoch is checkpointed, for exact mid-epoch resume.

    Lightning stores :meth:`state_dict` (``{"epoch", "batches"}``: batches of that epoch already
    yielded) in every checkpoint and calls :meth:`load_state_dict` on resume: the sampler then
    leaves those batches out of the resumed epoch (or moves on to the next epoch when it was
    complete), so a resumed run trains on the same batches as one that was never stopped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches) to skip once

    def __iter__(self) -> Iterator[Any]:
        sampler: _ItemSampler = self.sampler  # type: ignore[assignment]
        resume, self._resume = self._resume, None
        self._batches_done = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch of the sampler and batches of it yielded so far."""
        return {"epoch": int(self.sampler.epoch), "batches": self._batches_done}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["batches"]`` batches of ``state["epoch"]``."""
        sampler: _ItemSampler = self.sampler  # type: ignore[assignment]
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            sampler.resume_at(epoch + 1, 0)
            return
        sampler.resume_at(epoch, batches * (self.batch_size or 1))
        self._resume = (epoch, batches)


def _loader(
    dataset: SpatialDataset,
    sampler: _ItemSampler,
    batch_size: int,
    num_workers: int,
    seed: int,
    loader_class: type[DataLoader] = DataLoader,
) -> DataLoader:
    return loader_class(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_holders,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # workers keep their memory maps and k-d trees
        generator=torch.Generator().manual_seed(seed),  # never touches the global torch RNG
    )


def create_dataloaders(
    data_dir: str | Path,
    mode: DataMode = "slice",
    batch_size: int = 1,
    *,
    max_cells: int | None = None,
    neighborhood_fraction: float = 0.5,
    num_workers: int = 0,
    seed: int = 0,
    items_per_epoch: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[DataLoader, DataLoader | None, DataLoader | None, dict[str, Any]]:
    """Build the train, val and test DataLoaders of a processed store.

    Parameters
    ----------
    data_dir
        Processed store (output of ``alphastomics preprocess``).
    mode
        ``slice``: one item = one whole slice, ``batch_size`` slices per batch. ``cell``: one
        item (and one batch) = ``batch_size`` cells of one slice.
    batch_size
        Slices per batch (slice mode) or cells per item (cell mode, >= 2).
    max_cells
        Slice mode and evaluation: subsample slices larger than this (training: a new subset
        every epoch; val/test: a fixed one). None = whole slices.
    neighborhood_fraction
        Cell mode: share of training items that are spatially contiguous.
    num_workers
        DataLoader worker processes (items do not depend on it).
    seed
        Seed of every draw; epoch ``e`` uses ``(seed, e)`` (see ``sampler.set_epoch``).
    items_per_epoch
        Training items per epoch. None: one pass over the training slices (slice mode) or
        ceil(training cells / batch_size) (cell mode).
    rank, world_size
        Distributed share of the items (None: read from ``torch.distributed`` when iterating).

    Returns
    -------
    train_loader, val_loader, test_loader, meta
        Loaders yield padded :class:`DataHolder` batches: expression (B, N, G), positions
        (B, N, 3) in the store's per-slice frame, node_mask (B, N), gene_mask (B, G), cell_type, cell_index
        (B, N) and slice_index (B,). val/test always hold whole slices (respecting
        ``max_cells``) and are None when the split is empty. ``meta`` is the store metadata
        plus ``n_genes``, ``gene_names``, ``data_dir``, ``mode`` and ``n_train_cells``.

    Examples
    --------
    >>> train, val, test, meta = create_dataloaders("processed", mode="cell", batch_size=512)
    ... # doctest: +SKIP
    """
    if mode not in ("slice", "cell"):
        raise UserInputError(f"data mode must be slice or cell; got {mode!r}")
    if batch_size < 1 or (mode == "cell" and batch_size < 2):
        minimum = 2 if mode == "cell" else 1
        raise UserInputError(f"batch_size must be >= {minimum} in {mode} mode; got {batch_size}")
    if max_cells is not None and max_cells < 2:
        raise UserInputError(f"max_cells must be None or >= 2; got {max_cells}")
    if not 0.0 <= neighborhood_fraction <= 1.0:
        raise UserInputError(
            f"neighborhood_fraction must be in [0, 1]; got {neighborhood_fraction}"
        )
    if num_workers < 0:
        raise UserInputError(f"num_workers must be >= 0; got {num_workers}")
    if items_per_epoch is not None and items_per_epoch < 1:
        raise UserInputError(f"items_per_epoch must be None or >= 1; got {items_per_epoch}")

    store = ProcessedStore(data_dir)
    train_indices = store.slice_indices("train")
    if not train_indices:
        raise UserInputError(
            f"{data_dir} has no training slice; run preprocess with fewer held out"
        )
    dataset = SpatialDataset(store)
    shard = {"rank": rank, "world_size": world_size}

    train_sampler: _ItemSampler
    if mode == "slice":
        train_sampler = SliceSampler(
            store,
            train_indices,
            shuffle=True,
            max_cells=max_cells,
            items_per_epoch=items_per_epoch,
            seed=seed,
            **shard,
        )
        train_batch = batch_size
    else:
        train_sampler = CellSampler(
            store,
            train_indices,
            n_cells=batch_size,
            neighborhood_fraction=neighborhood_fraction,
            items_per_epoch=items_per_epoch,
            seed=seed,
            **shard,
        )
        train_batch = 1
    train_loader = _loader(
        dataset, train_sampler, train_batch, num_workers, seed, ResumableDataLoader
    )

    eval_batch = batch_size if mode == "slice" else 1
    eval_loaders: list[DataLoader | None] = []
    for split in ("val", "test"):
        indices = store.slice_indices(split)  # type: ignore[arg-type]
        if not indices:
            eval_loaders.append(None)
            continue
        sampler = SliceSampler(
            store, indices, shuffle=False, max_cells=max_cells, seed=seed, **shard
        )
        eval_loaders.append(_loader(dataset, sampler, eval_batch, num_workers, seed))

    meta = dict(store.metadata)
    meta.update(
        n_genes=store.n_genes,
        gene_names=store.gene_names,
        data_dir=str(store.data_dir),
        mode=mode,
        n_train_cells=sum(store.n_cells(k) for k in train_indices),
    )
    logger.info(
        "%s mode: %d train, %d val, %d test slices; %d training batches per epoch",
        mode,
        len(train_indices),
        len(store.slice_indices("val")),
        len(store.slice_indices("test")),
        len(train_loader),
    )
    return train_loader, eval_loaders[0], eval_loaders[1], meta
