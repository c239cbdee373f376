"""The user's input: the run configuration (TOML -> frozen dataclasses) and the acquisition
protocol (sequences). The lowest layer: every other sub-package may import it."""

from spinverse_fem.config.protocol import Sequence
from spinverse_fem.config.reader import load_config, parse_config
from spinverse_fem.config.schema import (
    Config,
    EigenConfig,
    FullOrderConfig,
    GeometryConfig,
    GridConfig,
    InversionConfig,
    PermeabilityConfig,
    PhysicsConfig,
    Stage,
    TargetConfig,
)

__all__ = ["Config", "EigenConfig", "FullOrderConfig", "GeometryConfig", "GridConfig",
           "InversionConfig", "PermeabilityConfig", "PhysicsConfig", "Sequence", "Stage",
           "TargetConfig", "load_config", "parse_config"]
