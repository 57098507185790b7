"""msdda: exact multi-objective alignment of diffusion models at sampling time.

The core is three pure pieces: :func:`fuse_gaussians` (the closed-form optimum),
:func:`step_gaussian` (a model output as its reverse-step Gaussian) and
:func:`sample_chain` (one sampling loop for every method).
"""

from .experts import (
    Denoiser,
    Expert,
    JointDenoiser,
    JointPolicy,
    expert_policy,
    joint_policy,
    msdda_step,
)
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
from .version import __version__

__all__ = [
    "__version__",
    "Denoiser",
    "Expert",
    "FusionCoefficients",
    "Gaussian",
    "JointDenoiser",
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
    "joint_policy",
    "msdda_step",
    "sample_chain",
    "step_gaussian",
]
