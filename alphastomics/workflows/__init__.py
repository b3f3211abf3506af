"""One function per CLI command: parse-free wiring of library calls (`cmd_<name>(args)`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alphastomics.errors import UserInputError

log = logging.getLogger("alphastomics")


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
    from alphastomics.data.anndata import read_gene_list
    from alphastomics.data.preprocess import SpatialDataPreprocessor

    genes = read_gene_list(args.gene_list_file) if args.gene_list_file else None
    pre = SpatialDataPreprocessor(
        gene_list=genes,
        position_key=args.position_key,
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
    from alphastomics.workflows.evaluate import run_evaluation, summary_lines

    output_dir = args.output_dir or args.checkpoint.parent.parent / f"test_{args.split}"
    if (output_dir / "metrics.json").exists():
        check_output_dir(output_dir, overwrite=args.overwrite)
    module = load_module(args.checkpoint)
    if args.steps is not None and not 1 <= args.steps <= module.noise_model.T:
        raise UserInputError(
            f"--steps {args.steps} must be between 1 and the model's diffusion_steps ({module.noise_model.T})"
        )
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


def _min_gene_overlap(args: argparse.Namespace, *, impute: bool = False) -> float:
    """--min_gene_overlap, or its default: 0.5, and for impute none (one shared gene will do:
    a panel is often a small share of a reference's genes)."""
    if args.min_gene_overlap is not None:
        return args.min_gene_overlap
    return 0.0 if impute else 0.5


def cmd_sample(args: argparse.Namespace) -> None:
    from alphastomics.training.checkpoint import load_module
    from alphastomics.workflows.sampling import (
        check_sample_request,
        default_output,
        parse_n_cells,
        sample_h5ad,
        sample_pt,
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
    module = load_module(args.checkpoint)
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
        keys = {
            "position_key": args.position_key,
            "slice_key": args.slice_key,
            "cell_type_key": args.cell_type_key,
            "layer": args.layer,
        }
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
        keys = {
            "position_key": args.position_key,
            "slice_key": args.slice_key,
            "cell_type_key": args.cell_type_key,
            "layer": args.layer,
        }
        extract_h5ad(
            module,
            args.input_data,
            output,
            args.extract_mode,
            keys=keys,
            normalize=args.normalize,
            min_gene_overlap=_min_gene_overlap(args),
        )
    log.info("wrote %s", output)


def cmd_demo(args: argparse.Namespace) -> None:
    from alphastomics.workflows.demo import run_demo

    report = run_demo(
        args.output_dir, minutes=args.minutes, seed=args.seed, overwrite=args.overwrite
    )
    print(f"\nDemo finished. Report: {report}\nFigures, metrics and samples: {args.output_dir}")
