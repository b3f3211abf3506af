"""Training losses: masked expression MSE, pairwise-distance MSE (exact or sampled), coordinate MSE.

Plain functions and one result object; no logging and no I/O. Every loss sees only real cells
(padded rows are replaced by zeros before any arithmetic, so garbage there changes nothing) and
averages per item first, then over items with per-item weights (0 = the item's modality was held
clean). A batch whose weights are all 0 gives a loss of exactly 0, never NaN. One module (over
500 lines): the position losses share the masking, per-item weighting and block-wise helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from alphastomics.attn_model.neighbors import nearest_neighbors
from alphastomics.data.batch import DataHolder, center

# Added under the square root of every distance: keeps the gradient finite (and 0) at coincident
# points; d/dx sqrt(|x|^2 + eps) has norm < 1 everywhere.
DISTANCE_EPS = 1e-8

# Cell pairs per block of the exact distance loss. Larger problems are computed block by block
# under activation checkpointing, so peak memory is O(block) rather than O(N^2) per item.
_EXACT_PAIRS_PER_CHUNK = 1 << 22


@dataclass
class DiffusionLoss:
    """Result of :func:`compute_loss`.

    Attributes
    ----------
    total
        Scalar to call ``backward()`` on: the sum of ``terms``.
    terms
        Each term already multiplied by its lambda, e.g. ``{"expression_mse": ...,
        "position_distance_mse": ...}``; scalars that carry gradient.
    unweighted
        The same terms before the lambdas, detached, for logging.
    """

    total: Tensor
    terms: dict[str, Tensor]
    unweighted: dict[str, Tensor] = field(default_factory=dict)

    def with_term(self, name: str, value: Tensor, weight: float) -> DiffusionLoss:
        """A copy with one more term ``weight * value`` added to ``total``."""
        return DiffusionLoss(
            total=self.total + weight * value,
            terms={**self.terms, name: weight * value},
            unweighted={**self.unweighted, name: value.detach()},
        )


def _loss_dtype(x: Tensor) -> Tensor:
    # Losses are reduced in at least float32, also under bf16/fp16 autocast.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _masked(x: Tensor, node_mask: Tensor) -> Tensor:
    # `where` rather than a product, so inf/NaN in padded rows cannot leak into loss or gradient.
    return torch.where(node_mask.unsqueeze(-1), _loss_dtype(x), 0.0)


def _weighted_mean_over_items(
    item_loss: Tensor, item_weight: Tensor | None, has_entries: Tensor
) -> Tensor:
    """Weighted mean of (B,) per-item losses; items without entries or with weight 0 drop out."""
    if item_weight is None:
        weight = torch.ones_like(item_loss)
    else:
        if item_weight.shape != item_loss.shape:
            raise ValueError(
                f"item_weight must be {tuple(item_loss.shape)}, got {tuple(item_weight.shape)}"
            )
        weight = item_weight.to(item_loss.dtype)
    weight = torch.where(has_entries, weight, 0.0)
    return (weight * item_loss).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


# cells per block of the expression loss: its temporaries stay a block's size, not (B, N, G)
_SSE_BLOCK_CELLS = 8192


def _cell_blocks(n_cells: int) -> list[slice]:
    return [slice(i, i + _SSE_BLOCK_CELLS) for i in range(0, n_cells, _SSE_BLOCK_CELLS)]


def _masked_diff(
    pred: Tensor, target: Tensor, node_mask: Tensor, genes: Tensor, rows: slice
) -> Tensor:
    """``pred - target`` (B, n, G) of one block of cells, 0 outside real cells x measured genes."""
    entry = node_mask[:, rows].unsqueeze(-1) & genes  # (B, n, G)
    return torch.where(entry, _loss_dtype(pred[:, rows]) - _loss_dtype(target[:, rows]), 0.0)


class _MaskedSSE(torch.autograd.Function):
    """Per-item ``Σ (pred - target)²`` over real cells and measured genes -> (B,), float32+.

    Formed a block of cells at a time, saving only the inputs: the plain expression keeps
    about four (B, N, G) temporaries alive until backward, over 4 GB at a million cells.
    Non-finite entries outside the mask never reach the sum or the gradient.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, node_mask: Tensor, gene_mask: Tensor) -> Tensor:
        ctx.save_for_backward(pred, target, node_mask, gene_mask)
        sse = pred.new_zeros(pred.shape[0], dtype=torch.promote_types(pred.dtype, torch.float32))
        genes = gene_mask.unsqueeze(1)  # (B, 1, G)
        for rows in _cell_blocks(pred.shape[1]):
            sse += _masked_diff(pred, target, node_mask, genes, rows).square().sum(dim=(1, 2))
        return sse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pred, target, node_mask, gene_mask = ctx.saved_tensors
        grad_pred = torch.empty_like(pred) if ctx.needs_input_grad[0] else None
        grad_target = torch.empty_like(target) if ctx.needs_input_grad[1] else None
        genes = gene_mask.unsqueeze(1)
        scale = 2.0 * grad.view(-1, 1, 1)  # (B, 1, 1)
        for rows in _cell_blocks(pred.shape[1]):
            block = _masked_diff(pred, target, node_mask, genes, rows) * scale
            if grad_pred is not None:
                grad_pred[:, rows] = block.to(pred.dtype)
            if grad_target is not None:
                grad_target[:, rows] = (-block).to(target.dtype)
        return grad_pred, grad_target, None, None


def expression_loss(
    pred: Tensor,
    target: Tensor,
    node_mask: Tensor,
    gene_mask: Tensor | None = None,
    item_weight: Tensor | None = None,
) -> Tensor:
    """MSE over real cells and measured genes, averaged per item, then weighted over items.

    Parameters
    ----------
    pred, target
        (B, N, G) predicted and clean expression.
    node_mask
        (B, N) bool, True for a real cell.
    gene_mask
        (B, G) bool, True for a gene the item's slice measured; all True when None.
    item_weight
        (B,) non-negative weights (e.g. 0 where expression was held clean); all 1 when None.

    Returns
    -------
    Tensor
        Scalar; 0 when no item has a weighted, counted entry.
    """
    if gene_mask is None:
        gene_mask = torch.ones(pred.shape[0], pred.shape[2], dtype=torch.bool, device=pred.device)
    sse = _MaskedSSE.apply(pred, target, node_mask, gene_mask)  # (B,)
    count = node_mask.sum(dim=1) * gene_mask.sum(dim=1)  # (B,)
    item_loss = sse / count.clamp(min=1).to(sse.dtype)
    return _weighted_mean_over_items(item_loss, item_weight, count > 0)


def best_rotation(pred: Tensor, target: Tensor) -> Tensor:
    """Orthogonal (B, D, D) ``R`` minimising ``||pred @ R - target||`` (no gradient).

    The orthogonal Procrustes solution ``R = U V^T`` of the SVD ``pred^T target = U S V^T``
    (Kabsch 1976, reflections allowed, as in the distance loss and the position metrics), in
    float64 from the D x D cross-covariance, so O(N). ``pred`` and ``target`` (B, N, D) must be
    centred with padded rows 0. An item with a non-finite entry gets a NaN ``R``, so its loss
    is NaN as it would be without alignment (the training step then skips it).
    """
    with torch.no_grad():
        cross = pred.detach().double().transpose(1, 2) @ target.detach().double()  # (B, D, D)
        finite = torch.isfinite(cross).all(dim=(1, 2))  # (B,)
        u, _, vh = torch.linalg.svd(torch.where(finite.view(-1, 1, 1), cross, 0.0))
        rotation = torch.where(finite.view(-1, 1, 1), u @ vh, torch.nan)
        return rotation.to(pred.dtype)


def coordinate_loss(
    pred: Tensor,
    target: Tensor,
    node_mask: Tensor,
    item_weight: Tensor | None = None,
    *,
    align_rotation: bool = False,
) -> Tensor:
    """MSE of coordinates after centring both over real cells.

    The loss when ``loss.use_distance_matrix`` is false. Without ``align_rotation`` it is
    translation-invariant only: the prediction must be in the target's frame. With it, the
    prediction is first rotated (or reflected) onto the target by :func:`best_rotation`, so
    the loss is invariant to rotation, reflection and translation like :func:`distance_loss`,
    and exact and O(N) at any size. The rotation is held fixed in the gradient, which is
    exact: at the optimal rotation the derivative with respect to it vanishes.

    Parameters
    ----------
    pred, target
        (B, N, D) predicted and clean positions.
    node_mask
        (B, N) bool.
    item_weight
        (B,) non-negative weights; all 1 when None.
    align_rotation
        Align the prediction's orientation to the target's first.

    Returns
    -------
    Tensor
        Scalar mean over real cells and axes.
    """
    pred = center(_masked(pred, node_mask), node_mask)
    target = center(_masked(target, node_mask), node_mask)
    if align_rotation:
        pred = pred @ best_rotation(pred, target)
    sse = (pred - target).square().sum(dim=(1, 2))  # (B,)
    count = node_mask.sum(dim=1) * pred.shape[2]  # (B,)
    item_loss = sse / count.clamp(min=1).to(sse.dtype)
    return _weighted_mean_over_items(item_loss, item_weight, count > 0)


# ----------------------------------------------------------------------------------------------
# Pairwise-distance MSE


def _distance(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b).square().sum(dim=-1) + DISTANCE_EPS).sqrt()


class NeighborCache:
    """Keeps each slice's :func:`nearest_neighbors` between steps for the sampled distance loss.

    The k-d tree query costs O(n log n) per item and step (about 0.2 s at 50,000 cells, 0.4 s
    at 100,000), yet a whole slice's true positions, and so its neighbours, are the same every
    epoch. Entries are keyed by the item's ``slice_index`` and used only when the item's real
    cells have exactly the stored positions (compared element-wise, O(n)), so a random subset,
    a crop or an augmented copy of a slice is recomputed, never served stale neighbours.
    A new entry is stored while the cache holds under ``max_bytes`` (about 76 bytes per cell
    with k = 16); beyond it, items are computed every step as without a cache (no eviction, so
    an epoch that cycles through more slices than fit never thrashes).

    Parameters
    ----------
    k
        Neighbours per cell (``loss.n_neighbor_pairs``).
    max_bytes
        Memory budget of the stored positions and neighbour indices.
    """

    def __init__(self, k: int, max_bytes: int = 256 * 2**20) -> None:
        self.k = k
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: dict[int, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int, positions: Tensor) -> Tensor:
        """Neighbours (n, k) long of ``positions`` (n, D), the real cells of slice ``key``."""
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry[0].shape == positions.shape
            and entry[0].device == positions.device
            and torch.equal(entry[0], positions.detach())
        ):
            return entry[1].long()
        neighbors = nearest_neighbors(positions, self.k)  # (n, k)
        size = positions.numel() * positions.element_size() + neighbors.numel() * 4
        old = (
            0
            if entry is None
            else entry[0].numel() * entry[0].element_size() + entry[1].numel() * 4
        )
        if self.nbytes - old + size <= self.max_bytes:
            self._entries[key] = (positions.detach().clone(), neighbors.int())
            self.nbytes += size - old
        return neighbors

    def lookup(
        self, positions: Tensor, node_mask: Tensor, slice_index: Tensor | None, min_cells: int
    ) -> list[Tensor | None] | None:
        """Per-item neighbours for :func:`distance_loss`'s ``neighbors`` argument.

        Parameters
        ----------
        positions
            (B, N, D) true positions, as passed to :func:`distance_loss` as ``target``.
        node_mask
            (B, N) bool.
        slice_index
            (B,) long slice of each item (``DataHolder.slice_index``); None: no caching.
        min_cells
            Only items with more real cells than this (the sampled path) are looked up.

        Returns
        -------
        list or None
            One (n_b, k) tensor or None per item; None when ``slice_index`` is None.
        """
        if slice_index is None:
            return None
        counts = node_mask.sum(dim=1).tolist()
        keys = slice_index.tolist()
        threshold = max(min_cells, 2)  # as in distance_loss
        return [
            self.get(int(keys[i]), positions[i][node_mask[i]]) if counts[i] > threshold else None
            for i in range(len(counts))
        ]


def _block_sse(pred: Tensor, target: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
    # Rows [start, stop) of the distance matrices; the diagonal adds exactly 0 (both sqrt(eps)).
    d_pred = _distance(pred[:, start:stop, None, :], pred[:, None, :, :])  # (B, c, n)
    d_true = _distance(target[:, start:stop, None, :], target[:, None, :, :])  # (B, c, n)
    valid = mask[:, start:stop, None] & mask[:, None, :]  # (B, c, n)
    return torch.where(valid, (d_pred - d_true).square(), 0.0).sum(dim=(1, 2))  # (B,)


def _exact_distance_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over ordered pairs i != j of real cells of (d_pred - d_true)^2, per item."""
    counts = mask.sum(dim=1)  # (B,)
    n_max = int(counts.max())
    # Move real cells to the front and drop the padding beyond the largest item.
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)[:, :n_max]  # (B, n)
    pred = pred.gather(1, order.unsqueeze(-1).expand(-1, -1, pred.shape[2]))
    target = target.gather(1, order.unsqueeze(-1).expand(-1, -1, target.shape[2]))
    mask = mask.gather(1, order)

    b = pred.shape[0]
    rows = max(1, _EXACT_PAIRS_PER_CHUNK // max(1, b * n_max))
    if rows >= n_max:
        sse = _block_sse(pred, target, mask, 0, n_max)
    else:
        use_checkpoint = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
        blocks = []
        for start in range(0, n_max, rows):
            stop = min(start + rows, n_max)
            if use_checkpoint:
                block = checkpoint(_block_sse, pred, target, mask, start, stop, use_reentrant=False)
            else:
                block = _block_sse(pred, target, mask, start, stop)
            blocks.append(block)
        sse = torch.stack(blocks).sum(dim=0)
    pairs = counts * (counts - 1)  # (B,)
    return sse / pairs.clamp(min=1).to(sse.dtype)  # (B,)


def _pair_sq_error(pred: Tensor, target: Tensor, partner: Tensor) -> Tensor:
    # (n, D), (n, D), (n, P) -> (n, P) squared distance errors of pairs (i, partner[i, p]).
    d_pred = _distance(pred.unsqueeze(1), pred[partner])
    d_true = _distance(target.unsqueeze(1), target[partner])
    return (d_pred - d_true).square()


def _sampled_distance_mse(
    pred: Tensor,
    target: Tensor,
    n_neighbor_pairs: int,
    n_random_pairs: int,
    generator: torch.Generator | None,
    neighbors: Tensor | None,
) -> Tensor:
    """Stratified estimate of one item's all-pairs distance MSE; O(n (k + R)) memory.

    Stratum 1, each cell's k nearest true neighbours K_i, is summed exactly. Stratum 2, the other
    cells, is estimated from R partners drawn uniformly among all other cells, keeping only those
    outside K_i. For every cell i,
    ``(1/(n-1)) sum_{j != i} e_ij = (1/(n-1)) sum_{j in K_i} e_ij + E_r[e_ir 1(r not in K_i)]``,
    so the mean over cells is an unbiased estimate of the exact loss.
    """
    n = pred.shape[0]
    device = pred.device
    if neighbors is None:
        neighbors = nearest_neighbors(target, n_neighbor_pairs)  # (n, k)
    neighbors = neighbors.to(device)
    err_nb = _pair_sq_error(pred, target, neighbors)  # (n, k)
    if n_random_pairs == 0:
        # No estimate of the far pairs is possible: the local (kNN) MSE alone.
        return err_nb.mean()

    draw_device = generator.device if generator is not None else device
    partner = torch.randint(
        0, n - 1, (n, n_random_pairs), generator=generator, device=draw_device
    ).to(device)
    cell = torch.arange(n, device=device).unsqueeze(1)  # (n, 1)
    partner = partner + (partner >= cell).long()  # uniform over the n - 1 other cells
    err_far = _pair_sq_error(pred, target, partner)  # (n, R)
    if neighbors.shape[1] > 0:
        sorted_nb = neighbors.sort(dim=1).values  # (n, k)
        pos = torch.searchsorted(sorted_nb, partner).clamp(max=sorted_nb.shape[1] - 1)
        in_nb = sorted_nb.gather(1, pos) == partner  # (n, R)
        err_far = torch.where(in_nb, 0.0, err_far)
    per_cell = err_nb.sum(dim=1) / (n - 1) + err_far.mean(dim=1)  # (n,)
    return per_cell.mean()


def distance_loss(
    pred: Tensor,
    target: Tensor,
    node_mask: Tensor,
    item_weight: Tensor | None = None,
    *,
    exact_max_cells: int = 3000,
    n_neighbor_pairs: int = 16,
    n_random_pairs: int = 48,
    generator: torch.Generator | None = None,
    neighbors: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """MSE between predicted and true pairwise-distance matrices of the real cells.

    The per-item objective is the mean over ordered pairs i != j of real cells of
    ``(|x_i - x_j| - |y_i - y_j|)^2`` (distances as ``sqrt(|.|^2 + DISTANCE_EPS)``), so it is
    invariant to rotation, reflection and translation of the prediction (LUNA's distance loss).

    - Items with at most ``exact_max_cells`` real cells: exact, in row blocks of about
      ``2**22`` pairs, under activation checkpointing when the matrix is larger than one block.
    - Larger items: never an n x n tensor. Each cell is paired with its ``n_neighbor_pairs``
      nearest TRUE neighbours (k-d tree on the detached target, O(n log n)) and with
      ``n_random_pairs`` partners drawn uniformly among the other cells. The neighbour pairs are
      summed exactly as one stratum and the random pairs estimate the rest, so the sampled loss
      is an unbiased estimate of the exact one (same objective at every size; the neighbours
      make sure every cell's local pairs get a gradient in every step, and cut variance). With
      ``n_random_pairs = 0`` it is the mean over the neighbour pairs only (local MSE).
      Memory is O(n (k + R) D).

    Parameters
    ----------
    pred, target
        (B, N, D) predicted and clean positions (D = 2 or 3).
    node_mask
        (B, N) bool.
    item_weight
        (B,) non-negative weights (0 = positions held clean); all 1 when None.
    exact_max_cells
        Largest real-cell count computed exactly (items with fewer than 3 cells always are).
    n_neighbor_pairs, n_random_pairs
        k and R of the sampled estimate.
    generator
        Random source of the random partners (any device).
    neighbors
        Optional per-item (n_b, k) long neighbour indices into that item's real cells (in
        ``node_mask`` order), e.g. cached :func:`nearest_neighbors`; None entries are computed.

    Returns
    -------
    Tensor
        Scalar; 0 when no weighted item has two real cells.
    """
    if n_neighbor_pairs < 0 or n_random_pairs < 0 or n_neighbor_pairs + n_random_pairs == 0:
        raise ValueError(
            "n_neighbor_pairs and n_random_pairs must be >= 0 with a positive sum, got "
            f"{n_neighbor_pairs} and {n_random_pairs}"
        )
    b = pred.shape[0]
    pred = _masked(pred, node_mask)
    target = _masked(target, node_mask)
    counts = node_mask.sum(dim=1).tolist()
    threshold = max(exact_max_cells, 2)  # sampling needs at least 3 cells
    exact = [i for i in range(b) if counts[i] <= threshold]
    sampled = [i for i in range(b) if counts[i] > threshold]

    item_loss: dict[int, Tensor] = {}
    if exact:
        index = torch.tensor(exact, device=pred.device)
        losses = _exact_distance_mse(pred[index], target[index], node_mask[index])
        item_loss.update(zip(exact, losses.unbind(0), strict=True))
    for i in sampled:
        real = node_mask[i]
        item_loss[i] = _sampled_distance_mse(
            pred[i][real],
            target[i][real],
            n_neighbor_pairs,
            n_random_pairs,
            generator,
            None if neighbors is None else neighbors[i],
        )
    has_pairs = torch.tensor([c >= 2 for c in counts], device=pred.device)
    stacked = torch.stack([item_loss[i] for i in range(b)])  # (B,)
    return _weighted_mean_over_items(stacked, item_weight, has_pairs)


# ----------------------------------------------------------------------------------------------


def _default_weight(t: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    # Noised items (t > 0) count; held-clean ones do not. Without times, every item counts.
    if t is None:
        return torch.ones(batch_size, device=device)
    return (t > 0).float()


def compute_loss(
    pred_expression: Tensor,
    pred_positions: Tensor,
    data: DataHolder,
    *,
    lambda_expression: float,
    lambda_position: float,
    use_distance_matrix: bool,
    align_rotation: bool = False,
    exact_distance_max_cells: int,
    n_neighbor_pairs: int,
    n_random_pairs: int,
    expression_weight: Tensor | None = None,
    position_weight: Tensor | None = None,
    generator: torch.Generator | None = None,
    position_neighbors: Sequence[Tensor | None] | None = None,
) -> DiffusionLoss:
    """Weighted sum of the expression and position losses of an x0-predicting denoiser.

    The keyword arguments named like ``LossConfig`` fields take ``**asdict(cfg.loss)``.

    Parameters
    ----------
    pred_expression
        (B, N, G) predicted clean expression; target ``data.expression``, masked by
        ``data.node_mask`` and ``data.gene_mask``.
    pred_positions
        (B, N, D) predicted clean positions; target ``data.positions``.
    data
        The batch as returned by ``NoiseModel.apply_noise``.
    lambda_expression, lambda_position
        Term weights.
    use_distance_matrix
        True: :func:`distance_loss` (term ``"position_distance_mse"``); False:
        :func:`coordinate_loss` (term ``"position_mse"``).
    align_rotation
        With the coordinate loss: align the prediction's orientation to the target first.
    exact_distance_max_cells, n_neighbor_pairs, n_random_pairs
        Passed to :func:`distance_loss`.
    expression_weight, position_weight
        (B,) per-item weights; 0 for an item whose modality was held clean. Default:
        ``data.t_expression > 0`` / ``data.t_position > 0`` (all 1 when the time is unset).
    generator
        Random source of the sampled distance pairs.
    position_neighbors
        Optional cached neighbour indices, see :func:`distance_loss`.

    Returns
    -------
    DiffusionLoss
        ``terms`` ``{"expression_mse", "position_distance_mse" | "position_mse"}`` weighted by
        the lambdas, ``total`` their sum, ``unweighted`` the detached raw values.
    """
    b = data.batch_size
    device = pred_expression.device
    if expression_weight is None:
        expression_weight = _default_weight(data.t_expression, b, device)
    if position_weight is None:
        position_weight = _default_weight(data.t_position, b, device)

    if not isinstance(align_rotation, bool):  # e.g. an unsettled `auto` (config.resolve_auto)
        raise ValueError(f"align_rotation must be True or False, got {align_rotation!r}")
    expression_mse = expression_loss(
        pred_expression, data.expression, data.node_mask, data.gene_mask, expression_weight
    )
    if use_distance_matrix:
        position_name = "position_distance_mse"
        position_value = distance_loss(
            pred_positions,
            data.positions,
            data.node_mask,
            position_weight,
            exact_max_cells=exact_distance_max_cells,
            n_neighbor_pairs=n_neighbor_pairs,
            n_random_pairs=n_random_pairs,
            generator=generator,
            neighbors=position_neighbors,
        )
    else:
        position_name = "position_mse"
        position_value = coordinate_loss(
            pred_positions,
            data.positions,
            data.node_mask,
            position_weight,
            align_rotation=align_rotation,
        )

    raw = {"expression_mse": expression_mse, position_name: position_value}
    terms = {
        "expression_mse": lambda_expression * expression_mse,
        position_name: lambda_position * position_value,
    }
    total = terms["expression_mse"] + terms[position_name]
    return DiffusionLoss(
        total=total,
        terms=terms,
        unweighted={name: value.detach() for name, value in raw.items()},
    )
