"""Command-line pieces the benchmark scripts share: their common flags, the ``KEY=VALUE``
override split, the results files and the entry point.

A script imports this module by name: ``python bench/SCRIPT.py`` puts ``bench/`` first on
``sys.path``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alphastomics import keys
from alphastomics.errors import UserInputError
from alphastomics.utils.io import atomic_write, atomic_write_json


def input_parser(
    prog: str, description: str
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A parser that shows defaults in ``--help``, and its ``data and split`` group holding
    ``--h5ad``, ``--position_key``, ``--slice_key`` and ``--cell_type_key``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data and split")
    data.add_argument("--h5ad", type=Path, required=True, help="input AnnData file")
    data.add_argument("--position_key", required=True, help="adata.obsm key of the coordinates")
    data.add_argument("--slice_key", default=keys.SLICE_KEY, help="adata.obs column naming slices")
    data.add_argument("--cell_type_key", default=None, help="adata.obs column of cell types")
    return parser, data


def add_sampling_arguments(
    group: argparse._ArgumentGroup, *, held_out: str, seeds_help: str
) -> None:
    """``--checkpoint`` (trained on the same split, or the ``held_out`` leak into training),
    ``--num_seeds`` (described by ``seeds_help``), ``--steps``, ``--sampler`` and ``--device``."""
    group.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="skip training and score this checkpoint (it must have been trained on the "
        f"same split, or held-out {held_out} leak into training)",
    )
    group.add_argument("--num_seeds", type=int, default=1, help=seeds_help)
    group.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
    group.add_argument(
        "--sampler", default=None, choices=("ddim", "ddpm"), help="sampler (default: config)"
    )
    group.add_argument(
        "--device",
        default="auto",
        help="device for sampling: auto (cuda when available), cpu, cuda",
    )


def add_output_arguments(parser: argparse.ArgumentParser, default_dir: str) -> None:
    """The ``output`` group: ``--output_dir`` (``default_dir`` names its default) and
    ``--overwrite``."""
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", type=Path, default=None, help=f"default {default_dir}")
    out.add_argument("--overwrite", action="store_true", help="reuse a non-empty --output_dir")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(arguments for argparse, ``KEY=VALUE`` config overrides)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def run_cli(args: Sequence[object], log_path: Path | None = None) -> None:
    """Run ``alphastomics ARGS`` with this interpreter in a subprocess (its output written to
    ``log_path``); a failure is a :class:`UserInputError` naming the command and its last line."""
    command = [sys.executable, "-m", "alphastomics.main", *map(str, args)]
    logging.getLogger(__name__).info("running %s", " ".join(command[2:]))
    if log_path is None:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        output = done.stderr
    else:
        with log_path.open("w") as handle:
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
        output = log_path.read_text()
    if done.returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["(no output)"]
        raise UserInputError(f"`alphastomics {args[0]}` failed ({done.returncode}): {tail[0]}")


def write_results(output_dir: Path, result: dict[str, Any], text: str) -> None:
    """Write ``results.json`` (``result``) and ``results.md`` (``text``), and print both."""
    atomic_write_json(output_dir / "results.json", result)
    atomic_write(output_dir / "results.md", lambda tmp: tmp.write_text(text))
    print(text)
    print(f"results in {output_dir / 'results.md'} and {output_dir / 'results.json'}")


def main(run: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None) -> int:
    """Logging set up, then ``run(argv)``: a problem with the input is one line on stderr and
    exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
