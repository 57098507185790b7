"""msdda: exact multi-objective alignment of diffusion models at sampling time.

The core is three pure pieces: :func:`fuse_gaussians` (the closed-form optimum),
:func:`step_gaussian` (a model output as its reverse-step Gaussian) and
:func:`sample_chain` (one sampling loop for every method).
"""

from .experts import Denoiser, Expert, JointPolicy, expert_policy, msdda_step
from .fusion import (
    LAMBDA0_TOLERANCE,
    FusionCoefficients,
    Gaussian,
    fuse_gaussians,
    fuse_with_coefficients,
    fusion_coefficients,
)
from .gaussians import Schedule, StepGaussian, StepSpec, step_gaussian
from .sampling import SeededNoise, StepPolicy, sample_chain

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "Expert",
    "FusionCoefficients",
    "Gaussian",
    "JointPolicy",
    "LAMBDA0_TOLERANCE",
    "Schedule",
    "SeededNoise",
    "StepGaussian",
    "StepPolicy",
    "StepSpec",
    "expert_policy",
    "fuse_gaussians",
    "fuse_with_coefficients",
    "fusion_coefficients",
    "msdda_step",
    "sample_chain",
    "step_gaussian",
]
