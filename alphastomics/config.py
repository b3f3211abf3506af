"""Typed configuration schema, loading (packaged YAML -> user YAML -> dotted overrides) and checks.

Every check lives here; a bad key, type or value raises :class:`UserInputError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alphastomics import keys
from alphastomics.attn_model.local_graphs import LocalGraph
from alphastomics.errors import ConfigKeyError, UserInputError

TrainingMode = Literal["joint", "expr_to_pos", "pos_to_expr"]
SampleMode = Literal["expr_to_pos", "pos_to_expr", "joint"]


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000
    nu_expression: float = 1.0
    nu_position: float = 1.0
    noise_schedule: Literal["cosine"] = "cosine"


@dataclass
class LossConfig:
    lambda_expression: float = 1.0
    lambda_position: float = 1.0
    use_distance_matrix: bool = False
    align_rotation: bool | str = "auto"  # True | False | "auto" (see resolve_auto)
    exact_distance_max_cells: int = 3000
    n_neighbor_pairs: int = 16
    n_random_pairs: int = 48


@dataclass
class ModelConfig:
    hidden_dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 2
    n_fourier_features: int = 16
    fourier_scale: float = 1.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    local_neighbors: int = 0
    local_graph: LocalGraph = "cleaner"
    checkpoint_min_cells: int | None = 200_000
    bf16_min_cells: int | None = 200_000


@dataclass
class NeighborReadoutConfig:
    n_neighbors: int = 32
    loss_weight: float = 1.0
    max_queries: int = 512


@dataclass
class PreprocessingConfig:
    gene_list_file: str | None = None
    position_key: str = keys.POSITION_KEY
    position_is_3d: bool = True


@dataclass
class LoadingConfig:
    mode: Literal["auto", "slice", "cell"] = "auto"
    batch_size: int | None = None
    max_cells: int | None = None
    neighborhood_fraction: float = 0.5
    num_workers: int = 0


@dataclass
class DataConfig:
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    loading: LoadingConfig = field(default_factory=LoadingConfig)


@dataclass
class TrainingConfig:
    max_epochs: int | None = None
    max_steps: int = -1
    max_time_minutes: float | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    precision: str = "32-true"
    gradient_clip_val: float = 1.0
    use_ema: bool = False
    ema_decay: float = 0.999
    p_clean_expression: float = 0.4
    p_clean_position: float = 0.4
    p_hide_genes: float = 0.5
    hide_share_min: float = 0.05
    hide_share_max: float = 0.5
    accelerator: str = "auto"
    logger: Literal["csv", "tensorboard", "wandb"] = "csv"
    log_every_n_steps: int = 10
    val_every_n_epochs: int | None = None
    val_every_minutes: float | None = None
    val_sample_steps: int = 20
    val_max_slices: int = 2
    max_consecutive_nonfinite: int = 10
    checkpoint_every_minutes: float = 1.0


@dataclass
class SamplingConfig:
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 10
    eta: float = 1.0
    expression_estimate: Literal["mean", "sample"] = "mean"
    warm_start: float = 0.0
    grid_power: float = 4.0
    expression_start: float = 0.5
    consensus: float = 0.5
    consensus_neighbors: int = 10
    reference_cells: Literal["auto", "none"] = "auto"


@dataclass
class DistributedConfig:
    enabled: bool = False
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_nodes: int = 1
    devices: int = 1
    deepspeed_stage: int = 2


@dataclass
class Config:
    training_mode: TrainingMode = "joint"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    neighbor_readout: NeighborReadoutConfig = field(default_factory=NeighborReadoutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        _check(self)


MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range is [0, 2**32 - 1]
PRECISIONS = (
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "32",
    "16",
    "bf16",
    "64",
    "transformer-engine",
    "transformer-engine-float16",
)


def _nonfinite(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in a config tree that is NaN or infinite."""
    found = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found += _nonfinite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append((f"{prefix}{f.name}", value))
    return found


def _check(cfg: Config) -> None:
    for key, value in _nonfinite(cfg):
        raise UserInputError(f"invalid config: {key} must be a finite number; got {value}")
    t = cfg.training
    checks: list[tuple[bool, str]] = [
        (cfg.diffusion.diffusion_steps >= 2, "diffusion.diffusion_steps must be >= 2"),
        (cfg.diffusion.nu_expression > 0, "diffusion.nu_expression must be > 0"),
        (cfg.diffusion.nu_position > 0, "diffusion.nu_position must be > 0"),
        (cfg.loss.lambda_expression >= 0, "loss.lambda_expression must be >= 0"),
        (cfg.loss.lambda_position >= 0, "loss.lambda_position must be >= 0"),
        (
            cfg.loss.align_rotation in (True, False, "auto"),
            f"loss.align_rotation must be true, false or auto; got {cfg.loss.align_rotation!r}",
        ),
        (cfg.loss.exact_distance_max_cells >= 2, "loss.exact_distance_max_cells must be >= 2"),
        (cfg.loss.n_neighbor_pairs >= 0, "loss.n_neighbor_pairs must be >= 0"),
        (cfg.loss.n_random_pairs >= 0, "loss.n_random_pairs must be >= 0"),
        (
            cfg.loss.n_neighbor_pairs + cfg.loss.n_random_pairs > 0,
            "loss.n_neighbor_pairs + loss.n_random_pairs must be > 0",
        ),
        (cfg.model.hidden_dim > 0, "model.hidden_dim must be > 0"),
        (cfg.model.n_layers >= 1, "model.n_layers must be >= 1"),
        (cfg.model.n_heads >= 1, "model.n_heads must be >= 1"),
        (
            cfg.model.hidden_dim % cfg.model.n_heads == 0,
            f"model.hidden_dim ({cfg.model.hidden_dim}) must be divisible by model.n_heads "
            f"({cfg.model.n_heads})",
        ),
        (cfg.model.ff_mult >= 1, "model.ff_mult must be >= 1"),
        (cfg.model.n_fourier_features >= 0, "model.n_fourier_features must be >= 0"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (cfg.model.local_neighbors >= 0, "model.local_neighbors must be >= 0"),
        (
            cfg.model.checkpoint_min_cells is None or cfg.model.checkpoint_min_cells >= 0,
            "model.checkpoint_min_cells must be >= 0 (0 = always) or null (never)",
        ),
        (
            cfg.model.bf16_min_cells is None or cfg.model.bf16_min_cells >= 0,
            "model.bf16_min_cells must be >= 0 (0 = always) or null (never)",
        ),
        (cfg.neighbor_readout.n_neighbors >= 0, "neighbor_readout.n_neighbors must be >= 0"),
        (
            cfg.neighbor_readout.n_neighbors == 0 or cfg.neighbor_readout.loss_weight > 0,
            "neighbor_readout.loss_weight must be > 0 while the read-out is on "
            "(n_neighbors > 0); set neighbor_readout.n_neighbors=0 to turn it off",
        ),
        (cfg.neighbor_readout.max_queries >= 1, "neighbor_readout.max_queries must be >= 1"),
        (
            cfg.data.loading.batch_size is None or cfg.data.loading.batch_size >= 1,
            "data.loading.batch_size must be null or >= 1",
        ),
        (
            cfg.data.loading.max_cells is None or cfg.data.loading.max_cells >= 2,
            "data.loading.max_cells must be null or >= 2",
        ),
        (
            0 <= cfg.data.loading.neighborhood_fraction <= 1,
            "data.loading.neighborhood_fraction must be in [0, 1]",
        ),
        (cfg.data.loading.num_workers >= 0, "data.loading.num_workers must be >= 0"),
        (
            t.max_epochs is None or t.max_epochs >= 1,
            "training.max_epochs must be null (see config.yaml) or >= 1",
        ),
        (t.max_steps == -1 or t.max_steps >= 1, "training.max_steps must be -1 (no limit) or >= 1"),
        (
            t.max_time_minutes is None or t.max_time_minutes > 0,
            f"training.max_time_minutes must be > 0, or null for no limit; got {t.max_time_minutes}",
        ),
        (
            0 <= t.seed <= MAX_SEED,
            f"training.seed must be in [0, {MAX_SEED}]; got {t.seed}",
        ),
        (
            t.precision in PRECISIONS,
            f"training.precision must be one of {', '.join(PRECISIONS[:6])}; got {t.precision!r}",
        ),
        (t.weight_decay >= 0, "training.weight_decay must be >= 0"),
        (t.gradient_clip_val >= 0, "training.gradient_clip_val must be >= 0 (0 = off)"),
        (t.log_every_n_steps >= 1, "training.log_every_n_steps must be >= 1"),
        (t.val_max_slices >= 0, "training.val_max_slices must be >= 0"),
        (cfg.training.lr > 0, "training.lr must be > 0"),
        (cfg.training.warmup_steps >= 0, "training.warmup_steps must be >= 0"),
        (
            0 <= cfg.training.p_clean_expression <= 1,
            "training.p_clean_expression must be in [0, 1]",
        ),
        (0 <= cfg.training.p_clean_position <= 1, "training.p_clean_position must be in [0, 1]"),
        (
            cfg.training.p_clean_expression + cfg.training.p_clean_position <= 1,
            "training.p_clean_expression + training.p_clean_position must be <= 1",
        ),
        (0 <= t.p_hide_genes <= 1, "training.p_hide_genes must be in [0, 1]"),
        (
            0 < t.hide_share_min <= t.hide_share_max < 1,
            "training.hide_share_min and training.hide_share_max must satisfy "
            f"0 < min <= max < 1; got {t.hide_share_min} and {t.hide_share_max}",
        ),
        (0 < cfg.training.ema_decay < 1, "training.ema_decay must be in (0, 1)"),
        (
            cfg.training.val_every_n_epochs is None or cfg.training.val_every_n_epochs >= 1,
            "training.val_every_n_epochs must be null or >= 1",
        ),
        (
            cfg.training.val_every_minutes is None or cfg.training.val_every_minutes > 0,
            "training.val_every_minutes must be null or > 0",
        ),
        (cfg.training.val_sample_steps >= 1, "training.val_sample_steps must be >= 1"),
        (
            cfg.training.max_consecutive_nonfinite >= 1,
            "training.max_consecutive_nonfinite must be >= 1",
        ),
        (
            cfg.training.checkpoint_every_minutes >= 0,
            "training.checkpoint_every_minutes must be >= 0",
        ),
        (cfg.sampling.steps >= 1, "sampling.steps must be >= 1"),
        (
            cfg.sampling.steps <= cfg.diffusion.diffusion_steps,
            f"sampling.steps ({cfg.sampling.steps}) must be <= diffusion.diffusion_steps "
            f"({cfg.diffusion.diffusion_steps})",
        ),
        (0 <= cfg.sampling.eta <= 1, "sampling.eta must be in [0, 1]"),
        (0 <= cfg.sampling.warm_start <= 1, "sampling.warm_start must be in [0, 1]"),
        (cfg.sampling.grid_power > 0, "sampling.grid_power must be > 0 (1 = even spacing)"),
        (0 <= cfg.sampling.consensus <= 1, "sampling.consensus must be in [0, 1] (0 = off)"),
        (cfg.sampling.consensus_neighbors >= 1, "sampling.consensus_neighbors must be >= 1"),
        (
            0 <= cfg.sampling.expression_start < 1,
            "sampling.expression_start must be in [0, 1) (0 = joint expression from noise)",
        ),
        (cfg.distributed.num_nodes >= 1, "distributed.num_nodes must be >= 1"),
        (cfg.distributed.devices >= 1, "distributed.devices must be >= 1"),
        (cfg.distributed.deepspeed_stage in (1, 2, 3), "distributed.deepspeed_stage must be 1-3"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserInputError(f"invalid config: {message}")


def default_config_path() -> Path:
    """Path of the packaged, commented ``config.yaml``."""
    return Path(str(resources.files("alphastomics") / "config.yaml"))


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build a checked :class:`Config`.

    Order: schema defaults, the packaged ``config.yaml``, ``base`` (e.g. a checkpoint's saved
    config), the user's ``path``, then dotted ``KEY=VALUE`` overrides.
    """
    layers = [OmegaConf.structured(Config), OmegaConf.load(default_config_path())]
    if base is not None:
        layers.append(OmegaConf.create(base))
    if path is not None:
        layers.append(_read_config_file(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise UserInputError(
                f"override {item!r} is not KEY=VALUE; write e.g. training.max_epochs=5"
            )
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(err).splitlines()[0]
        raise ConfigKeyError(f"invalid config key {key!r}: {reason}") from err


def _read_config_file(path: Path) -> Any:
    """A user's YAML config as an OmegaConf mapping; every problem is one line."""
    if path.is_dir():
        raise UserInputError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise UserInputError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserInputError(f"config file {path} is not valid YAML{where}: {problem}") from err
    if not isinstance(loaded, DictConfig):
        raise UserInputError(
            f"config file {path} holds a {type(loaded).__name__.replace('Config', '').lower()}, "
            "not a mapping of sections; write e.g. `training:` then `  max_epochs: 5`"
        )
    return loaded


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config dict, completed for this version without changing its model.

    Sections and keys added since the checkpoint was written get the values that rebuild the
    model it holds weights for, not today's defaults: a config without ``neighbor_readout``
    predates the read-out, so it has ``n_neighbors: 0``; one without ``model.local_neighbors``
    predates local attention, so it has 0; one without ``loss.align_rotation`` was trained
    without alignment; one without ``training.p_hide_genes`` was never trained to impute
    genes, so it has 0; one without ``sampling.grid_power`` sampled with quadratic spacing, so
    it keeps 2 (the same seed gives the same sample as before); one without
    ``model.bf16_min_cells`` trained in float32, so it has null; one without
    ``sampling.expression_start`` started joint expression from noise, so it has 0; one
    without ``sampling.consensus`` placed each cell on its own estimate alone, so it has 0.
    """
    upgraded = dict(saved)
    loss = dict(upgraded.get("loss") or {})
    loss.setdefault("align_rotation", False)  # written before the aligned loss existed
    upgraded["loss"] = loss
    upgraded.setdefault("neighbor_readout", {"n_neighbors": 0})
    model = dict(upgraded.get("model") or {})
    model.setdefault("local_neighbors", 0)  # written before local attention existed
    model.setdefault("local_graph", "positions")  # neighbours were always found in positions
    model.setdefault("bf16_min_cells", None)  # trained in float32 before bf16 layers existed
    upgraded["model"] = model
    training = dict(upgraded.get("training") or {})
    training.setdefault("p_hide_genes", 0.0)  # written before gene hiding existed
    upgraded["training"] = training
    sampling = dict(upgraded.get("sampling") or {})
    sampling.setdefault("grid_power", 2.0)  # sampled with quadratic spacing before grid_power
    sampling.setdefault("expression_start", 0.0)  # joint expression started from noise
    sampling.setdefault("consensus", 0.0)  # placed each cell on its own estimate alone
    upgraded["sampling"] = sampling
    return upgraded


CELL_ITEM_SIZE = 256  # cells per item in cell mode when data.loading.batch_size is null


def resolve_auto(cfg: Config, n_training_frames: int | None) -> tuple[Config, list[str]]:
    """Settle the ``auto`` settings for training data with ``n_training_frames`` frames.

    One slice or volume (``n_training_frames == 1``) is one frame: the model may learn its
    orientation (``loss.align_rotation`` false), and since a whole-slice item would be the
    same cells at every step, items are 256-cell neighbourhoods and random subsets of it
    (``data.loading.mode`` cell), read at their place in the frame. Several slices are
    centred and scaled each on its own and need not share an orientation: each prediction is
    rotated or reflected onto its truth first (Kabsch; rotation-invariant like the metric,
    O(N)), and an item is a whole slice. Unknown (None) is treated as several. A null
    ``data.loading.batch_size`` is 1 slice per batch in slice mode, 256 cells per item in cell
    mode. Returns the settled config and one line per ``auto`` it decided, for the log.
    """
    several = n_training_frames is None or n_training_frames > 1
    frames = (
        "an unknown number of training slices"
        if n_training_frames is None
        else f"{n_training_frames} training slice{'' if n_training_frames == 1 else 's'}"
    )
    messages = []
    loss, loading = cfg.loss, cfg.data.loading
    if loss.align_rotation == "auto":
        loss = dataclasses.replace(loss, align_rotation=several)
        if not loss.use_distance_matrix:
            reason = (
                "each in its own frame, so each prediction is rotated onto its truth first"
                if several
                else "one frame, whose orientation the model learns"
            )
            messages.append(
                f"loss.align_rotation=auto -> {str(several).lower()}: {frames}, {reason}"
            )
    if loading.mode == "auto":
        mode = "slice" if several else "cell"
        loading = dataclasses.replace(loading, mode=mode)
        reason = (
            "an item is a whole slice"
            if several
            else "items are neighbourhoods and random subsets of it, not the same cells each step"
        )
        messages.append(f"data.loading.mode=auto -> {mode}: {frames}, {reason}")
    if loading.batch_size is None:
        loading = dataclasses.replace(
            loading, batch_size=CELL_ITEM_SIZE if loading.mode == "cell" else 1
        )
    data = dataclasses.replace(cfg.data, loading=loading)
    return dataclasses.replace(cfg, loss=loss, data=data), messages


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """Resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def _type_name(hint: Any) -> str:
    """``int``, ``float or null``, ``ddp | fsdp | deepspeed``: a config type, for people."""
    if get_origin(hint) is Literal:
        return " | ".join(map(str, get_args(hint)))
    args = get_args(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join([*(_type_name(a) for a in rest), "null"])
    return getattr(hint, "__name__", str(hint))


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def config_to_annotated_yaml(cfg: Config) -> str:
    """Resolved config as YAML, each key commented with its type and the packaged default.

    The text is valid YAML: it can be saved and passed back with ``--config``.
    """
    defaults = load_config()

    def lines(node: Any, default: Any, indent: str) -> list[str]:
        out = []
        hints = get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value, base = getattr(node, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                out.append(f"{indent}{f.name}:")
                out += lines(value, base, indent + "  ")
                continue
            text = f"{indent}{f.name}: {_yaml_scalar(value)}"
            note = f"{_type_name(hints[f.name])}, default {_yaml_scalar(base)}"
            out.append(f"{text:<44} # {note}")
        return out

    return "\n".join(lines(cfg, defaults, "")) + "\n"
