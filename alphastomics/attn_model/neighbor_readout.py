"""Learned neighbour read-out: expression at query cells from the measured cells around them.

``pos_to_expr`` among reference cells (imputing cells of a slice whose other cells are measured)
is kNN-averaging territory: the nearest measured cells say most about a cell. A fixed kNN
average copies the nearest side of a gap and weights every direction alike. This read-out
learns the weights instead: each query reads its ``k`` nearest reference cells, an MLP of the
relative offset (and its length) gives one softmax weight per neighbour and kernel, and each
gene mixes the kernels' weighted averages with its own learned proportions.

It sees relative offsets and the reference cells' expression only, never absolute positions or
the denoiser's states, so it cannot memorise the training tissue: what it learns is *how to
interpolate*, which is what transfers to tissue it has not seen. It is trained beside the
denoiser on regions of training items hidden from it (random bands and random cells, see
:func:`readout_split`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alphastomics.attn_model.neighbors import nearest_references
from alphastomics.data.batch import keeps_everything

READOUT_HIDDEN = 64  # width of the offset MLP
READOUT_KERNELS = 4  # weighting kernels mixed per gene


def readout_split(
    positions: Tensor, max_queries: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Hide a region of one item's cells: (query indices, reference indices) into ``positions``.

    Half of the draws hide a band (the cells ranked between two quantiles of the projection on a
    random direction, 5 to 30 % of the cells: a missing strip of tissue); the others hide a
    random 10 to 60 % of the cells (scattered unmeasured cells). At most ``max_queries`` hidden
    cells are returned as queries; every visible cell is a reference.

    Parameters
    ----------
    positions
        (N, D) positions of the item's real cells, N >= 2.
    max_queries
        Most hidden cells returned.
    generator
        Random source; its draws are made on its own device (a CUDA generator works).

    Returns
    -------
    (queries, references)
        (Q,) and (R,) long indices on ``positions.device``, disjoint, Q >= 1 and R >= 1.
    """
    n, device = positions.shape[0], positions.device
    draw_device = generator.device if generator is not None else device

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, device=draw_device))

    def random_index(size: int) -> int:
        return int(torch.randint(size, (1,), generator=generator, device=draw_device).item())

    if uniform(0.0, 1.0) < 0.5:
        direction = torch.randn(positions.shape[1], generator=generator, device=draw_device)
        rank = torch.argsort(torch.argsort(positions @ direction.to(positions)))  # (N,) 0..N-1
        width = max(1, round(uniform(0.05, 0.3) * n))
        start = round(uniform(0.0, 1.0) * (n - width))
        hidden = (rank >= start) & (rank < start + width)
    else:
        draws = torch.rand(n, generator=generator, device=draw_device).to(device)  # (N,)
        hidden = draws < uniform(0.1, 0.6)
    if not bool(hidden.any()):  # at least one query
        hidden[random_index(n)] = True
    if bool(hidden.all()):
        hidden[random_index(n)] = False  # and one reference
    queries = torch.nonzero(hidden).squeeze(1)
    if queries.numel() > max_queries:
        keep = torch.randperm(queries.numel(), generator=generator, device=draw_device)
        queries = queries[keep[:max_queries].to(device)]
    return queries, torch.nonzero(~hidden).squeeze(1)


class NeighborReadout(nn.Module):
    """Learned weighted average of the nearest reference cells' expression.

    Parameters
    ----------
    n_genes
        Number of genes G.
    n_dims
        Number of spatial dimensions D.
    n_neighbors
        Reference cells each query reads (k).

    Examples
    --------
    >>> readout = NeighborReadout(n_genes=20, n_dims=3, n_neighbors=8)
    >>> imputed = readout(torch.randn(5, 3), torch.randn(40, 3), torch.randn(40, 20))
    >>> imputed.shape
    torch.Size([5, 20])
    """

    def __init__(self, *, n_genes: int, n_dims: int, n_neighbors: int) -> None:
        super().__init__()
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        self.n_neighbors = n_neighbors
        self.offset_mlp = nn.Sequential(
            nn.Linear(n_dims + 1, READOUT_HIDDEN),
            nn.SiLU(),
            nn.Linear(READOUT_HIDDEN, READOUT_HIDDEN),
            nn.SiLU(),
            nn.Linear(READOUT_HIDDEN, READOUT_KERNELS),
        )
        self.gene_mix = nn.Parameter(torch.zeros(n_genes, READOUT_KERNELS))  # (G, K) logits

    def forward(
        self,
        query_positions: Tensor,
        reference_positions: Tensor,
        reference_expression: Tensor,
        index: Tensor | None = None,
    ) -> Tensor:
        """Expression (Q, G) at ``query_positions`` (Q, D) from the references.

        ``reference_positions`` (R, D) and ``reference_expression`` (R, G), R >= 1, in the same
        frame and units as the queries (only differences of positions are read). ``index``
        (Q, k) long: rows of each query's nearest references, nearest first, when the caller
        has them already (default: searched here, k = ``n_neighbors``).
        """
        if index is None:
            index = nearest_references(query_positions, reference_positions, self.n_neighbors)
        offset = reference_positions[index] - query_positions.unsqueeze(1)  # (Q, k, D)
        features = torch.cat([offset, offset.norm(dim=-1, keepdim=True)], dim=-1)
        weights = self.offset_mlp(features).softmax(dim=1)  # (Q, k, K) over neighbours
        kernels = torch.einsum("qkm,qkg->qmg", weights, reference_expression[index])  # (Q, K, G)
        return torch.einsum("qmg,gm->qg", kernels, self.gene_mix.softmax(dim=-1))  # (Q, G)


def readout_loss(
    readout: NeighborReadout,
    positions: Tensor,
    expression: Tensor,
    node_mask: Tensor,
    gene_mask: Tensor,
    max_queries: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MSE of the read-out on cells hidden from it, over the items of a batch.

    Each item hides a region of its cells (:func:`readout_split`) and imputes their expression
    from the visible cells around them; scored on measured genes. Items with fewer than 2 cells
    add nothing (the result stays connected to every read-out parameter, so distributed
    training sees a gradient for each).

    Parameters
    ----------
    positions, expression
        (B, N, D) and (B, N, G) clean positions and standardised expression.
    node_mask, gene_mask
        (B, N) real cells and (B, G) measured genes.
    max_queries
        Most hidden cells scored per item.

    Returns
    -------
    Tensor
        () mean squared error over every scored (cell, gene).
    """
    sse = sum(p.sum() * 0.0 for p in readout.parameters())
    count = 0
    for b in range(positions.shape[0]):
        real = node_mask[b].bool()
        if int(real.sum()) < 2:
            continue
        # no (n, G) copies of a whole slice: the read-out gathers its neighbours' rows itself
        unpadded = keeps_everything(real)
        item_positions = positions[b] if unpadded else positions[b][real]  # (n, D)
        item_expression = expression[b] if unpadded else expression[b][real]  # (n, G)
        queries, references = readout_split(item_positions, max_queries, generator)
        query_positions = item_positions[queries]  # (Q, D)
        nearest = nearest_references(
            query_positions, item_positions[references], readout.n_neighbors
        )  # (Q, k) into references
        predicted = readout(
            query_positions, item_positions, item_expression, index=references[nearest]
        )  # (Q, G)
        error = (predicted - item_expression[queries])[:, gene_mask[b].bool()]
        sse = sse + error.float().square().sum()
        count += error.numel()
    return sse / max(count, 1)
