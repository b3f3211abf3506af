"""How far bfloat16 layers (``model.bf16_min_cells``) move a training step's loss and gradient.

For one slice of N cells (``bench/scaling.py``'s ``slab_batch``: a 3D slab, standardised expression) and the
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
from scaling import slab_batch  # `python bench/SCRIPT.py` puts bench/ first on sys.path

from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder
from alphastomics.training.module import AlphaSTomicsModule
from alphastomics.utils.hardware import native_bf16


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
    batch = slab_batch(args.n_cells, args.genes, args.seed)
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
