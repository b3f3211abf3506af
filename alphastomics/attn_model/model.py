"""The denoiser network: noisy (expression, positions, times) -> predicted clean values (x0)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphastomics.attn_model.layers import (
    AdaptiveLayerNorm,
    ExpressionEncoder,
    PositionEncoder,
    TimeEmbedding,
    activation_linear,
)
from alphastomics.attn_model.local_attention import (
    N_DISTANCE_FEATURES,
    distance_features,
    gather_cells,
)
from alphastomics.attn_model.local_graphs import LOCAL_GRAPHS
from alphastomics.attn_model.neighbors import (
    NeighborGraph,
    expression_neighbor_index,
    graph_at,
    neighbor_index,
)
from alphastomics.attn_model.transformer import (
    TransformerLayer,
    checkpointed_chunks,
    chunk_cells,
)
from alphastomics.data.batch import apply_mask, center, keeps_everything
from alphastomics.utils.hardware import native_bf16

# Smoothing of the radius in the position head, in position units. Coordinates are scaled to unit
# RMS radius, so this is 1 % of a slice radius: nearer the centroid the unit direction fades
# smoothly to 0 instead of blowing up its gradient (LUNA divides by ||x|| + 1e-9).
_RADIUS_EPS = 1e-2
_DISPLACEMENT_RANK = 16  # features of the pairwise gate of the neighbour displacement


@dataclass
class DenoiserOutput:
    """What :class:`Denoiser` returns; padded rows are 0 in every field.

    Attributes
    ----------
    expression
        (B, N, G) predicted clean expression (also for unmeasured genes: an imputation).
    positions
        (B, N, D) predicted clean positions, zero masked centroid.
    hidden
        (B, N, H) final per-cell representation (input of the output heads).
    expression_embedding
        (B, N, H) output of the expression encoder.
    position_embedding
        (B, N, H) output of the position encoder.
    """

    expression: Tensor
    positions: Tensor
    hidden: Tensor
    expression_embedding: Tensor
    position_embedding: Tensor


class Denoiser(nn.Module):
    """Transformer over the cells of a slice that predicts clean expression and positions.

    Cells are embedded by an expression encoder (expression plus a per-gene "measured"
    indicator) and a position encoder (coordinates, their norm, random Fourier features), summed,
    and passed through ``n_layers`` pre-LN transformer layers whose attention is linear in the
    number of cells. Each modality's time gets its own sinusoidal embedding and MLP; their sum
    conditions every LayerNorm (adaptive LayerNorm, as in DiT), so each layer knows how noisy
    each modality is, and separate MLPs keep "expression noisy" and "positions noisy" apart.

    Output heads (x0-prediction):

    - expression: ``gate_e(t_e) * expression_t + Linear(h)``, with a per-gene gate in (0, 1)
      from the expression time alone. G genes do not fit through H features, so at low noise the
      skip carries the input and the head only corrects it; at t = 1 the gate can learn 0 (the
      c_skip of Karras et al. 2022, learned instead of derived from a schedule).
    - positions: a free update path ``x = gate_p(t_p) * positions_t + Linear(h)`` (D outputs,
      so cells can move anywhere), then LUNA's norm scaling with a 1-dimensional norm, written as
      a radial correction ``x + unit(x) * r(h, ||x||)``: the new norm ``||x|| + r`` comes from
      the cell state and its current distance to the centroid only, which makes it rotation
      invariant; it is the quantity expression predicts independently of a slice's arbitrary
      orientation. The result is centred with the masked centroid.

    Symmetries and guarantees (enforced by ``tests/test_model.py``):

    - permutation-equivariant over cells;
    - translation-invariant while positions are noisy (``t_position > 0``): ``positions_t`` is
      re-centred with its masked centroid on entry; the predicted positions have zero masked
      centroid. Clean positions (``t_position = 0``, the ``pos_to_expr`` condition) are encoded
      where they lie in their frame, so a part of a slice (a slab, a neighbourhood) is read at
      its place in the tissue, not as if it were the whole slice;
    - not rotation-equivariant: coordinates, Fourier frequencies and the linear heads see the
      axes. Teach the invariance by random rotations of training positions where frames are
      arbitrary;
    - padded cells (``node_mask`` False) never change real cells' outputs, and their own outputs
      are 0; batch items are independent; unmeasured genes (``gene_mask`` False) are never read;
    - every parameter receives a gradient in each forward/backward, so plain DDP works.

    Parameters
    ----------
    n_genes
        Number of genes G.
    n_dims
        Number of spatial dimensions D (2 or 3).
    hidden_dim
        Width H of cell states; divisible by ``n_heads``.
    n_layers
        Number of transformer layers.
    n_heads
        Attention heads.
    ff_mult
        Feed-forward width as a multiple of H.
    n_fourier_features
        Random Fourier frequencies of the position encoder (0 disables them).
    fourier_scale
        Standard deviation of those frequencies, in 1 / position units.
    dropout
        Dropout in attention and feed-forward.
    layer_norm_eps
        LayerNorm epsilon.
    local_neighbors
        k of the local attention: each cell also attends to its k nearest cells in the current
        positions, in every layer, and the position head adds a displacement along the offsets
        to them (0 disables both).
    local_graph
        Where those k nearest cells are found: ``"positions"``, the current positions;
        ``"expression"``, the top principal axes of the item's current expression
        (:func:`~alphastomics.attn_model.neighbors.expression_coordinates`), so a cell reads the
        cells most like it wherever they currently lie, in items whose expression is no noisier
        than their positions (the others read none); ``"cleaner"``, per item, whichever of the
        two has the lower diffusion time (expression in ``expr_to_pos``, positions in
        ``pos_to_expr``). Distances and offsets are read in the current positions always. The
        search in expression costs O(N·G²) for the axes and a search in 16 dimensions, exact
        (brute force) up to a few tens of thousands of cells per item and approximate above
        (:func:`~alphastomics.attn_model.neighbors.neighbor_index`; costs in docs/benchmarks.md).
    checkpoint_min_cells
        Activation checkpointing: while gradients are recorded, a batch with at least this many
        cells in all (B * N) keeps only each layer's input for the backward pass and recomputes
        the layer's inside there, a chunk of cells at a time (``TransformerLayer``, ``recompute``;
        same gradients, one more forward pass of the layers). ``None`` never, 0 always.
    bf16_min_cells
        While gradients are recorded, a batch with at least this many cells in all (B * N) runs
        the transformer layers, the expression encoder and the expression head under bfloat16
        autocast (their matrix products in bfloat16, much faster than float32 where the device
        multiplies bfloat16 natively
        (:func:`~alphastomics.utils.hardware.native_bf16`); elsewhere float32). The residual
        stream, the attention's key softmax and context, the position encoder and head, the
        outputs and the loss stay float32, so coordinates keep full precision. ``None`` never,
        0 for every training batch. Inference is always float32.

    Examples
    --------
    >>> import dataclasses
    >>> from alphastomics.config import ModelConfig
    >>> net = Denoiser(n_genes=50, n_dims=3, **dataclasses.asdict(ModelConfig()))
    """

    def __init__(
        self,
        *,
        n_genes: int,
        n_dims: int = 3,
        hidden_dim: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        ff_mult: int = 2,
        n_fourier_features: int = 16,
        fourier_scale: float = 1.0,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        local_neighbors: int = 16,
        local_graph: str = "cleaner",
        checkpoint_min_cells: int | None = None,
        bf16_min_cells: int | None = None,
    ) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.n_dims = n_dims
        self.hidden_dim = hidden_dim
        self.local_neighbors = local_neighbors
        if local_graph not in LOCAL_GRAPHS:
            raise ValueError(f"local_graph must be one of {LOCAL_GRAPHS}, got {local_graph!r}")
        self.local_graph = local_graph
        # the search in expression kept within constant_expression()
        self._reuse_expression_search = False
        self._expression_search: tuple[Tensor, Tensor, Tensor] | None = None
        self.checkpoint_min_cells = checkpoint_min_cells
        self.bf16_min_cells = bf16_min_cells

        self.expression_encoder = ExpressionEncoder(n_genes, hidden_dim)
        self.position_encoder = PositionEncoder(
            n_dims, hidden_dim, n_fourier_features, fourier_scale
        )
        self.expression_time = TimeEmbedding(hidden_dim)
        self.position_time = TimeEmbedding(hidden_dim)
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_dim, n_heads, ff_mult, dropout, layer_norm_eps, local_neighbors > 0
            )
            for _ in range(n_layers)
        )
        self.final_norm = AdaptiveLayerNorm(hidden_dim, layer_norm_eps)

        self.expression_head = nn.Linear(hidden_dim, n_genes)
        self.expression_skip = nn.Linear(hidden_dim, n_genes)
        self.position_head = nn.Linear(hidden_dim, n_dims)
        self.position_skip = nn.Linear(hidden_dim, 1)
        self.radius_head = nn.Sequential(
            nn.Linear(hidden_dim + 1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1)
        )
        self.displacement = NeighborDisplacement(hidden_dim) if local_neighbors > 0 else None

    def forward(
        self,
        expression_t: Tensor,
        positions_t: Tensor,
        t_expression: Tensor,
        t_position: Tensor,
        node_mask: Tensor,
        gene_mask: Tensor,
    ) -> DenoiserOutput:
        """Predict clean expression and positions from their noisy versions.

        Parameters
        ----------
        expression_t
            (B, N, G) noisy (or clean) expression.
        positions_t
            (B, N, D) noisy (or clean) positions. Noisy: any translation gives the same output.
            Clean (``t_position`` 0): in the data's frame (the store's per-slice frame).
        t_expression, t_position
            (B,) float diffusion time of each modality in [0, 1] (0 = clean).
        node_mask
            (B, N) bool, True for a real cell.
        gene_mask
            (B, G) bool, True for a gene the item's slice measured.

        Returns
        -------
        DenoiserOutput
            Predictions and representations; padded rows are 0.
        """
        self._check_shapes(
            node_mask,
            expression_t=expression_t,
            positions_t=positions_t,
            t_expression=t_expression,
            t_position=t_position,
            gene_mask=gene_mask,
        )
        mask = node_mask.bool()
        measured = gene_mask.bool()

        # inputs: padded cells and unmeasured genes read as 0, positions re-centred
        expr_t = expression_t
        if not keeps_everything(measured):
            expr_t = expression_t * measured.unsqueeze(1).to(expression_t.dtype)
        expr_t = apply_mask(expr_t, mask)
        pos_t = center(positions_t, mask)  # (B, N, D)
        # clean positions are read where they lie in their frame (a slab of a registered tissue
        # is not its neighbour); noisy ones only relative to their centroid
        clean_pos = (t_position == 0).to(pos_t.dtype).view(-1, 1, 1)  # (B, 1, 1)
        pos_in = pos_t + clean_pos * apply_mask(positions_t - pos_t, mask)  # (B, N, D)

        time_expr = self.expression_time(t_expression)  # (B, H)
        time_pos = self.position_time(t_position)  # (B, H)
        cond = time_expr + time_pos  # (B, H)
        recompute = self._checkpoints(mask)
        bf16 = self._bf16(mask)
        embed = functools.partial(self._embed, measured=measured, bf16=bf16)
        if recompute:  # per-cell stages a chunk at a time, recomputed in backward
            size = chunk_cells(*mask.shape, max(self.n_genes, 2 * self.hidden_dim), 4)
            expr_emb, pos_emb = checkpointed_chunks(embed, (expr_t, pos_in, mask), size)
        else:
            expr_emb, pos_emb = embed(expr_t, pos_in, mask)

        graph = self._neighbor_graph(expr_t, pos_in, mask, t_expression, t_position)
        h = expr_emb + pos_emb  # (B, N, H)
        with _autocast_bf16(mask.device.type, bf16):
            for layer in self.layers:
                h = layer(h, cond, mask, graph, recompute=recompute)
        heads = functools.partial(
            self._heads, cond=cond, time_expr=time_expr, time_pos=time_pos, bf16=bf16
        )
        if recompute:
            h, expr_hat, pos_free = checkpointed_chunks(heads, (h, expr_t, pos_t, mask), size)
        else:
            h, expr_hat, pos_free = heads(h, expr_t, pos_t, mask)
        if self.displacement is not None:
            assert graph is not None
            pos_free = pos_free + self.displacement(h, pos_in, graph)
        pos_hat = center(pos_free, mask)  # (B, N, D)

        return DenoiserOutput(
            expression=expr_hat,
            positions=pos_hat,
            hidden=h,
            expression_embedding=expr_emb,
            position_embedding=pos_emb,
        )

    def _neighbor_graph(
        self,
        expr_t: Tensor,
        pos_in: Tensor,
        mask: Tensor,
        t_expression: Tensor,
        t_position: Tensor,
    ) -> NeighborGraph | None:
        """Every cell's ``local_neighbors`` nearest cells at this evaluation (None when 0).

        Per item, found in the principal axes of the current expression ``expr_t`` (B, N, G)
        or in the current positions ``pos_in`` (B, N, D), per ``local_graph``: ``"cleaner"``
        takes the modality with the lower diffusion time (expression on a tie),
        ``"expression"`` reads none in the other items. Distances are in ``pos_in``."""
        if not self.local_neighbors:
            return None
        k = self.local_neighbors
        in_expression = (t_expression <= t_position).view(-1, 1)  # (B, 1)
        if self.local_graph == "positions":
            in_expression = torch.zeros_like(in_expression)
        spatial = mask & ~in_expression  # (B, N)
        if self.local_graph == "expression":
            spatial = torch.zeros_like(spatial)
        index, valid = neighbor_index(pos_in, spatial, k)  # (B, N, k)
        if bool(in_expression.any()):
            expr_index, expr_valid = self._expression_neighbors(expr_t, mask & in_expression)
            index = torch.where(in_expression.unsqueeze(-1), expr_index, index)
            valid = torch.where(in_expression.unsqueeze(-1), expr_valid, valid)
        return graph_at(pos_in, index, valid)

    @contextlib.contextmanager
    def constant_expression(self) -> Iterator[None]:
        """Within this block the caller promises the same expression and masks at every call.

        Sampling ``expr_to_pos`` evaluates the network at every step with the same clean
        expression: the search in expression of the local graph is then done once, at the
        first evaluation, and reused (the distances, in the current positions, are measured at
        every evaluation). Outside the block every evaluation searches anew.
        """
        self._expression_search = None
        self._reuse_expression_search = True
        try:
            yield
        finally:
            self._reuse_expression_search = False
            self._expression_search = None

    def _expression_neighbors(self, expr_t: Tensor, searched: Tensor) -> tuple[Tensor, Tensor]:
        """Neighbours (B, N, k) index and valid of the ``searched`` (B, N) cells in expression.

        Reused within :meth:`constant_expression` while ``searched`` is the same.
        """
        cached = self._expression_search
        if cached is not None and torch.equal(cached[0], searched):
            return cached[1], cached[2]
        index, valid = expression_neighbor_index(expr_t, searched, self.local_neighbors)
        if self._reuse_expression_search:
            self._expression_search = (searched, index, valid)
        return index, valid

    def _embed(
        self, expr_t: Tensor, pos_in: Tensor, mask: Tensor, *, measured: Tensor, bf16: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-cell embeddings (B, n, H) of expression and positions; padded rows 0.

        With ``bf16`` the expression encoder's products run in bfloat16; positions never do."""
        with _autocast_bf16(expr_t.device.type, bf16):
            expr_emb = self.expression_encoder(expr_t, measured, premasked=True)
        expr_emb = apply_mask(expr_emb.to(pos_in.dtype), mask)
        return expr_emb, apply_mask(self.position_encoder(pos_in), mask)

    def _heads(
        self,
        h: Tensor,
        expr_t: Tensor,
        pos_t: Tensor,
        mask: Tensor,
        *,
        cond: Tensor,
        time_expr: Tensor,
        time_pos: Tensor,
        bf16: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-cell read-out of states ``h`` (B, n, H): normalised states, expression (B, n, G)
        and positions (B, n, D) before the neighbour displacement and centring. With ``bf16``
        the expression head's product runs in bfloat16; the position head never does."""
        h = apply_mask(self.final_norm(h, cond), mask)  # (B, n, H)
        # expression: per-gene skip of the noisy input + correction from the cell state
        gate_expr = torch.sigmoid(self.expression_skip(F.silu(time_expr))).unsqueeze(1)  # (B, 1, G)
        with _autocast_bf16(h.device.type, bf16):
            correction = self.expression_head(h)  # (B, n, G)
        expr_hat = apply_mask(torch.addcmul(correction.to(expr_t.dtype), gate_expr, expr_t), mask)
        # positions: free update path, then a radial correction of the norm
        gate_pos = torch.sigmoid(self.position_skip(F.silu(time_pos))).unsqueeze(1)  # (B, 1, 1)
        pos_free = gate_pos * pos_t + self.position_head(h)  # (B, n, D)
        radius = torch.sqrt(pos_free.square().sum(dim=-1, keepdim=True) + _RADIUS_EPS**2)
        first, _, last = self.radius_head
        delta_radius = activation_linear(first(torch.cat([h, radius], dim=-1)), "silu", last)
        return h, expr_hat, pos_free + pos_free / radius * delta_radius

    def _bf16(self, mask: Tensor) -> bool:
        """Whether this forward pass runs its expression and layer products in bfloat16."""
        large = _large_training_batch(mask, self.bf16_min_cells)
        return large and native_bf16(mask.device.type) is not None

    def _checkpoints(self, mask: Tensor) -> bool:
        """Whether this forward pass recomputes layer activations in backward."""
        return _large_training_batch(mask, self.checkpoint_min_cells)

    def _check_shapes(self, node_mask: Tensor, **inputs: Tensor) -> None:
        """Raise unless each of :meth:`forward`'s ``inputs`` has the shape ``node_mask`` (B, N)
        and the model's sizes imply."""
        b, n = node_mask.shape
        expected = {
            "expression_t": (b, n, self.n_genes),
            "positions_t": (b, n, self.n_dims),
            "t_expression": (b,),
            "t_position": (b,),
            "gene_mask": (b, self.n_genes),
        }
        for name, want in expected.items():
            got = inputs[name].shape
            if tuple(got) != want:
                raise ValueError(
                    f"Denoiser: {name} must have shape {want} (from node_mask {(b, n)}, "
                    f"n_genes={self.n_genes}, n_dims={self.n_dims}), got {tuple(got)}"
                )


def _large_training_batch(mask: Tensor, limit: int | None) -> bool:
    """Gradients are recorded and the batch ``mask`` (B, N) holds at least ``limit`` cells
    (padding included); never for a ``None`` limit."""
    return limit is not None and torch.is_grad_enabled() and mask.numel() >= limit


def _autocast_bf16(device_type: str, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast where ``enabled``, else no change (so an autocast the caller opened,
    such as Lightning's ``bf16-mixed``, stays as it is)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


class NeighborDisplacement(nn.Module):
    """Move each cell along the offsets to its current neighbours: (B, N, D) displacement.

    ``delta_i = sum_j c_ij (x_j - x_i) / k`` with a scalar gate ``c_ij`` of the two cell states
    and their scaled distance, ``c_ij = sum_f a_f(h_i) b_f(h_j) r_f(d_ij)``. A sum of offsets with
    invariant weights is rotation- and reflection-equivariant (as the position updates of EGNN,
    Satorras et al. 2021): it lets the reverse process pull a cell towards the neighbours it
    belongs with and away from the others, which a head reading one cell state cannot.

    Parameters
    ----------
    hidden_dim
        Width H of the cell states.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.source = nn.Linear(hidden_dim, _DISPLACEMENT_RANK)
        self.target = nn.Linear(hidden_dim, _DISPLACEMENT_RANK)
        self.distance = nn.Linear(N_DISTANCE_FEATURES, _DISPLACEMENT_RANK)

    def forward(self, h: Tensor, positions: Tensor, graph: NeighborGraph) -> Tensor:
        """Displacement (B, N, D) from states ``h`` (B, N, H) at ``positions`` (B, N, D)."""
        offset = gather_cells(positions, graph.index) - positions.unsqueeze(2)  # (B, N, k, D)
        target = gather_cells(self.target(h), graph.index)  # (B, N, k, R)
        rbf = distance_features(graph.distance).to(h.dtype)  # (B, N, k, F)
        gate = (self.source(h).unsqueeze(2) * target * self.distance(rbf)).sum(-1)  # (B, N, k)
        gate = gate * graph.valid
        return (gate.unsqueeze(-1) * offset).sum(dim=2) / max(graph.k, 1)  # (B, N, D)
