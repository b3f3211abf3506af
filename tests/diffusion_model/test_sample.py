import pytest
import torch
from conftest import padded_batch, small_denoiser

from alphastomics.data.batch import center, masked_mean
from alphastomics.diffusion_model.noise_model import NoiseModel
from alphastomics.diffusion_model.sample import DiffusionSampler, step_grid


def _setup(n_dims=3, T=50):
    model = small_denoiser(n_dims=n_dims)
    expr, pos, mask = padded_batch(n_dims=n_dims)
    return DiffusionSampler(model, NoiseModel(diffusion_steps=T)), expr, pos, mask


def test_step_grid_descends_from_T_to_zero():
    grid = step_grid(1000, 50)
    assert grid[0] == 1000 and grid[-1] == 0
    assert len(grid) == 51
    assert grid == sorted(set(grid), reverse=True)
    assert step_grid(10, 10) == list(range(10, -1, -1))


@pytest.mark.parametrize("mode", ["expr_to_pos", "pos_to_expr", "joint"])
@pytest.mark.parametrize("n_dims", [2, 3])
def test_sample_shapes_masking_and_condition(mode, n_dims):
    sampler, expr, pos, mask = _setup(n_dims)
    gen = torch.Generator().manual_seed(0)
    e, p = sampler.sample(expr, pos, mask, mode, steps=5, generator=gen)
    assert e.shape == expr.shape and p.shape == pos.shape
    assert torch.isfinite(e).all() and torch.isfinite(p).all()
    assert torch.all(e[1, 6:] == 0) and torch.all(p[1, 6:] == 0)
    assert torch.allclose(masked_mean(p, mask), torch.zeros(2, n_dims), atol=1e-5)
    if mode == "expr_to_pos":
        assert torch.equal(e, expr)
    if mode == "pos_to_expr":
        assert torch.allclose(p, center(pos, mask), atol=1e-6)
        assert not torch.equal(e, expr)


@pytest.mark.parametrize("sampler_kind", ["ddim", "ddpm"])
def test_sampling_is_reproducible_from_a_seed(sampler_kind):
    sampler, expr, pos, mask = _setup()
    runs = [
        sampler.sample(
            expr,
            pos,
            mask,
            "joint",
            sampler=sampler_kind,
            steps=5,
            eta=0.5,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_sampling_does_not_touch_global_rng():
    sampler, expr, pos, mask = _setup()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    sampler.sample(expr, pos, mask, "joint", steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(1), before)


def test_bad_requests_are_rejected():
    sampler, expr, pos, mask = _setup(T=20)
    with pytest.raises(ValueError, match="steps must be in"):
        sampler.sample(expr, pos, mask, "joint", steps=21)
    with pytest.raises(ValueError, match="unknown sample mode"):
        sampler.sample(expr, pos, mask, "sideways")


@pytest.mark.parametrize("mode", ["expr_to_pos", "pos_to_expr"])
def test_known_cells_are_kept_exactly_in_the_input_frame(mode):
    sampler, expr, pos, mask = _setup()
    pos = pos + 5.0  # an input frame that is not centred
    known = torch.zeros_like(mask)
    known[:, :4] = True
    e, p = sampler.sample(
        expr, pos, mask, mode, steps=4, known=known, generator=torch.Generator().manual_seed(0)
    )
    if mode == "expr_to_pos":
        assert torch.allclose(p[:, :4], pos[:, :4], atol=1e-5)
        assert not torch.allclose(p[0, 4:], pos[0, 4:], atol=1e-2)
    else:
        assert torch.allclose(e[:, :4], expr[:, :4], atol=1e-6)
    assert torch.all(p[1, 6:] == 0) and torch.all(e[1, 6:] == 0)


def test_known_cells_need_one_clean_modality():
    sampler, expr, pos, mask = _setup()
    with pytest.raises(ValueError, match="one clean modality"):
        sampler.sample(expr, pos, mask, "joint", steps=2, known=mask)


@pytest.mark.parametrize("mode", ["expr_to_pos", "pos_to_expr"])
def test_predict_mean_is_one_step_per_draw_and_masked(mode):
    sampler, expr, pos, mask = _setup()
    calls = []
    forward = sampler.model.forward

    def counting(*args):
        calls.append(args[2:4])
        return forward(*args)

    sampler.model.forward = counting
    gen = torch.Generator().manual_seed(0)
    e, p = sampler.predict_mean(expr, pos, mask, mode, generator=gen, n_draws=3)
    assert len(calls) == 3
    t_expr, t_pos = calls[0]
    assert (t_expr == (1 if mode == "pos_to_expr" else 0)).all()
    assert (t_pos == (1 if mode == "expr_to_pos" else 0)).all()
    assert torch.all(e[1, 6:] == 0) and torch.all(p[1, 6:] == 0)
    if mode == "pos_to_expr":
        assert torch.allclose(p, center(pos, mask), atol=1e-6)
    else:
        assert torch.equal(e, expr)


def test_warm_start_uses_fewer_steps_from_the_mean_estimate():
    sampler, expr, pos, mask = _setup(T=50)
    seen = []
    forward = sampler.model.forward

    def recording(*args):
        seen.append(float(args[3][0]))
        return forward(*args)

    sampler.model.forward = recording
    sampler.sample(
        expr,
        pos,
        mask,
        "expr_to_pos",
        steps=5,
        warm_start=0.2,
        generator=torch.Generator().manual_seed(0),
    )
    # one mean evaluation at t = 1, then 5 reverse steps from t = 10/50 down
    assert seen[0] == 1.0
    assert seen[1] == pytest.approx(0.2) and len(seen) == 6
    with pytest.raises(ValueError, match="warm_start"):
        sampler.sample(expr, pos, mask, "expr_to_pos", steps=5, warm_start=1.5)


def test_progress_wraps_every_reverse_step_once():
    sampler, expr, pos, mask = _setup()
    seen = []

    def progress(pairs, description):
        seen.append((len(pairs), description))
        return pairs

    sampler.progress = progress
    sampler.sample(expr, pos, mask, "joint", steps=5, generator=torch.Generator().manual_seed(0))
    assert seen == [(5, "sampling joint")]


def test_joint_expression_start_waits_then_descends_with_the_positions():
    """With expression_start, the network reads the given states noised to that step, at that
    step, until the positions (from T) reach it; then both descend at the same step."""
    sampler, expr, pos, mask = _setup(T=50)
    seen, inputs = [], []
    forward = sampler.model.forward

    def recording(*args):
        seen.append((float(args[2][0]), float(args[3][0])))
        inputs.append(args[0].clone())
        return forward(*args)

    sampler.model.forward = recording
    generator = torch.Generator().manual_seed(0)
    started, _ = sampler.sample(
        expr, pos, mask, "joint", sampler="ddpm", expression_start=0.2, generator=generator
    )
    assert seen[0] == (pytest.approx(0.2), 1.0) and len(seen) == 50
    assert all(te == pytest.approx(min(tp, 0.2)) for te, tp in seen)
    waiting = 50 - 10  # steps while the positions descend from T to 0.2 T
    assert all(torch.equal(inputs[0], x) for x in inputs[:waiting])
    assert not torch.equal(inputs[waiting], inputs[waiting + 1])
    assert (started[1, 6:] == 0).all()
    real = mask.unsqueeze(-1).expand_as(expr)

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a[real], b[real]]))[0, 1])

    assert corr(inputs[0], expr) > 0.5  # the given states, noised to 0.2 T
    inputs.clear()
    sampler.sample(expr, pos, mask, "joint", sampler="ddpm", generator=generator)
    assert corr(inputs[0], expr) < 0.3  # from noise
    for bad in ({"expression_start": 1.0}, {"expression_start": -0.1}):
        with pytest.raises(ValueError, match="expression_start"):
            sampler.sample(expr, pos, mask, "joint", **bad)
    with pytest.raises(ValueError, match="joint"):
        sampler.sample(expr, pos, mask, "pos_to_expr", expression_start=0.5)
