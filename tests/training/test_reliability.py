"""Training that survives interruption and bad numbers, reproducible runs, checkpoint checks.

Every run is the CLI (`alphastomics.main.main`) on the tiny store, in-process; signals are real
(`os.kill` of this process from a callback at a chosen step), and one test stops a real
subprocess with SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import PYTHON_CLI, TINY_OVERRIDES

import alphastomics.workflows.train as train_workflow
from alphastomics.main import main
from alphastomics.training.checkpoint import load_module

TINY = [
    *TINY_OVERRIDES,
    "training.max_epochs=3",  # 2 training slices: 2 steps per epoch, 6 in all
    "training.val_every_n_epochs=1",
    "training.val_sample_steps=2",
    "training.warmup_steps=2",
    "training.use_ema=true",
    "training.log_every_n_steps=1",
    "training.accelerator=cpu",
    "training.checkpoint_every_minutes=0",  # last.ckpt at every epoch end
]


def train(
    store: Path,
    out: Path,
    *extra: str,
    callbacks: tuple[pl.Callback, ...] = (),
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> int:
    """`alphastomics train` in-process, with test callbacks added to the Trainer."""
    if callbacks:
        assert monkeypatch is not None
        build = train_workflow.build_trainer

        def with_callbacks(*args: Any, **kwargs: Any) -> pl.Trainer:
            kwargs["extra_callbacks"] = [*(kwargs.get("extra_callbacks") or []), *callbacks]
            return build(*args, **kwargs)

        monkeypatch.setattr(train_workflow, "build_trainer", with_callbacks)
    try:
        return main(["train", "--data_dir", str(store), "--output_dir", str(out), *TINY, *extra])
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def cli_line(err: str, command: str = "train") -> str:
    """The one line the CLI printed (Lightning's own log lines may surround it)."""
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith(f"alphastomics {command}:")]
    assert len(ours) == 1, err
    return ours[0]


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), name


@pytest.fixture(scope="module")
def reference(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of TINY that was never interrupted."""
    out = tmp_path_factory.mktemp("reliability") / "reference"
    assert train(tiny_store, out) == 0
    return out


class SignalAt(pl.Callback):
    """Send ``signum`` to this process (``times`` times) when ``global_step`` reaches ``step``."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


# ------------------------------------------------------------------------------------------
# 1. interruption and resume


@pytest.mark.parametrize(
    ("signum", "step"),
    [(signal.SIGTERM, 3), (signal.SIGINT, 2)],
    ids=["SIGTERM mid-epoch", "SIGINT at epoch end"],
)
def test_interrupted_run_resumes_to_the_same_result(
    tiny_store: Path,
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    step: int,
) -> None:
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    code = train(tiny_store, out, callbacks=(SignalAt(step, signum),), monkeypatch=monkeypatch)
    line = cli_line(capsys.readouterr().err)
    assert code == 128 + signum
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step {step}" in line
    assert f"{name} received" in caplog.text and "Received SIGTERM" not in caplog.text
    resume = line.split("resume with `", 1)[1].rstrip("`")
    assert resume == shlex.join(
        ["alphastomics", "train", "--resume", "--data_dir", str(tiny_store), "--output_dir",
         str(out), "--config", str(out / "config.yaml")]
    )  # fmt: skip
    last = out / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == step
    assert load_module(last).hparams["num_genes"] == 16  # a valid, loadable checkpoint
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    assert main(shlex.split(resume)[1:]) == 0  # the printed command, pasted
    ours, theirs = load(last), load(reference / "checkpoints" / "last.ckpt")
    assert ours["global_step"] == theirs["global_step"] == 6
    assert_same_weights(ours["state_dict"], theirs["state_dict"])  # EMA weights
    assert_same_weights(ours["current_model_state"], theirs["current_model_state"])
    assert ours["averaging_state"]["n_averaged"] == theirs["averaging_state"]["n_averaged"]
    for opt_ours, opt_theirs in zip(
        ours["optimizer_states"][0]["state"].values(),
        theirs["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.allclose(opt_ours["exp_avg"], opt_theirs["exp_avg"], atol=1e-6)
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]


def test_second_ctrl_c_aborts_without_saving(
    tiny_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    callback = SignalAt(3, signal.SIGINT, times=2)
    code = train(tiny_store, out, callbacks=(callback,), monkeypatch=monkeypatch)
    line = cli_line(capsys.readouterr().err)
    assert code == 130
    assert "nothing saved" in line and "(step 2) is the latest" in line and "--resume" in line
    assert load(out / "checkpoints" / "last.ckpt")["global_step"] == 2  # the epoch-end save


@pytest.mark.slow
def test_sigterm_to_a_real_training_process(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    args = [*[t for t in TINY if "max_epochs" not in t], "training.max_epochs=10000"]
    process = subprocess.Popen(
        [*PYTHON_CLI, "train", "--data_dir", str(tiny_store), "--output_dir", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.is_file(), "no checkpoint appeared"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    final = err.strip().splitlines()[-1]
    assert final.startswith("alphastomics train: training stopped by SIGTERM at step"), err
    assert "--resume" in final
    step = load(last)["global_step"]
    assert f"at step {step}:" in final
    assert load_module(last) is not None


# ------------------------------------------------------------------------------------------
# 2. non-finite numbers


class NaNWeightsAt(pl.Callback):
    """At ``step``, remember ``last.ckpt``'s bytes, then fill one weight with NaN."""

    def __init__(self, step: int, last: Path) -> None:
        self.step, self.last = step, last
        self.saved: bytes | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.saved = self.last.read_bytes()
            with torch.no_grad():
                next(module.model.parameters()).fill_(float("nan"))


class NaNGradientsAt(pl.Callback):
    """After the backward pass of ``step``, make one gradient NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.global_step == self.step:
            grads = [p.grad for p in module.model.parameters() if p.grad is not None]
            grads[0].fill_(float("nan"))


def _csv_column(out: Path, name: str) -> list[float]:
    (metrics,) = out.glob("logs/*/metrics.csv")
    rows = [line.split(",") for line in metrics.read_text().splitlines()]
    col = rows[0].index(name)
    return [float(r[col]) for r in rows[1:] if r[col]]


def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    poison = NaNWeightsAt(2, last)  # after epoch 0 (last.ckpt = step 2)
    code = train(
        tiny_store,
        out,
        "training.max_consecutive_nonfinite=3",
        "training.max_epochs=4",
        callbacks=(poison,),
        monkeypatch=monkeypatch,
    )
    line = cli_line(capsys.readouterr().err)
    assert code == 1
    assert "3 non-finite loss values in a row" in line
    assert "training.max_consecutive_nonfinite=3" in line and "training.lr" in line
    assert f"{last} (step 2) is intact" in line
    # epoch 1 ended between the bad steps: its last.ckpt (NaN weights) was refused
    assert last.read_bytes() == poison.saved
    checkpoint = load(last)
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["state_dict"].values())
    assert _csv_column(out, "train/skipped_steps") == [1.0, 2.0]


def test_nonfinite_gradient_step_is_skipped_and_counted(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    code = train(
        tiny_store,
        out,
        "training.max_epochs=2",
        "training.use_ema=false",
        callbacks=(NaNGradientsAt(1),),
        monkeypatch=monkeypatch,
    )
    assert code == 0
    checkpoint = load(out / "checkpoints" / "last.ckpt")
    assert checkpoint["alphastomics_nonfinite"] == {"skipped_steps": 1, "in_a_row": 0}
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["state_dict"].values())
    assert _csv_column(out, "train/skipped_steps") == [1.0]


# ------------------------------------------------------------------------------------------
# 4. reproducibility


def _metrics_without_timing(path: Path) -> Any:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "checkpoint")}
        return value

    return strip(json.loads(path.read_text()))


def test_same_seed_and_config_give_identical_metrics(
    tiny_store: Path, reference: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    assert train(tiny_store, again) == 0
    assert_same_weights(
        load(again / "checkpoints" / "last.ckpt")["state_dict"],
        load(reference / "checkpoints" / "last.ckpt")["state_dict"],
        atol=0.0,
    )
    metrics = []
    for run in (reference, again):
        out = tmp_path / f"test_{run.name}"
        ckpt = run / "checkpoints" / "best.ckpt"
        args = ["test", "--checkpoint", ckpt, "--data_dir", tiny_store, "--output_dir", out]
        assert main([str(a) for a in args]) == 0
        metrics.append(_metrics_without_timing(out / "metrics.json"))
    assert metrics[0] == metrics[1]
    assert metrics[0]["overall"]["expr_to_pos"]  # something was scored


# ------------------------------------------------------------------------------------------
# 5. checks at load


def _edited(reference: Path, tmp_path: Path, edit: Any) -> Path:
    checkpoint = load(reference / "checkpoints" / "last.ckpt")
    edit(checkpoint)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def _set_version(version: str) -> Any:
    def edit(checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"]["alphastomics_version"] = version
        checkpoint["alphastomics_version"] = version

    return edit


def test_checkpoint_from_another_major_version_is_refused(
    reference: Path, tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _edited(reference, tmp_path, _set_version("99.0.0"))
    args = ["test", "--checkpoint", path, "--data_dir", tiny_store, "--output_dir", tmp_path / "t"]
    assert main([str(a) for a in args]) == 2
    line = cli_line(capsys.readouterr().err, "test")
    assert "written by alphastomics 99.0.0" in line and "alphastomics==99.0.0" in line
    assert not (tmp_path / "t").exists()


def test_checkpoint_from_another_minor_version_loads(reference: Path, tmp_path: Path) -> None:
    def older(checkpoint: dict[str, Any]) -> None:
        _set_version("0.1.5")(checkpoint)
        del checkpoint["hyper_parameters"]["cfg"]["training"]["max_consecutive_nonfinite"]

    module = load_module(_edited(reference, tmp_path, older))
    assert module.cfg.training.max_consecutive_nonfinite == 10  # default for a key it lacked
    assert (
        module.hparams["gene_names"]
        == load_module(reference / "checkpoints" / "last.ckpt").hparams["gene_names"]
    )


def test_checkpoint_config_with_an_unknown_key_is_refused(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def newer(checkpoint: dict[str, Any]) -> None:
        _set_version("0.4.0")(checkpoint)
        checkpoint["hyper_parameters"]["cfg"]["model"]["rotary"] = True

    path = _edited(reference, tmp_path, newer)
    h5ad_free = ["--input_data", str(tmp_path / "x.pt"), "--sample_mode", "joint"]
    torch.save({"expression": torch.zeros(1, 4, 16)}, tmp_path / "x.pt")
    assert main(["sample", "--checkpoint", str(path), *h5ad_free]) == 2
    line = cli_line(capsys.readouterr().err, "sample")
    assert "'model.rotary'" in line and "alphastomics 0.4.0" in line and "use that version" in line


def test_resume_refuses_a_changed_config_or_a_broken_checkpoint(
    reference: Path, tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes())
    code = train(tiny_store, run, "--resume", "model.hidden_dim=32", "training.lr=0.01")
    line = cli_line(capsys.readouterr().err)
    assert code == 2
    assert "model.hidden_dim (16 -> 32)" in line and "training.lr (0.001 -> 0.01)" in line
    last.write_bytes(b"truncated")
    assert train(tiny_store, run, "--resume") == 2
    assert "not a readable checkpoint" in cli_line(capsys.readouterr().err)
    assert last.read_bytes() == b"truncated"


@pytest.fixture(autouse=True)
def _signals_restored() -> Iterator[None]:
    """Every test leaves the process's SIGINT/SIGTERM handlers as it found them."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    yield
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
