"""bfloat16 layers for large training batches (``model.bf16_min_cells``)."""

import pytest
import torch

from alphastomics.attn_model import model as model_module
from alphastomics.attn_model import transformer
from alphastomics.attn_model.model import Denoiser
from alphastomics.utils.hardware import native_bf16
from alphastomics.workflows.train import bf16_layers_note

N_CELLS = 600


def _net() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(n_genes=7, n_dims=2, hidden_dim=32, n_layers=2, n_heads=2, local_neighbors=0)


def _inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    expr = torch.randn(2, N_CELLS, 7, generator=gen)
    pos = torch.randn(2, N_CELLS, 2, generator=gen)
    mask = torch.ones(2, N_CELLS, dtype=torch.bool)
    mask[1, 500:] = False
    genes = torch.ones(2, 7, dtype=torch.bool)
    t_e, t_p = torch.tensor([0.3, 0.0]), torch.tensor([0.7, 0.2])
    return expr, pos, t_e, t_p, mask, genes


def _run(net: Denoiser, limit: int | None, grad: bool = True):
    """Outputs (B, N, G + D) and the flat parameter gradient of one forward/backward."""
    net.bf16_min_cells = limit
    net.zero_grad()
    with torch.set_grad_enabled(grad):
        out = net(*_inputs())
        joined = torch.cat([out.expression, out.positions], dim=-1)
        if grad:
            (joined * torch.sin(joined)).sum().backward()
    flat = [p.grad.flatten() for p in net.parameters()] if grad else []
    return joined.detach(), torch.cat(flat) if flat else None


@pytest.fixture
def native(monkeypatch):
    """Pretend this device multiplies bfloat16 natively (so the test runs on any CPU)."""
    monkeypatch.setattr(model_module, "native_bf16", lambda device: "a test says so")


def test_large_training_batches_run_bf16_layers_close_to_float32(native):
    net = _net()
    exact, exact_grad = _run(net, None)
    low, low_grad = _run(net, 2 * N_CELLS)  # B * N cells reach the limit
    assert low.dtype == torch.float32
    assert not torch.equal(low, exact)  # bfloat16 did run
    assert float((low - exact).abs().max() / exact.abs().max()) < 0.05
    cosine = torch.nn.functional.cosine_similarity(low_grad, exact_grad, dim=0)
    assert float(cosine) > 0.99
    assert torch.all(low[1, 500:] == 0)  # padded rows stay 0


@pytest.mark.parametrize(("limit", "grad"), [(2 * N_CELLS + 1, True), (0, False), (None, True)])
def test_small_batches_inference_and_null_stay_float32(native, limit, grad):
    net = _net()
    exact, exact_grad = _run(net, None, grad)
    out, out_grad = _run(net, limit, grad)
    assert torch.equal(out, exact)
    if grad:
        assert torch.equal(out_grad, exact_grad)


def test_no_native_bf16_means_float32(monkeypatch):
    monkeypatch.setattr(model_module, "native_bf16", lambda device: None)
    net = _net()
    exact, exact_grad = _run(net, None)
    out, out_grad = _run(net, 0)
    assert torch.equal(out, exact) and torch.equal(out_grad, exact_grad)


def test_bf16_layers_combine_with_activation_checkpointing(native, monkeypatch):
    monkeypatch.setattr(transformer, "_CHUNK_BYTES", 200 * 96 * 4)  # chunks of a few hundred
    monkeypatch.setattr(transformer, "_MIN_CHUNK_CELLS", 50)
    net = _net()
    stored, stored_grad = _run(net, 0)
    net.checkpoint_min_cells = 0
    recomputed, recomputed_grad = _run(net, 0)
    assert float((recomputed - stored).abs().max() / stored.abs().max()) < 0.02
    cosine = torch.nn.functional.cosine_similarity(recomputed_grad, stored_grad, dim=0)
    assert float(cosine) > 0.999


def test_an_outer_autocast_is_left_alone(native):
    # below the limit the layers add no autocast context, so a caller's (Lightning's) stays on
    net = _net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _run(net, None)[0]
        limited = _run(net, 10**9)[0]
    assert torch.equal(inside, limited)
    assert not torch.equal(inside, _run(net, None)[0])


def test_the_train_log_says_what_the_limit_does(monkeypatch):
    from alphastomics.workflows import train

    assert bf16_layers_note(None, "cpu") is None
    monkeypatch.setattr(train, "native_bf16", lambda device: "this CPU multiplies bfloat16 (X)")
    note = bf16_layers_note(200_000, "cpu")
    assert note == (
        "model.bf16_min_cells=200000: training batches of 200,000 cells or more run the "
        "transformer layers in bfloat16 (this CPU multiplies bfloat16 (X))"
    )
    assert bf16_layers_note(0, "cpu").startswith(
        "model.bf16_min_cells=0: every training batch runs"
    )
    monkeypatch.setattr(train, "native_bf16", lambda device: None)
    assert "cpu has no native bfloat16" in bf16_layers_note(0, "cpu")


def test_native_bf16_reads_the_device():
    cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    cpu = cpu or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert (native_bf16("cpu") is not None) == cpu
    assert native_bf16("mps") is None
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is None
