"""Command line: `alphastomics preprocess|train|test|sample|extract|demo`. Wiring only, no maths.

The parser and one ``cmd_<name>(args)`` per command: each checks its arguments (one-line
:class:`UserInputError` naming the flag), then calls into :mod:`alphastomics.workflows`, whose
functions take no argparse. Kept in one file (over 500 lines) so every flag and its check are
read together.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from alphastomics import __version__, keys
from alphastomics.errors import ConfigKeyError, TrainingStopped, UserInputError

log = logging.getLogger("alphastomics")
_CONFIG_KEY_HINT = ". See `alphastomics train --print_config` for every key and its type"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _seed(text: str) -> int:
    """An argparse type: a seed in numpy's range [0, 2**32 - 1]."""
    from alphastomics.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, {MAX_SEED}]")
    return value


def _share(text: str) -> float:
    """An argparse type: a share in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1] (write 0.5 for 50%)")
    return value


_CHECKPOINT_HELP = (
    "a .ckpt written by `alphastomics train` (RUN/checkpoints/best.ckpt or last.ckpt)"
)
_SAMPLER_HELP = (
    "ddim: few steps (default, sampling.sampler of the checkpoint); ddpm: ancestral, all "
    "diffusion steps"
)


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    """Flags of a new .h5ad for a trained model; defaults: what preprocess used."""
    p.add_argument(
        "--position_key", help="adata.obsm key of coordinates (default: the training key)"
    )
    p.add_argument("--slice_key", help="adata.obs column naming slices (default: the training key)")
    p.add_argument(
        "--cell_type_key", help="adata.obs column of cell types (default: the training key)"
    )
    p.add_argument("--layer", help="use adata.layers[LAYER] instead of X (default: as at training)")
    p.add_argument(
        "--normalize",
        choices=["auto", "log1p", "none"],
        help="default: as at preprocess time, and an input of another kind than the training "
        "data (raw counts vs. normalised) is refused; auto|log1p|none as for preprocess",
    )
    p.add_argument(
        "--min_gene_overlap",
        type=_share,
        default=None,
        help="refuse when less than this share (0-1) of the model's genes is in the input "
        "(default 0.5; for sample --sample_mode impute, one shared gene is enough)",
    )
    p.add_argument(
        "--frame",
        choices=["auto", "training", "own"],
        default="auto",
        help="how coordinates are centred and scaled: training = as the one slice or volume a "
        "model was trained on (registered coordinates), own = each slice on its own; auto "
        "(default): training for a model of one slice or volume when the slice lies within "
        "its extent, else own (logged)",
    )


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="AnnData (.h5ad) files -> processed store for training")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input_dir", type=Path, help="folder whose *.h5ad files are all read")
    src.add_argument("--input", type=Path, nargs="+", help="one or more .h5ad files")
    p.add_argument("--output_dir", type=Path, required=True, help="where the store is written")
    p.add_argument(
        "--config",
        type=Path,
        help="YAML config whose data.preprocessing section gives the defaults of "
        "--gene_list_file and --position_key (default: the packaged config.yaml)",
    )
    p.add_argument(
        "--gene_list_file",
        type=Path,
        help="one gene per line: the model's genes (default: data.preprocessing.gene_list_file)",
    )
    p.add_argument(
        "--position_key",
        help="adata.obsm key of coordinates (default: data.preprocessing.position_key, ccf)",
    )
    p.add_argument(
        "--slice_key", default=keys.SLICE_KEY, help="adata.obs column naming each cell's slice"
    )
    p.add_argument("--cell_type_key", help="adata.obs column with cell-type labels (optional)")
    p.add_argument("--layer", help="use adata.layers[LAYER] instead of X")
    p.add_argument(
        "--normalize",
        choices=["auto", "log1p", "none"],
        default="auto",
        help="auto: counts get library-size normalisation + log1p, normalised data is kept",
    )
    p.add_argument("--val_slices", nargs="+", help="slice names held out for validation")
    p.add_argument("--test_slices", nargs="+", help="slice names held out for testing")
    p.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help="share of slices for validation (default: 0.1 when at least 5 slices are left to "
        "train on, else none; 0.1 of the cells of a single slice)",
    )
    p.add_argument("--test_fraction", type=float, default=0.1, help="share of slices for testing")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the split (0 to 2**32-1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a processed store")
    p.add_argument("--config", type=Path, help="YAML config (default: the packaged config.yaml)")
    p.add_argument("--data_dir", type=Path, help="processed store written by preprocess")
    p.add_argument(
        "--data_mode", choices=["auto", "slice", "cell"], help="overrides data.loading.mode"
    )
    p.add_argument("--output_dir", type=Path, default=Path("outputs"), help="run folder")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.ckpt"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in a run folder with checkpoints"
    )
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _add_sampling_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="sampling.KEY=VALUE",
        help="change how the checkpoint samples, e.g. sampling.consensus=0 (sampling.* only)",
    )


def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="sample held-out slices and write metrics.json and figures")
    p.add_argument("--checkpoint", type=Path, required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--data_dir", type=Path, required=True, help="processed store to score")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="test",
        help="which slices of the store to sample and score (default test)",
    )
    p.add_argument("--output_dir", type=Path, help="default: CHECKPOINT_DIR/../test_<split>")
    p.add_argument(
        "--steps",
        type=int,
        help="DDIM network evaluations (default: the checkpoint's sampling.steps)",
    )
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help=_SAMPLER_HELP)
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the sampling noise (0 to 2**32-1)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing metrics and figures")
    _add_sampling_overrides(p)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate positions, expression or whole tissue")
    p.add_argument("--checkpoint", type=Path, required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--input_data", type=Path, required=True, help=".h5ad or .pt input")
    p.add_argument(
        "--sample_mode",
        required=True,
        help="expr_to_pos | pos_to_expr | impute (the genes the input lacks, from the genes it "
        "has and its positions) | joint",
    )
    p.add_argument("--output", type=Path, help="output file (default: beside the input)")
    p.add_argument(
        "--steps",
        type=int,
        help="DDIM network evaluations (default: the checkpoint's sampling.steps)",
    )
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help=_SAMPLER_HELP)
    p.add_argument(
        "--num_samples",
        type=int,
        default=1,
        help="samples per cell (spread reported); joint: tissues per reference slice",
    )
    p.add_argument(
        "--n_cells",
        metavar="N | NAME=N,...",
        help="joint: cells per generated slice, one count for all (2000) or per reference slice "
        "(embryo3_z2=2483,embryo3_z5=2124; slices not named keep their count); default: the "
        "reference slice's count",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the sampling noise (0 to 2**32-1); the same seed gives the same output",
    )
    p.add_argument(
        "--measured_key",
        help="pos_to_expr on an .h5ad: a boolean obs column; cells marked True are measured and "
        "keep their expression, the others are imputed from them (the neighbour read-out)",
    )
    _add_input_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_sampling_overrides(p)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="per-cell embeddings from a trained model")
    p.add_argument("--checkpoint", type=Path, required=True, help=_CHECKPOINT_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data_dir", type=Path, help="processed store (all its slices)")
    src.add_argument("--input_data", type=Path, help=".h5ad: also writes obsm['X_alphastomics']")
    p.add_argument("--output", type=Path, required=True, help="embeddings .npz")
    p.add_argument(
        "--extract_mode",
        choices=["transformer", "expression", "position", "all"],
        default="all",
        help="which embeddings: the transformer's per-cell output, the expression or the "
        "position encoder's, or all three (default)",
    )
    _add_input_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="whole pipeline on generated tissue, in minutes on a CPU")
    p.add_argument(
        "--output_dir", type=Path, default=Path("outputs/demo"), help="where everything is written"
    )
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget (> 0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of data, training and sampling")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alphastomics",
        description="Dual-modality diffusion over gene expression and 3D positions of cells.",
    )
    parser.add_argument("--version", action="version", version=f"alphastomics {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_preprocess, _add_train, _add_test, _add_sample, _add_extract, _add_demo):
        add(sub)
    return parser


# -- commands: argument checks, then one call into the workflows -----------------------------


def _h5ad_files(args: argparse.Namespace) -> list[Path]:
    if args.input_dir is not None:
        if not args.input_dir.is_dir():
            raise UserInputError(f"--input_dir {args.input_dir} is not a folder")
        files = sorted(args.input_dir.glob("*.h5ad"))
        if not files:
            raise UserInputError(f"--input_dir {args.input_dir} holds no .h5ad file")
        return files
    return list(args.input)


def cmd_preprocess(args: argparse.Namespace) -> None:
    from alphastomics.config import load_config
    from alphastomics.data.anndata import read_gene_list
    from alphastomics.data.preprocess import SpatialDataPreprocessor

    # flags win over the config's data.preprocessing section
    settings = load_config(args.config).data.preprocessing
    gene_list_file = args.gene_list_file or settings.gene_list_file
    genes = read_gene_list(Path(gene_list_file)) if gene_list_file else None
    pre = SpatialDataPreprocessor(
        gene_list=genes,
        position_key=args.position_key or settings.position_key,
        position_is_3d=settings.position_is_3d,
        slice_key=args.slice_key,
        cell_type_key=args.cell_type_key,
        layer=args.layer,
        normalize=args.normalize,
        val_slices=args.val_slices,
        test_slices=args.test_slices,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    meta = pre.preprocess_and_save(_h5ad_files(args), args.output_dir, overwrite=args.overwrite)
    log.info(
        "wrote %s: %d genes, %d slices (train %d, val %d, test %d)",
        args.output_dir,
        meta["n_genes"],
        len(meta["slices"]),
        len(meta["split"]["train"]),
        len(meta["split"]["val"]),
        len(meta["split"]["test"]),
    )


def cmd_train(args: argparse.Namespace) -> None:
    from alphastomics.config import config_to_annotated_yaml, load_config

    overrides = list(args.overrides)
    if args.data_mode:
        overrides.append(f"data.loading.mode={args.data_mode}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_to_annotated_yaml(cfg), end="")
        return
    if args.data_dir is None:
        raise UserInputError(
            "train needs --data_dir (a folder written by `alphastomics preprocess`)"
        )
    from alphastomics.workflows.train import run_training

    run_training(cfg, args.data_dir, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    log.info("checkpoints in %s", args.output_dir / "checkpoints")


def cmd_test(args: argparse.Namespace) -> None:
    from alphastomics.training.checkpoint import load_module
    from alphastomics.utils.io import check_output_dir
    from alphastomics.workflows.inputs import check_steps
    from alphastomics.workflows.test import run_evaluation, summary_lines

    output_dir = args.output_dir or args.checkpoint.parent.parent / f"test_{args.split}"
    if (output_dir / "metrics.json").exists():
        check_output_dir(output_dir, overwrite=args.overwrite)
    module = load_module(args.checkpoint, sampling_overrides=args.overrides)
    check_steps(module, args.steps)
    result = run_evaluation(
        module,
        args.data_dir,
        output_dir,
        split=args.split,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        checkpoint=str(args.checkpoint),
    )
    for line in summary_lines(result["overall"]):
        log.info("%s", line)
    log.info("metrics and figures in %s", output_dir)


def _input_keys(args: argparse.Namespace) -> dict[str, str | None]:
    """The AnnData keys of ``_add_input_flags`` (None: the checkpoint's)."""
    return {
        "position_key": args.position_key,
        "slice_key": args.slice_key,
        "cell_type_key": args.cell_type_key,
        "layer": args.layer,
    }


def _min_gene_overlap(args: argparse.Namespace, *, impute: bool = False) -> float:
    """--min_gene_overlap, or its default: 0.5, and for impute none (one shared gene will do:
    a panel is often a small share of a reference's genes)."""
    if args.min_gene_overlap is not None:
        return args.min_gene_overlap
    return 0.0 if impute else 0.5


def cmd_sample(args: argparse.Namespace) -> None:
    from alphastomics.training.checkpoint import load_module
    from alphastomics.workflows.generate import parse_n_cells
    from alphastomics.workflows.pt import sample_pt
    from alphastomics.workflows.sampling import (
        check_sample_request,
        default_output,
        sample_h5ad,
        validate_output,
    )

    source = args.input_data
    if source.suffix not in (".h5ad", ".pt"):
        raise UserInputError(f"--input_data {source} must be an .h5ad or .pt file")
    if not source.is_file():
        raise UserInputError(f"--input_data {source} does not exist")
    if args.sample_mode == "impute" and source.suffix != ".h5ad":
        raise UserInputError(
            f"--sample_mode impute reads which genes were measured from var_names, so it needs "
            f"an .h5ad input; got {source.name}"
        )
    if args.frame != "auto" and source.suffix == ".pt":
        raise UserInputError(
            f"--frame {args.frame} reads .h5ad coordinates; {source.name} holds positions in "
            "the model's units already. Drop --frame"
        )
    n_cells = None
    if args.n_cells is not None:
        if args.sample_mode != "joint" or source.suffix != ".h5ad":
            raise UserInputError(
                f"--n_cells {args.n_cells} sets the cell count of slices generated from an "
                f".h5ad reference (--sample_mode joint); got --sample_mode {args.sample_mode} "
                f"on {source.name}. Drop --n_cells, or use --sample_mode joint with an .h5ad"
            )
        n_cells = parse_n_cells(args.n_cells)
    if args.measured_key is not None and (
        args.sample_mode != "pos_to_expr" or source.suffix != ".h5ad"
    ):
        raise UserInputError(
            f"--measured_key {args.measured_key} marks measured cells for pos_to_expr on an "
            f".h5ad input; got --sample_mode {args.sample_mode} on {source.name}. Drop "
            "--measured_key, or use --sample_mode pos_to_expr with an .h5ad"
        )
    if args.measured_key is not None and args.num_samples > 1:
        raise UserInputError(
            f"--num_samples {args.num_samples} with --measured_key: imputing from measured cells "
            "gives one point estimate, not draws; drop --num_samples"
        )
    output = validate_output(
        args.output or default_output(source, args.sample_mode), source, args.overwrite
    )
    module = load_module(args.checkpoint, sampling_overrides=args.overrides)
    check_sample_request(module, args.sample_mode, args.steps, args.num_samples)
    common = {
        "mode": args.sample_mode,
        "sampler": args.sampler,
        "steps": args.steps,
        "num_samples": args.num_samples,
        "seed": args.seed,
    }
    if source.suffix == ".pt":
        sample_pt(module, source, output, **common)
    else:
        keys = _input_keys(args)
        sample_h5ad(
            module,
            source,
            output,
            keys=keys,
            min_gene_overlap=_min_gene_overlap(args, impute=args.sample_mode == "impute"),
            normalize=args.normalize,
            checkpoint=str(args.checkpoint),
            measured_key=args.measured_key,
            n_cells=n_cells,
            frame=args.frame,
            **common,
        )
    log.info("wrote %s", output)


def cmd_extract(args: argparse.Namespace) -> None:
    from alphastomics.training.checkpoint import load_module
    from alphastomics.utils.io import check_output_file
    from alphastomics.workflows.extract import extract_h5ad, extract_store

    if args.output.suffix != ".npz":
        raise UserInputError(f"--output {args.output} must end in .npz")
    output = check_output_file(args.output, overwrite=args.overwrite)
    if args.input_data is not None:
        check_output_file(output.with_suffix(".h5ad"), overwrite=args.overwrite)
    module = load_module(args.checkpoint)
    if args.data_dir is not None:
        extract_store(module, args.data_dir, output, args.extract_mode)
    else:
        keys = _input_keys(args)
        extract_h5ad(
            module,
            args.input_data,
            output,
            args.extract_mode,
            keys=keys,
            normalize=args.normalize,
            min_gene_overlap=_min_gene_overlap(args),
            frame=args.frame,
        )
    log.info("wrote %s", output)


def cmd_demo(args: argparse.Namespace) -> None:
    from alphastomics.workflows.demo import run_demo

    report = run_demo(
        args.output_dir, minutes=args.minutes, seed=args.seed, overwrite=args.overwrite
    )
    print(f"\nDemo finished. Report: {report}\nFigures, metrics and samples: {args.output_dir}")


def _commands() -> dict[str, Callable[[argparse.Namespace], None]]:
    return {
        "preprocess": cmd_preprocess,
        "train": cmd_train,
        "test": cmd_test,
        "sample": cmd_sample,
        "extract": cmd_extract,
        "demo": cmd_demo,
    }


def _is_override(item: str) -> bool:
    return "=" in item and not item.startswith("-")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alphastomics`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may come after flags: `train a.b=1 --resume c.d=2`
        if extra and args.command == "train" and all(_is_override(e) for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        _commands()[args.command](args)
    except UserInputError as err:
        hint = _CONFIG_KEY_HINT if isinstance(err, ConfigKeyError) else ""
        print(f"alphastomics {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"alphastomics {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"alphastomics {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        from alphastomics.utils.io import write_failure

        message = write_failure(err)
        if message is None:
            raise
        print(f"alphastomics {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
