"""Small blocks of the denoiser: time embedding, adaptive LayerNorm, feed-forward, cell encoders."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# t in [0, 1] is stretched onto the 0..1000 integer-step range the classic sinusoidal embedding was
# built for (Vaswani et al. 2017; Ho et al. 2020), so its slow frequencies still vary over [0, 1].
_TIME_SCALE = 1000.0
_MAX_PERIOD = 10000.0


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _use_fused(x: Tensor) -> bool:
    # The memory-lean autograd functions below only run where they change nothing but memory:
    # a gradient is being recorded and no autocast region re-types the ops inside them.
    return torch.is_grad_enabled() and not _autocast_enabled(x.device.type)


class _ModulatedLayerNorm(torch.autograd.Function):
    """``layer_norm(x) * (1 + scale) + shift`` saving only ``x`` and the (B, N, 1) statistics.

    The plain expression keeps both ``x`` (for LayerNorm's backward) and ``layer_norm(x)`` (for
    the gradient of ``scale``) alive until the backward pass; this recomputes the normalised
    values there instead (one element-wise pass), one (B, N, H) tensor less per call.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
        normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        ctx.save_for_backward(x, mean, rstd, scale)
        return torch.addcmul(shift, normed, 1 + scale)  # (B, N, H)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, scale = ctx.saved_tensors
        need_x, need_scale, need_shift, _ = ctx.needs_input_grad
        grad_x = grad_scale = grad_shift = None
        if need_scale:
            normed = (x - mean) * rstd  # (B, N, H), recomputed
            grad_scale = (grad * normed).sum(dim=1, keepdim=True)  # (B, 1, H)
        if need_shift:
            grad_shift = grad.sum(dim=1, keepdim=True)  # (B, 1, H)
        if need_x:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad * (1 + scale), x, (x.shape[-1],), mean, rstd, None, None, [True, False, False]
            )[0]
        return grad_x, grad_scale, grad_shift, None


class _ActivationLinear(torch.autograd.Function):
    """``linear(act(a), weight, bias)`` saving only ``a``: the activation is recomputed in backward.

    The plain modules keep both ``a`` (for the activation's backward) and ``act(a)`` (for the
    linear layer's weight gradient): one (B, N, width) tensor more per call.
    """

    @staticmethod
    def forward(
        ctx: Any, a: Tensor, weight: Tensor, bias: Tensor | None, activation: str
    ) -> Tensor:
        ctx.save_for_backward(a, weight)
        ctx.has_bias = bias is not None
        ctx.activation = activation
        return F.linear(_ACTIVATIONS[activation](a), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, weight = ctx.saved_tensors
        need_a, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_a = grad_weight = grad_bias = None
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (B·N, out)
        if need_weight:
            hidden = _ACTIVATIONS[ctx.activation](a).reshape(-1, a.shape[-1])  # recomputed
            grad_weight = grad_2d.t() @ hidden  # (out, in)
        if need_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(dim=0)
        if need_a:
            grad_hidden = grad @ weight  # (..., in)
            if ctx.activation == "gelu":
                grad_a = torch.ops.aten.gelu_backward(grad_hidden, a)
            else:
                grad_a = torch.ops.aten.silu_backward(grad_hidden, a)
        return grad_a, grad_weight, grad_bias, None


_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


def activation_linear(a: Tensor, activation: str, linear: nn.Linear) -> Tensor:
    """``linear(act(a))`` for ``activation`` in {"gelu", "silu"}, memory-lean under autograd."""
    if _use_fused(a):
        return _ActivationLinear.apply(a, linear.weight, linear.bias, activation)
    return linear(_ACTIVATIONS[activation](a))


class TimeEmbedding(nn.Module):
    """Diffusion time t in [0, 1] -> sinusoidal features -> MLP -> (B, H).

    Parameters
    ----------
    hidden_dim
        Output width H.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        n_freqs = max(hidden_dim // 2, 1)
        freqs = torch.exp(-math.log(_MAX_PERIOD) * torch.arange(n_freqs) / n_freqs)  # (F,)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_freqs, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        """Embed times ``t`` (B,) -> (B, H)."""
        angles = (t.to(self.freqs.dtype) * _TIME_SCALE).unsqueeze(-1) * self.freqs  # (B, F)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))  # (B, H)


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm whose per-feature scale and shift are predicted from a condition (DiT's adaLN).

    ``norm(x) * (1 + scale(c)) + shift(c)``: the noise levels change which features matter, so
    every layer re-weights its normalised input by them (Peebles & Xie 2023 found this beats
    adding the time embedding to the tokens). Not zero-initialised, so every weight gets a
    gradient from the first step on.

    Parameters
    ----------
    hidden_dim
        Feature width H of both ``x`` and the condition.
    eps
        LayerNorm epsilon.
    """

    def __init__(self, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, eps=eps, elementwise_affine=False)
        self.modulation = nn.Linear(hidden_dim, 2 * hidden_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Normalise ``x`` (B, N, H) and modulate it by ``cond`` (B, H) -> (B, N, H)."""
        shift, scale = self.modulation(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, H)
        if _use_fused(x):
            return _ModulatedLayerNorm.apply(x, scale, shift, self.norm.eps)
        return self.norm(x) * (1 + scale) + shift


class FeedForward(nn.Module):
    """Per-cell MLP H -> ff_mult·H -> H of a transformer layer."""

    def __init__(self, hidden_dim: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_dim, ff_mult * hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * hidden_dim, hidden_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, H) -> (B, N, H)."""
        first, _, dropout, second, _ = self.net
        if self.training and dropout.p > 0:
            return self.net(x)
        return activation_linear(first(x), "gelu", second)


class ExpressionEncoder(nn.Module):
    """Per-cell expression plus the per-gene "measured" indicator -> (B, N, H).

    The input is ``[expression * gene_mask, gene_mask]``: an unmeasured gene reads as 0 *and* is
    flagged as unmeasured, so the network can tell it apart from a measured zero.

    Parameters
    ----------
    n_genes
        Number of genes G.
    hidden_dim
        Output width H.
    """

    def __init__(self, n_genes: int, hidden_dim: int) -> None:
        super().__init__()
        # One Linear on the concatenation, split in two so the (B, N, 2G) input is never built:
        # the indicator half is the same for every cell of an item.
        self.expression_in = nn.Linear(n_genes, hidden_dim)
        self.measured_in = nn.Linear(n_genes, hidden_dim, bias=False)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, expression: Tensor, gene_mask: Tensor, *, premasked: bool = False) -> Tensor:
        """Encode ``expression`` (B, N, G) with ``gene_mask`` (B, G) bool -> (B, N, H).

        ``premasked=True`` promises that ``expression`` is already 0 at unmeasured genes, which
        saves a (B, N, G) copy.
        """
        measured = gene_mask.to(expression.dtype)  # (B, G)
        if not premasked:
            expression = expression * measured.unsqueeze(1)
        h = self.expression_in(expression)  # (B, N, H)
        h = h + self.measured_in(measured).unsqueeze(1)  # (B, N, H)
        return activation_linear(h, "silu", self.mlp[1])


class PositionEncoder(nn.Module):
    """Per-cell coordinates -> (B, N, H), keeping both direction and distance from the centroid.

    Features are ``[x, ||x||, sin(x W), cos(x W)]`` for centred coordinates ``x`` (D values, so
    direction and distance both survive; LUNA fed only the unit direction ``x / ||x||``), followed
    by an MLP.

    The random Fourier features give the linear attention a locality kernel. For
    ``w ~ N(0, s² I)``, ``E[cos(w·(x - y))] = exp(-s² ||x - y||² / 2)`` (Bochner's theorem;
    Rahimi & Recht 2007), so the dot product of the features of two cells approximates a
    Gaussian kernel of their distance with width ``1 / fourier_scale`` in position units (with
    coordinates scaled to unit RMS radius: in slice radii). Linear attention never forms a pair
    of cells, so its weights are sums of (query-cell factor × key-cell factor); raw coordinates
    give such products only ``x·y``, which is not a function of ``x - y``, while these features
    let the factors express distance-dependent, local weights. ``W`` is drawn once at construction
    and kept as a persistent buffer, so a checkpoint reproduces the same features.

    Parameters
    ----------
    n_dims
        Number of spatial dimensions D.
    hidden_dim
        Output width H.
    n_fourier_features
        Number F of random frequencies (2F features); 0 disables them.
    fourier_scale
        Standard deviation s of the frequencies, in 1 / position units.
    """

    def __init__(
        self, n_dims: int, hidden_dim: int, n_fourier_features: int, fourier_scale: float
    ) -> None:
        super().__init__()
        weight = torch.randn(n_dims, n_fourier_features) * fourier_scale  # (D, F)
        self.register_buffer("fourier_weight", weight, persistent=True)
        in_dim = n_dims + 1 + 2 * n_fourier_features
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )

    def forward(self, positions: Tensor) -> Tensor:
        """Encode centred ``positions`` (B, N, D) -> (B, N, H)."""
        radius = torch.linalg.vector_norm(positions, dim=-1, keepdim=True)  # (B, N, 1)
        angles = positions @ self.fourier_weight.to(positions.dtype)  # (B, N, F)
        features = torch.cat([positions, radius, angles.sin(), angles.cos()], dim=-1)
        return activation_linear(self.mlp[0](features), "silu", self.mlp[2])  # (B, N, H)
