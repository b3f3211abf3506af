"""Distributed training: strategy mapping, torchrun checks, the launch script, a 2-process CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tiny_adata
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from alphastomics.attn_model.transformer import TransformerLayer
from alphastomics.config import load_config
from alphastomics.data.batch import DataHolder
from alphastomics.data.loader import create_dataloaders
from alphastomics.data.preprocess import SpatialDataPreprocessor
from alphastomics.data.store import ProcessedStore
from alphastomics.errors import UserInputError
from alphastomics.training import trainer as trainer_module
from alphastomics.training.checkpoint import load_module
from alphastomics.training.trainer import (
    FSDPGradientClipping,
    HolderDeepSpeedPrecision,
    HolderFSDPPrecision,
    build_strategy,
    build_trainer,
    resolve_devices,
)

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "scripts" / "run_distributed.sh"
TINY_MODEL = [
    "model.hidden_dim=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_fourier_features=4",
    "diffusion.diffusion_steps=50",
    "sampling.steps=2",
    "training.val_sample_steps=2",
    "training.accelerator=cpu",  # 2 CPU processes with gloo, also on a machine with a GPU
]


def _cfg(*overrides: str) -> Any:
    return load_config(overrides=list(overrides))


def _one_line_error(excinfo: pytest.ExceptionInfo[UserInputError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ------------------------------------------------------------------------------------------
# Strategies


def test_disabled_is_auto() -> None:
    assert build_strategy(_cfg(), "gpu") == "auto"


@pytest.mark.parametrize(("accelerator", "backend"), [("cpu", "gloo"), ("gpu", "nccl")])
def test_ddp_backend_follows_accelerator(accelerator: str, backend: str) -> None:
    strategy = build_strategy(_cfg("distributed.enabled=true"), accelerator)
    assert isinstance(strategy, DDPStrategy)
    assert strategy.process_group_backend == backend


def test_fsdp_options_without_a_gpu() -> None:
    cfg = _cfg("distributed.enabled=true", "distributed.strategy=fsdp")
    strategy = build_strategy(cfg, "gpu")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy._state_dict_type == "full"  # one-file checkpoints that load_module reads
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TransformerLayer}
    assert isinstance(strategy.precision_plugin, HolderFSDPPrecision)


def test_fsdp_on_cpu_is_a_one_line_error() -> None:
    cfg = _cfg("distributed.enabled=true", "distributed.strategy=fsdp")
    with pytest.raises(UserInputError) as excinfo:
        build_strategy(cfg, "cpu")
    _one_line_error(excinfo, "distributed.strategy=fsdp", "distributed.strategy=ddp")


def test_fsdp_trainer_clips_through_the_root_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """build_trainer wiring for FSDP on a GPU machine, checked without one."""
    captured: dict[str, Any] = {}
    monkeypatch.setattr(trainer_module, "resolve_accelerator", lambda cfg: "gpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(trainer_module.pl, "Trainer", lambda **kwargs: captured.update(kwargs))
    cfg = _cfg(
        "distributed.enabled=true",
        "distributed.strategy=fsdp",
        "distributed.devices=2",
        "training.gradient_clip_val=0.5",
    )
    build_trainer(cfg, tmp_path, enable_progress_bar=False)
    assert isinstance(captured["strategy"], FSDPStrategy)
    assert (captured["accelerator"], captured["devices"], captured["num_nodes"]) == ("gpu", 2, 1)
    assert captured["gradient_clip_val"] is None  # Lightning refuses norm clipping under FSDP
    clips = [c for c in captured["callbacks"] if isinstance(c, FSDPGradientClipping)]
    assert [c.max_norm for c in clips] == [0.5]
    assert captured["use_distributed_sampler"] is False


def test_fsdp_clipping_callback_calls_the_root_module() -> None:
    calls: list[float] = []
    root = SimpleNamespace(clip_grad_norm_=calls.append)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    FSDPGradientClipping(0.7).on_before_optimizer_step(trainer, None, None)  # type: ignore[arg-type]
    assert calls == [0.7]


def test_deepspeed_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_module.importlib.util.find_spec
    monkeypatch.setattr(
        trainer_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    cfg = _cfg("distributed.enabled=true", "distributed.strategy=deepspeed")
    with pytest.raises(UserInputError) as excinfo:
        build_strategy(cfg, "gpu")
    _one_line_error(excinfo, "pip install 'alphastomics[deepspeed]'", "distributed.strategy=ddp")


def test_deepspeed_on_cpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_module.importlib.util.find_spec
    monkeypatch.setattr(
        trainer_module.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "deepspeed" else real(name, *a),
    )
    cfg = _cfg("distributed.enabled=true", "distributed.strategy=deepspeed")
    with pytest.raises(UserInputError) as excinfo:
        build_strategy(cfg, "cpu")
    _one_line_error(excinfo, "needs CUDA GPUs", "distributed.strategy=ddp")


@pytest.mark.parametrize("plugin", [HolderFSDPPrecision, HolderDeepSpeedPrecision])
def test_precision_plugins_accept_a_frozen_holder(plugin: type) -> None:
    """Lightning's FSDP/DeepSpeed plugins refuse frozen dataclasses; ours cast field by field."""
    holder = DataHolder.from_arrays(np.ones((5, 3), np.float32), np.zeros((5, 3), np.float32))
    cast = plugin("32-true").convert_input(holder)
    assert isinstance(cast, DataHolder)
    assert cast.expression.dtype == cast.positions.dtype == torch.float32
    assert cast.node_mask.dtype == torch.bool
    if plugin is HolderDeepSpeedPrecision:
        assert plugin("bf16-mixed").convert_input(holder).expression.dtype == torch.bfloat16


def test_deepspeed_stage_is_configurable() -> None:
    pytest.importorskip("deepspeed")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    cfg = _cfg(
        "distributed.enabled=true",
        "distributed.strategy=deepspeed",
        "distributed.deepspeed_stage=3",
    )
    strategy = build_strategy(cfg, "gpu")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 3
    assert isinstance(strategy.precision_plugin, HolderDeepSpeedPrecision)


# ------------------------------------------------------------------------------------------
# Devices and torchrun's environment


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, world: int, local: int) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))


def test_devices_from_config_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cfg = _cfg("distributed.enabled=true", "distributed.devices=3", "distributed.num_nodes=2")
    assert resolve_devices(cfg, "cpu") == (3, 2)
    assert resolve_devices(_cfg("distributed.devices=3"), "cpu") == (1, 1)  # not enabled


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distributed.devices=2", "distributed.num_nodes=2"], (2, 2)),  # consistent
        ([], (2, 2)),  # left at 1 and 1: taken from torchrun
    ],
)
def test_devices_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, overrides: list[str], expected: tuple[int, int]
) -> None:
    _torchrun_env(monkeypatch, world=4, local=2)
    assert resolve_devices(_cfg("distributed.enabled=true", *overrides), "cpu") == expected


@pytest.mark.parametrize(
    ("overrides", "world", "local", "fragments"),
    [
        (["distributed.devices=4"], 4, 2, ("distributed.devices=4", "set distributed.devices=2")),
        (
            ["distributed.devices=2", "distributed.num_nodes=3"],
            4,
            2,
            ("distributed.num_nodes=3", "set distributed.num_nodes=2"),
        ),
        ([], 5, 2, ("not a multiple", "--nproc_per_node")),
    ],
)
def test_torchrun_mismatch_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
    overrides: list[str],
    world: int,
    local: int,
    fragments: tuple[str, ...],
) -> None:
    _torchrun_env(monkeypatch, world=world, local=local)
    with pytest.raises(UserInputError) as excinfo:
        resolve_devices(_cfg("distributed.enabled=true", *overrides), "cpu")
    _one_line_error(excinfo, *fragments)


def test_torchrun_without_distributed_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun_env(monkeypatch, world=2, local=2)
    with pytest.raises(UserInputError) as excinfo:
        resolve_devices(_cfg(), "cpu")
    _one_line_error(excinfo, "distributed.enabled=true")
    _torchrun_env(monkeypatch, world=1, local=1)
    assert resolve_devices(_cfg(), "cpu") == (1, 1)


def test_more_gpus_than_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserInputError) as excinfo:
        resolve_devices(_cfg("distributed.enabled=true", "distributed.devices=2"), "gpu")
    _one_line_error(excinfo, "distributed.devices=2", "set distributed.devices=1")


# ------------------------------------------------------------------------------------------
# scripts/run_distributed.sh


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False, timeout=30
    )


def test_script_help() -> None:
    result = _script("-h")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: scripts/run_distributed.sh")


def test_script_maps_arguments_to_torchrun() -> None:
    result = _script(
        "--data_dir", "store", "--output_dir", "runs/b", "--config", "my.yaml",
        "--nodes", "2", "--gpus", "4", "--node_rank", "1", "--master_addr", "10.1.2.3",
        "--master_port", "29555", "--strategy", "fsdp", "--dry_run",
        "training.max_epochs=3", "--", "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    launch = " ".join(words[words.index("--nnodes") : words.index("train") + 1])
    assert launch == (
        "--nnodes 2 --nproc_per_node 4 --node_rank 1 --master_addr 10.1.2.3 "
        "--master_port 29555 -m alphastomics.main train"
    )
    tail = words[words.index("train") + 1 :]
    assert tail == [
        "--data_dir", "store", "--output_dir", "runs/b", "--config", "my.yaml", "--overwrite",
        "distributed.enabled=true", "distributed.devices=4", "distributed.num_nodes=2",
        "distributed.strategy=fsdp", "training.max_epochs=3",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "--data_dir is required"),
        (("--data_dir", "s", "--nodes", "2"), "--master_addr is required"),
        (("--data_dir", "s", "--node_rank", "1"), "--node_rank must be in 0..0"),
        (("--data_dir", "s", "--gpus", "0"), "--gpus must be a positive integer"),
        (("--data_dir", "s", "--bogus"), "unknown argument '--bogus'"),
    ],
)
def test_script_refuses_bad_arguments(args: tuple[str, ...], fragment: str) -> None:
    result = _script(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------
# A real 2-process DDP run on CPU under torchrun

PROBE = textwrap.dedent(
    """
    # torchrun runs this instead of `-m alphastomics.main`: the same CLI, plus a callback that
    # writes what each rank trained on and its final weights.
    import json
    import sys
    from pathlib import Path

    import pytorch_lightning as pl
    import torch

    import alphastomics.workflows.train as workflow
    from alphastomics.main import main

    OUT = Path(sys.argv.pop(1))


    class Probe(pl.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            epoch = self.seen.setdefault(str(trainer.current_epoch), [])
            epoch.extend(int(i) for i in batch.slice_index)

        def on_train_end(self, trainer, pl_module):
            rank = trainer.global_rank
            record = {"world_size": trainer.world_size, "seen": self.seen}
            (OUT / f"rank{rank}.json").write_text(json.dumps(record))
            torch.save(pl_module.state_dict(), OUT / f"rank{rank}.pt")


    build = workflow.build_trainer


    def build_with_probe(*args, **kwargs):
        kwargs["extra_callbacks"] = [*(kwargs.get("extra_callbacks") or []), Probe()]
        return build(*args, **kwargs)


    workflow.build_trainer = build_with_probe
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def store6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 slices: 4 train, slice_4 val, slice_5 test."""
    folder = tmp_path_factory.mktemp("store6")
    source = folder / "tiny6.h5ad"
    make_tiny_adata(n_slices=6, n_cells=40).write_h5ad(source)
    pre = SpatialDataPreprocessor(
        cell_type_key="cell_type", val_slices=["slice_4"], test_slices=["slice_5"], progress=False
    )
    pre.preprocess_and_save([source], folder / "store")
    return folder / "store"


@pytest.mark.slow
def test_torchrun_two_process_ddp(store6: Path, tmp_path: Path) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(probe_dir), "train", "--data_dir", str(store6), "--output_dir", str(out),
        "distributed.enabled=true", "distributed.devices=2", "training.max_epochs=2",
        "training.val_every_n_epochs=1", *TINY_MODEL,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    records = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    train = set(ProcessedStore(store6).slice_indices("train"))
    for epoch in ("0", "1"):
        seen0, seen1 = (r["seen"][epoch] for r in records)
        assert len(seen0) == len(seen1) == 2
        assert not set(seen0) & set(seen1)  # disjoint shares
        assert set(seen0) | set(seen1) == train  # together: every training slice once

    weights = [torch.load(probe_dir / f"rank{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # rank 0 alone reports and writes
    assert log.count("checkpoints in") == 1
    assert log.count("training batches per epoch") == 1
    assert (out / "config.yaml").is_file()
    assert len(list((out / "logs").rglob("metrics.csv"))) == 1

    last = load_module(out / "checkpoints" / "last.ckpt").state_dict()
    assert all(torch.equal(last[k], weights[0][k]) for k in last)
    module = load_module(out / "checkpoints" / "best.ckpt")
    test_loader = create_dataloaders(store6, mode="slice", batch_size=1)[2]
    assert test_loader is not None
    batch = next(iter(test_loader))
    expression, positions = module.predictor.sample(
        batch, "expr_to_pos", steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert positions.shape == batch.positions.shape
    assert torch.isfinite(positions).all() and torch.isfinite(expression).all()


@pytest.mark.slow
def test_lightning_launches_the_processes_itself(store6: Path, tmp_path: Path) -> None:
    """Plain `python -m alphastomics.main train ... distributed.devices=2`: Lightning re-runs it."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "alphastomics.main", "train", "--data_dir", str(store6),
        "--output_dir", str(out), "distributed.enabled=true", "distributed.devices=2",
        "training.max_steps=1", *TINY_MODEL,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "MEMBER: 2/2" in log
    assert log.count("checkpoints in") == 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
