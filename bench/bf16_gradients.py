"""How far bfloat16 layers (``model.bf16_min_cells``) move a training step's loss and gradient.

For one slice of N cells (the 3D slab and standardised expression of ``bench/scaling.py``) and the
default model, each draw noises the batch once and takes the loss and the parameter gradient
twice from the same noise: with float32 layers (``model.bf16_min_cells=null``) and with bfloat16
layers (``=0``). It prints the relative loss difference and the cosine similarity and relative
norm of the gradient difference, and beside them the cosine similarity of the float32 gradients
of two different noise draws: the noise that stochastic gradient descent works with anyway.

Usage::

    python bench/bf16_gradients.py --n_cells 200000 --draws 3
"""

from __future__ import annotations

import argparse
import sys

import torch

from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.hardware import native_bf16


def _slab(n_cells: int, n_genes: int, seed: int) -> DataHolder:
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(1, n_cells, 3, generator=gen) * torch.tensor([4.0, 3.0, 0.4])
    positions = positions - positions.mean(dim=1, keepdim=True)
    positions = positions / positions.square().sum(-1).mean().sqrt()
    return DataHolder(
        expression=torch.randn(1, n_cells, n_genes, generator=gen),
        positions=positions,
        node_mask=torch.ones(1, n_cells, dtype=torch.bool),
        cell_index=torch.arange(n_cells).unsqueeze(0),
        slice_index=torch.zeros(1, dtype=torch.long),
    )


def _loss_and_gradient(
    module: AlphaSTomicsModule, batch: DataHolder, limit: int | None, draw: int
) -> tuple[float, torch.Tensor]:
    module.model.bf16_min_cells = limit
    module.model.zero_grad(set_to_none=True)
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(draw)).total
    loss.backward()
    grads = [p.grad.flatten().double() for p in module.model.parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat(grads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--draws", type=int, default=3, help="noise draws (one row each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    reason = native_bf16("cpu")
    if reason is None:
        print("this CPU has no native bfloat16: model.bf16_min_cells changes nothing here")
        return 0
    torch.manual_seed(args.seed)
    module = AlphaSTomicsModule(load_config(), args.genes)
    module.train()
    batch = _slab(args.n_cells, args.genes, args.seed)
    print(f"# N = {args.n_cells}, G = {args.genes}, default model; {reason}")
    columns = ("loss rel. diff", "grad cosine", "|dg|/|g|", "cos(g, g_next draw)")
    print(f"{'draw':>4} {columns[0]:>15} {columns[1]:>12} {columns[2]:>9} {columns[3]:>20}")
    previous = None
    for draw in range(args.draws):
        loss32, grad32 = _loss_and_gradient(module, batch, None, draw)
        loss16, grad16 = _loss_and_gradient(module, batch, 0, draw)
        cosine = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
        relative = float((grad16 - grad32).norm() / grad32.norm())
        between = (
            f"{float(torch.nn.functional.cosine_similarity(grad32, previous, dim=0)):20.4f}"
            if previous is not None
            else f"{'':>20}"
        )
        print(
            f"{draw:>4} {abs(loss16 - loss32) / abs(loss32):15.2e} {cosine:12.5f} "
            f"{relative:9.4f} {between}"
        )
        sys.stdout.flush()
        previous = grad32
    return 0


if __name__ == "__main__":
    sys.exit(main())
