"""k-nearest-neighbour search over the cells of an item, never an N x N tensor.

One owner for every neighbour search of the package: the denoiser's local attention (on the
item's *current* positions, at every network evaluation), the sampled distance loss (on the
true positions), the neighbour read-out (query cells among reference cells) and the search in
expression (local attention and the sampler's consensus). In positions (2 or 3 axes) a k-d tree:
building it is O(N log N) and a query O(log N) per cell, memory O(N·k); tensors on a GPU make a
round trip through host memory (N·D floats out, N·k indices back). In expression (16 axes), where
a k-d tree prunes little, items of up to ``_EXACT_SEARCH_CELLS`` cells are searched exactly by
blocked brute force on their own device (O(N²) time, bounded by that size; O(block·N) memory),
larger ones by an approximate k-d tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

# Below this many query cells one thread answers faster than a pool of workers starts.
_PARALLEL_QUERIES = 20_000
# The search in many axes (``neighbor_index(high_dimensional=True)``, the search in expression):
# items of up to this many cells by brute force, larger ones by an approximate k-d tree (eps).
_EXACT_SEARCH_CELLS = 20_000
_APPROXIMATE_EPS = 2.0
# Query cells per block of the brute-force search: (block, N) distances, 82 MB at N = 20,000.
_BRUTE_FORCE_ROWS = 512
# Cells per chunk of the expression principal axes (float64, G columns: 46 MB at G = 351).
_PCA_CHUNK = 16_384
# Principal axes of expression in which cells of similar expression are found.
EXPRESSION_AXES = 16


def _points(x: Tensor) -> np.ndarray:
    # non-finite coordinates (a diverged model) get neighbours of the origin, not an error:
    # the non-finite values themselves travel on through the network and are caught there
    points = x.detach().to("cpu", torch.float64).numpy()
    return np.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)


def _query(tree: cKDTree, points: np.ndarray, k: int, eps: float = 0.0) -> np.ndarray:
    workers = -1 if len(points) >= _PARALLEL_QUERIES else 1
    _, index = tree.query(points, k=k, eps=eps, workers=workers)
    return np.asarray(index).reshape(len(points), k)


def nearest_neighbors(
    positions: Tensor, k: int, eps: float = 0.0, brute_force: bool = False
) -> Tensor:
    """Each cell's ``k`` nearest other cells (no gradient).

    Parameters
    ----------
    positions
        (n, D) coordinates of one item's real cells.
    k
        Neighbours per cell; capped at n - 1.
    eps
        0 for the exact neighbours; above 0 an approximate search whose i-th neighbour is within
        (1 + eps) times the exact i-th distance (``cKDTree.query``), much faster in many
        dimensions.
    brute_force
        Exact, by blocked brute force on the device of ``positions`` instead of a k-d tree
        (``eps`` unused): O(n²·D) time and O(``_BRUTE_FORCE_ROWS``·n) memory, faster than a k-d
        tree in many dimensions up to some tens of thousands of cells, where a tree prunes little.

    Returns
    -------
    Tensor
        (n, min(k, n - 1)) long indices into ``positions`` on its device, nearest first, self
        excluded (also when several cells share a location).
    """
    n = positions.shape[0]
    k = max(0, min(k, n - 1))
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=positions.device)
    if brute_force:
        return _brute_force_neighbors(positions, k)
    points = _points(positions)
    tree = cKDTree(points)
    # asked in the tree's own order, consecutive queries walk the same branches (cache-warm):
    # the same answers, much sooner for large slices (docs/benchmarks.md, "Whole sections")
    order = tree.indices
    index = np.empty((n, k + 1), dtype=np.intp)
    index[order] = _query(tree, points[order], k + 1, eps)  # (n, k + 1), usually self first
    drop = index == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True  # self not returned (duplicates): drop the farthest
    return torch.from_numpy(index[~drop].reshape(n, k)).to(positions.device)


def _brute_force_neighbors(points: Tensor, k: int) -> Tensor:
    # (n, D), 1 <= k < n -> (n, k): squared distances (rows, n) a block of rows at a time,
    # float64 on CPU and float32 on a GPU, never a cell itself
    n = points.shape[0]
    dtype = torch.float64 if points.device.type == "cpu" else torch.float32
    # non-finite coordinates get neighbours of the origin, as in the k-d tree search
    x = torch.nan_to_num(points.detach().to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    norms = x.square().sum(dim=1)  # (n,)
    index = torch.empty(n, k, dtype=torch.long, device=points.device)
    for start in range(0, n, _BRUTE_FORCE_ROWS):
        stop = min(start + _BRUTE_FORCE_ROWS, n)
        squared = x[start:stop] @ x.T  # (rows, n), then in place: |a|² - 2 a·b + |b|²
        squared.mul_(-2.0).add_(norms[start:stop, None]).add_(norms)
        rows = torch.arange(stop - start, device=x.device)
        squared[rows, rows + start] = math.inf  # never itself
        index[start:stop] = squared.topk(k, dim=1, largest=False).indices
    return index


def nearest_references(query: Tensor, reference: Tensor, k: int) -> Tensor:
    """Indices (Q, min(k, R)) of each query's nearest reference cells, nearest first.

    ``query`` (Q, D) and ``reference`` (R, D), R >= 1 unless Q = 0.
    """
    k = min(k, reference.shape[0])
    if query.shape[0] == 0 or k == 0:
        return torch.zeros((query.shape[0], k), dtype=torch.long, device=query.device)
    index = _query(cKDTree(_points(reference)), _points(query), k)
    return torch.from_numpy(index).to(query.device)


@dataclass(frozen=True)
class NeighborGraph:
    """Each cell's k nearest cells within its item, with their distances.

    Attributes
    ----------
    index
        (B, N, k) long: column of the neighbour in the item; for a missing neighbour (padded
        cell, or an item with k or fewer cells) the cell itself.
    valid
        (B, N, k) bool, True for a real neighbour of a real cell.
    distance
        (B, N, k) float distance to the neighbour divided by the item's length scale
        (the mean distance of its real cells to their neighbours), 0 where not valid.
    """

    index: Tensor
    valid: Tensor
    distance: Tensor

    @property
    def k(self) -> int:
        return self.index.shape[2]


def knn_graph(
    positions: Tensor, node_mask: Tensor, k: int, search: Tensor | None = None
) -> NeighborGraph:
    """The k-nearest-neighbour graph of the real cells of every item (no gradient).

    Distances are divided by each item's mean neighbour distance, so they read the same
    whatever the density of cells or the noise level of the positions: the length scale of a
    slice at 1,000 cells and at 1,000,000 differs 30-fold, the relative layout of a neighbourhood
    does not. Only differences of positions enter, so the graph is translation- and
    rotation-invariant.

    Parameters
    ----------
    positions
        (B, N, D) current positions.
    node_mask
        (B, N) bool, True for a real cell.
    k
        Neighbours per cell.
    search
        (B, N, F) coordinates in which the nearest cells are found instead of ``positions``
        (for example :func:`expression_coordinates`); distances are still measured in
        ``positions``; it is searched as a space of many axes (``neighbor_index`` with
        ``high_dimensional``: by brute force up to ``_EXACT_SEARCH_CELLS`` cells, approximately
        above).

    Returns
    -------
    NeighborGraph
        On the device of ``positions``.
    """
    space = positions if search is None else search
    index, valid = neighbor_index(space, node_mask, k, high_dimensional=search is not None)
    return graph_at(positions, index, valid)


def neighbor_index(
    space: Tensor, node_mask: Tensor, k: int, high_dimensional: bool = False
) -> tuple[Tensor, Tensor]:
    """Each real cell's ``k`` nearest real cells of its item in ``space`` (no gradient).

    ``space`` (B, N, F) and ``node_mask`` (B, N) bool give ``index`` (B, N, k) long and
    ``valid`` (B, N, k) bool as in :class:`NeighborGraph`. An exact k-d tree search, or with
    ``high_dimensional`` (many axes, where a k-d tree prunes little): items of up to
    ``_EXACT_SEARCH_CELLS`` cells exactly by brute force (:func:`nearest_neighbors`), larger ones by a
    k-d tree with ``eps = _APPROXIMATE_EPS``.
    """
    b, n, _ = space.shape
    device = space.device
    mask = node_mask.bool()
    index = torch.arange(n, device=device).view(1, n, 1).expand(b, n, k).clone()
    valid = torch.zeros(b, n, k, dtype=torch.bool, device=device)
    counts = mask.sum(dim=1).tolist()
    with torch.no_grad():
        for item in range(b):
            if counts[item] < 2:
                continue
            rows = torch.nonzero(mask[item]).squeeze(1)  # (n_b,)
            # in many dimensions: brute force up to a few tens of thousands of cells; above,
            # where an exact search grows much faster than N, an approximate k-d tree (each
            # neighbour within (1 + eps) times the distance of the exact one)
            brute_force = high_dimensional and len(rows) <= _EXACT_SEARCH_CELLS
            eps = _APPROXIMATE_EPS if high_dimensional else 0.0
            neighbors = nearest_neighbors(space[item, rows], k, eps, brute_force)  # (n_b, k_b)
            k_b = neighbors.shape[1]
            index[item, rows, :k_b] = rows[neighbors]
            valid[item, rows, :k_b] = True
    return index, valid


def graph_at(positions: Tensor, index: Tensor, valid: Tensor) -> NeighborGraph:
    """The graph of neighbours ``index``/``valid`` (B, N, k) with distances in ``positions``
    (B, N, D), divided by each item's mean neighbour distance (no gradient)."""
    b, n, k = index.shape
    with torch.no_grad():
        flat = index + (torch.arange(b, device=index.device) * n).view(b, 1, 1)
        points = positions.detach().reshape(b * n, -1)
        distance = points[flat.reshape(-1)].view(b, n, k, -1) - positions.detach().unsqueeze(2)
        distance = distance.float().norm(dim=-1) * valid  # (B, N, k)
        scale = distance.sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)  # (B,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        distance = distance / scale.view(b, 1, 1)
    return NeighborGraph(index=index, valid=valid, distance=distance)


def expression_coordinates(
    expression: Tensor, node_mask: Tensor, n_components: int, gene_mask: Tensor | None = None
) -> Tensor:
    """Each item's cells on the top principal axes of its own standardised expression.

    The space in which the local graph finds cells of similar expression: per item, genes
    are centred and scaled over its real cells, and the cells projected on the top
    ``n_components`` eigenvectors of the gene correlation matrix (exact, O(N·G² + G³) time per
    item, read in chunks of cells: memory O(N·n_components + G²), no N x N tensor). Signs of
    the axes do not matter to a neighbour search.

    Parameters
    ----------
    expression
        (B, N, G) expression (noisy or clean), padded cells 0, and unmeasured genes 0 unless
        ``gene_mask`` names them.
    node_mask
        (B, N) bool, True for a real cell.
    n_components
        Principal axes kept (capped at G).
    gene_mask
        (B, G) bool, True for a gene to read; the others count as 0 (default: every gene).

    Returns
    -------
    Tensor
        (B, N, min(n_components, G)) float32, no gradient; padded rows 0.
    """
    b, n, g = expression.shape
    q = min(n_components, g)
    out = torch.zeros(b, n, q, dtype=torch.float32, device=expression.device)
    with torch.no_grad():
        for item in range(b):
            rows = torch.nonzero(node_mask[item]).squeeze(1)
            n_b = len(rows)
            if n_b < 2:
                continue
            spans = [rows[start : start + _PCA_CHUNK] for start in range(0, n_b, _PCA_CHUNK)]
            total = expression.new_zeros(g, dtype=torch.float64)
            products = expression.new_zeros(g, g, dtype=torch.float64)
            read = None if gene_mask is None else gene_mask[item].to(torch.float64)  # (G,)
            for span in spans:  # one pass, a chunk of cells at a time: memory O(chunk·G + G²)
                x = expression[item, span].to(torch.float64)  # (n_c, G)
                x = x if read is None else x * read
                total += x.sum(dim=0)
                products += x.T @ x
            mean = total / n_b
            covariance = products / n_b - torch.outer(mean, mean)  # (G, G)
            scale = covariance.diagonal().clamp(min=0).sqrt().clamp(min=1e-8)
            correlation = covariance / torch.outer(scale, scale)
            _, vectors = torch.linalg.eigh(correlation)  # ascending eigenvalues
            axes = vectors[:, -q:] / scale.unsqueeze(1)  # standardise, then project
            for span in spans:
                x = expression[item, span].to(torch.float64)
                x = x if read is None else x * read
                out[item, span] = ((x - mean) @ axes).float()
    return out


def expression_neighbor_index(
    expression: Tensor, node_mask: Tensor, k: int, gene_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each real cell's ``k`` most similar real cells of its item in expression (no gradient).

    Found on the top ``EXPRESSION_AXES`` principal axes of each item's standardised
    ``expression`` (B, N, G) over the genes of ``gene_mask`` (B, G)
    (:func:`expression_coordinates`), exactly up to ``_EXACT_SEARCH_CELLS`` cells and
    approximately above (:func:`neighbor_index` with ``high_dimensional``);
    ``index`` and ``valid`` (B, N, k) as in :class:`NeighborGraph`.
    """
    coords = expression_coordinates(expression, node_mask, EXPRESSION_AXES, gene_mask)
    return neighbor_index(coords, node_mask, k, high_dimensional=True)
