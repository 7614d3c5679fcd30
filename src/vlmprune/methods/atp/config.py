"""ATP's configuration and its checkpoint format.

A checkpoint is a directory with ``atp_config.json`` (``{"format": "vlmprune-atp", "version": 1,
"config": ATPConfig.to_dict()}``) and ``atp_weights.safetensors`` (the pruner's state dict);
``ATPPruner.save`` / ``ATPPruner.load`` write and read both, ``write_config`` / ``read_config``
the first.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..common import check_choice, grid_shape, is_int, is_real
from .budget import DEFAULT_NUM_LAYERS, TARGET_REDUCTIONS, check_layers, check_target, scale_layers
from .scores import SCORE_MODES
from .soft import COMBINE_MODES, TAU_SCHEDULES
from .spatial import check_strides
from .units import OFF_GRID, RESAMPLE, THRESHOLD_UNITS

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "ATPConfig", "write_config", "read_config"]

CONFIG_NAME = "atp_config.json"
WEIGHTS_NAME = "atp_weights.safetensors"
FORMAT = "vlmprune-atp"
FORMAT_VERSION = 1


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ATPConfig:
    """Configuration of an ATPPruner; validated on construction (ValueError says what to pass)."""

    num_layers: int = _opt(DEFAULT_NUM_LAYERS, "decoder layers L of the LLM")
    layers: tuple[int, ...] | None = _opt(None, "module positions (0-indexed, a module acts after that layer); "
                                                "None = (2, 8, 14, 20, 26) of 32 scaled to num_layers (scale_layers)")
    num_patches: int = _opt(576, "patches N of the full visual grid (MLP input size is 2N)")
    grid: tuple[int, int] | None = _opt(None, "(H, W) of the patch grid; None = square sqrt(N)")
    spatial_strides: tuple[int, ...] | None = _opt(None, "strides of the nested grids, coarsest first; "
                                                         "None = default_strides(H, W), (8, 4, 2) on 24 x 24")
    hidden: int = _opt(256, "hidden width of the threshold MLP")
    tau: float = _opt(0.1, "soft-mask temperature (start value when annealed)")
    tau_final: float | None = _opt(None, "anneal tau to this value over training (e.g. 0.02); None = constant")
    tau_schedule: str = _opt("exp", "annealing schedule: exp | linear | cosine")
    lambda_atp: float = _opt(0.05, "weight of L_atp")
    lambda_target: float = _opt(1.0, "weight of L_target")
    target: float | None = _opt(None, "target visual tokens averaged over all decoder layers (e.g. 144); "
                                      "None = no L_target")
    target_reduction: str = _opt("batch", "L_target on the batch-mean average (batch) or per sample (sample)")
    score: str = _opt("both", "redundancy score: both | self | cross (ablations)")
    redundant: bool = _opt(True, "redundant pruning branch (theta_r) enabled")
    spatial: bool = _opt(True, "spatial pruning branch (theta_s) enabled")
    combine: str = _opt("max", "branch combination of the soft mask: max (default) | or (1-(1-Mr)(1-Ms))")
    fixed_ratio: float | None = _opt(None, "fixed-ratio ablation: every module keeps this fraction of the "
                                           "survivors, no thresholds learned; None = learned thresholds")
    theta_range: tuple[float, float] = _opt((-1.0, 1.0), "(lo, hi) of theta = lo + (hi - lo) sigmoid(.)")
    init_theta_r: float = _opt(-0.5, "initial theta_r (keeps every token at the start)")
    init_theta_s: float | None = _opt(None, "initial theta_s; None = 0.9, or init_theta_r when redundant=False")
    causal: bool = _opt(True, "S_self counts only the later visual queries (causal LLM)")
    detach_scores: bool = _opt(True, "treat scores as constants (gradients reach the thresholds only)")
    log_eps: float = _opt(1e-6, "eps of the additive log-mask log(M + eps)")
    thresholds: str = _opt("unit", "samples with several grids: one threshold pair per unit (unit) or per "
                                   "sample (sample)")
    off_grid: str = _opt("keep", "visual tokens on no grid (LLaVA-NeXT newlines): always kept (keep) or judged "
                                 "by S_r with the unit before them (score)")
    resample: str = _opt("area", "how a unit's score map of another size reaches the MLP's grid: area | bilinear")

    def __post_init__(self) -> None:
        if not is_int(self.num_layers) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        if self.layers is None:
            self.layers = scale_layers(self.num_layers)
        self.layers = check_layers(self.layers, self.num_layers)
        if not is_int(self.num_patches) or self.num_patches < 1:
            raise ValueError(f"num_patches must be a positive int, got {self.num_patches!r}")
        self.grid = grid_shape(self.num_patches, self.grid, "grid")
        if self.spatial_strides is not None:
            self.spatial_strides = check_strides(self.spatial_strides)
        if not is_int(self.hidden) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {self.hidden!r}")
        for name in ("tau", "tau_final"):
            v = getattr(self, name)
            if v is not None and not (is_real(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
        check_choice(self.tau_schedule, "tau_schedule", TAU_SCHEDULES)
        for name in ("lambda_atp", "lambda_target"):
            v = getattr(self, name)
            if not (is_real(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
        check_choice(self.target_reduction, "target_reduction", TARGET_REDUCTIONS)
        check_choice(self.score, "score", SCORE_MODES)
        check_choice(self.combine, "combine", COMBINE_MODES)
        if not (self.redundant or self.spatial):
            raise ValueError("redundant and spatial are both False: enable at least one pruning branch")
        if self.fixed_ratio is not None and not (is_real(self.fixed_ratio) and 0 < self.fixed_ratio <= 1):
            raise ValueError(f"fixed_ratio must be a float in (0, 1] (fraction of survivors kept per module) "
                             f"or None, got {self.fixed_ratio!r}")
        tr = self.theta_range
        if not (isinstance(tr, (tuple, list)) and len(tr) == 2 and all(is_real(x) for x in tr) and tr[0] < tr[1]):
            raise ValueError(f"theta_range must be a pair (lo, hi) with lo < hi, got {tr!r}")
        self.theta_range = (float(tr[0]), float(tr[1]))
        if self.init_theta_s is None:
            self.init_theta_s = 0.9 if self.redundant else self.init_theta_r
        for name in ("init_theta_r", "init_theta_s"):
            v = getattr(self, name)
            if not (is_real(v) and self.theta_range[0] < v < self.theta_range[1]):
                raise ValueError(f"{name} = {v!r} must lie strictly inside theta_range {self.theta_range}")
        check_choice(self.thresholds, "thresholds", THRESHOLD_UNITS)
        check_choice(self.off_grid, "off_grid", OFF_GRID)
        check_choice(self.resample, "resample", RESAMPLE)
        if not (is_real(self.log_eps) and self.log_eps > 0):
            raise ValueError(f"log_eps must be > 0, got {self.log_eps!r}")
        if self.target is not None:
            check_target(self.target, self.layers, self.num_layers, self.num_patches)

    @property
    def learned(self) -> bool:
        return self.fixed_ratio is None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ATPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ATPConfig field(s): {', '.join(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def write_config(directory: str | os.PathLike, config: ATPConfig) -> None:
    """Write ``config`` as ``directory/atp_config.json`` (the directory must exist)."""
    with open(os.path.join(directory, CONFIG_NAME), "w") as fh:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_dict()}, fh, indent=2)


def read_config(path: str | os.PathLike) -> ATPConfig:
    """The ``ATPConfig`` of an ``atp_config.json`` file; ValueError if it is not this format and version."""
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} config "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    return ATPConfig.from_dict(meta["config"])
