import dataclasses

import pytest
from omegaconf import OmegaConf

from alphastomics.config import (
    Config,
    config_to_yaml,
    default_config_path,
    load_config,
    resolve_auto,
    upgrade_saved_config,
)
from alphastomics.errors import UserInputError


def test_packaged_yaml_equals_schema_defaults():
    yaml_values = OmegaConf.to_container(OmegaConf.load(default_config_path()))
    assert yaml_values == dataclasses.asdict(Config())


def test_every_yaml_key_is_commented():
    for line in default_config_path().read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"config.yaml line without a comment: {line!r}"


def test_overrides_are_applied_and_typed():
    cfg = load_config(
        overrides=["training.max_epochs=3", "model.hidden_dim=32", "loss.lambda_position=0.5"]
    )
    assert cfg.training.max_epochs == 3
    assert cfg.model.hidden_dim == 32
    assert cfg.loss.lambda_position == 0.5


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.not_a_key=1", "training.not_a_key"),
        ("training.max_epochs=abc", "training.max_epochs"),
        ("model.hidden_dim=30", "model.hidden_dim"),
        ("diffusion.diffusion_steps=-5", "diffusion.diffusion_steps"),
        ("sampling.steps=5000", "sampling.steps"),
        ("training_mode=sideways", "training_mode"),
        ("distributed.strategy=horovod", "distributed.strategy"),
        ("model.local_graph=time", "model.local_graph"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(UserInputError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_override_without_equals_is_rejected():
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        load_config(overrides=["training.max_epochs"])


def test_user_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  lr: 0.01\n")
    cfg = load_config(path)
    assert cfg.training.lr == 0.01
    again = tmp_path / "again.yaml"
    again.write_text(config_to_yaml(cfg))
    assert load_config(again) == cfg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("frames", "several"), [(1, False), (2, True), (None, True)])
def test_auto_settings_follow_the_number_of_training_frames(frames, several):
    cfg = load_config()
    assert cfg.loss.align_rotation == "auto" and cfg.data.loading.mode == "auto"
    resolved, messages = resolve_auto(cfg, frames)
    assert resolved.loss.align_rotation is several
    assert resolved.data.loading.mode == ("slice" if several else "cell")
    assert resolved.data.loading.batch_size == (1 if several else 256)
    assert [m.split(" ->")[0] for m in messages] == [
        "loss.align_rotation=auto",
        "data.loading.mode=auto",
    ]
    assert f"-> {str(several).lower()}" in messages[0]


def test_settings_the_user_chose_are_kept():
    fixed = load_config(
        overrides=[
            "loss.align_rotation=false",
            "data.loading.mode=slice",
            "data.loading.batch_size=2",
        ]
    )
    assert resolve_auto(fixed, 5) == (fixed, [])
    cell = load_config(overrides=["data.loading.mode=cell"])
    assert resolve_auto(cell, 5)[0].data.loading.batch_size == 256


def test_align_rotation_rejects_other_words():
    with pytest.raises(UserInputError, match=r"loss\.align_rotation must be true, false or auto"):
        load_config(overrides=["loss.align_rotation=sometimes"])


def test_a_checkpoint_written_before_local_graph_found_neighbours_in_positions():
    old = upgrade_saved_config({"model": {"local_neighbors": 16}})["model"]
    assert old["local_graph"] == "positions" and old["local_neighbors"] == 16
    kept = upgrade_saved_config({"model": {"local_neighbors": 16, "local_graph": "cleaner"}})
    assert kept["model"]["local_graph"] == "cleaner"
