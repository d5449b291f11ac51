"""Steering: interventions on a model's activations (add a feature's direction, clamp or ablate a latent),
the context manager that applies them, generation, and YAML-described sweeps."""

from saelab.steer.config import SteerConfig
from saelab.steer.experiment import SteeringResult, run_steering
from saelab.steer.generation import generate
from saelab.steer.interventions import (
    AddDirection,
    Intervention,
    NodeEdit,
    SAEEdit,
    ablate_feature,
    add_feature,
    clamp_feature,
    position_mask,
    splice_sae,
)
from saelab.steer.steering import Steering, steer

__all__ = [
    "AddDirection",
    "Intervention",
    "NodeEdit",
    "SAEEdit",
    "SteerConfig",
    "Steering",
    "SteeringResult",
    "ablate_feature",
    "add_feature",
    "clamp_feature",
    "generate",
    "position_mask",
    "run_steering",
    "splice_sae",
    "steer",
]
