"""sampling.grid_power: the DDIM step spacing, its default, validation and old checkpoints."""

import pytest

from alphastomics.config import load_config, upgrade_saved_config
from alphastomics.diffusion_model.sample import step_grid
from alphastomics.errors import UserInputError
from alphastomics.training.module import AlphaSTomicsModule


def test_a_higher_power_puts_more_steps_at_low_noise():
    low = {power: sum(1 for s in step_grid(1000, 10, power) if 0 < s <= 100) for power in (1, 2, 3)}
    assert low[1] < low[2] < low[3]
    for power in (1, 2, 3, 4):
        grid = step_grid(1000, 10, power)
        assert grid[0] == 1000 and grid[-1] == 0 and len(grid) == 11


def test_grid_power_reaches_the_sampler_and_old_checkpoints_keep_quadratic_spacing():
    cfg = load_config(overrides=["model.hidden_dim=16", "model.n_layers=1", "model.n_heads=2"])
    assert cfg.sampling.grid_power == 4.0 and cfg.sampling.steps == 10
    module = AlphaSTomicsModule(cfg, num_genes=5)
    assert module.predictor.sampler().grid_power == 4.0
    with pytest.raises(UserInputError, match=r"sampling\.grid_power"):
        load_config(overrides=["sampling.grid_power=0"])
    assert upgrade_saved_config({"sampling": {"steps": 50}})["sampling"]["grid_power"] == 2.0
    kept = upgrade_saved_config({"sampling": {"grid_power": 3.0}})
    assert kept["sampling"]["grid_power"] == 3.0
