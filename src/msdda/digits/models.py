"""The digits domain's networks: a class-conditional denoiser and a digit classifier.

:class:`DigitDenoiser` is a residual MLP over the 64 pixels, conditioned on the
timestep (sinusoidal embedding) and on the digit (an embedding with a null class,
index 10, for classifier-free guidance). It predicts epsilon and, when built with a
variance head, a second channel v bounded as ``v = bound * tanh(raw)``: msdda's
``learned_log`` variance, ``beta_tilde * exp(v)``. The head starts at v = 0, which
is ``fixed_small``, so :meth:`DigitDenoiser.with_variance_head` turns the base into a
starting point for a learned-variance expert without changing its steps.

Signature of every denoiser here: ``(x_t (B, 1, 8, 8), t (B,) long, cond (B,) long or
None) -> (B, C_out, 8, 8)`` with C_out = 1, or 2 with the variance head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int, check_number
from .data import IMAGE_SHAPE, NUM_CLASSES

__all__ = [
    "NULL_CLASS",
    "DenoiserConfig",
    "DigitDenoiser",
    "ClassifierConfig",
    "DigitClassifier",
    "GuidedDenoiser",
    "timestep_embedding",
]

NULL_CLASS = NUM_CLASSES  # the "no digit" condition used for classifier-free guidance
NUM_PIXELS = math.prod(IMAGE_SHAPE)
#: The largest width (and depth) a config may ask for: the digits networks are small.
MAX_WIDTH = 65_536


@dataclass(frozen=True)
class DenoiserConfig:
    """Shape of a :class:`DigitDenoiser`."""

    hidden: int = 128  # width of the residual MLP
    num_blocks: int = 3  # residual blocks
    time_dim: int = 64  # size of the sinusoidal timestep embedding
    variance_head: bool = False  # second output channel v for learned_log variance
    variance_bound: float = 3.0  # |v| <= bound: the variance moves within exp(+-bound)

    def __post_init__(self) -> None:
        for name in ("hidden", "num_blocks", "time_dim"):
            check_int(getattr(self, name), f"DenoiserConfig.{name}", low=1, high=MAX_WIDTH)
        if self.time_dim % 2:
            raise ValueError(f"DenoiserConfig.time_dim must be even, got {self.time_dim}")
        if not isinstance(self.variance_head, bool):
            raise TypeError(
                f"DenoiserConfig.variance_head must be a bool, got {self.variance_head!r}"
            )
        check_number(
            self.variance_bound, "DenoiserConfig.variance_bound", low=0.0, low_inclusive=False
        )

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps: (B,) -> (B, dim) (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _ResidualBlock(nn.Module):
    """h + W2 silu(W1 silu(norm(h)) + E emb): one pre-norm residual MLP block."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(y))


def _check_inputs(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    if not isinstance(x_t, Tensor) or tuple(x_t.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
        raise ValueError(f"x_t must be a (B, 1, 8, 8) tensor, got {shape}")
    b = x_t.shape[0]
    if not isinstance(t, Tensor) or t.shape != (b,):
        raise ValueError(f"t must be a (B,) = ({b},) tensor of timesteps")
    if cond is None:
        return torch.full((b,), NULL_CLASS, dtype=torch.long, device=x_t.device)
    if not isinstance(cond, Tensor) or cond.shape != (b,) or cond.dtype.is_floating_point:
        raise ValueError(f"cond must be a (B,) = ({b},) long tensor of digits 0-9 (10 = null)")
    return cond.long()


class DigitDenoiser(nn.Module):
    """Class-conditional epsilon predictor for 8x8 digits (optionally with a variance head)."""

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenoiserConfig()
        h = config.hidden
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, h)
        self.inp = nn.Linear(NUM_PIXELS, h)
        self.blocks = nn.ModuleList(_ResidualBlock(h) for _ in range(config.num_blocks))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, NUM_PIXELS)
        self.var_out = nn.Linear(h, NUM_PIXELS) if config.variance_head else None
        if self.var_out is not None:
            nn.init.zeros_(self.var_out.weight)
            nn.init.zeros_(self.var_out.bias)

    @property
    def out_channels(self) -> int:
        return 2 if self.config.variance_head else 1

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, extra_emb: Tensor | None = None
    ) -> Tensor:
        """(B, 1, 8, 8), (B,) long, (B,) long or None -> (B, C_out, 8, 8).

        ``extra_emb`` (B, hidden), when given, is added beside the class embedding (a
        weight-conditioned student's weight embedding, :mod:`msdda.digits.student`).
        """
        cond = _check_inputs(x_t, t, cond)
        b = x_t.shape[0]
        emb = self.time_mlp(timestep_embedding(t, self.config.time_dim)) + self.class_emb(cond)
        if extra_emb is not None:
            emb = emb + extra_emb
        emb = F.silu(emb)
        h = self.inp(x_t.reshape(b, NUM_PIXELS))
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.out_norm(h))
        eps = self.out(h).reshape(b, *IMAGE_SHAPE)
        if self.var_out is None:
            return eps
        v = self.config.variance_bound * torch.tanh(self.var_out(h))
        return torch.cat([eps, v.reshape(b, *IMAGE_SHAPE)], dim=1)

    def with_variance_head(self) -> DigitDenoiser:
        """A deep copy with a variance head initialised to v = 0 (the fixed_small step)."""
        if self.config.variance_head:
            return copy.deepcopy(self)
        model = DigitDenoiser(replace(self.config, variance_head=True))
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and set(missing) == {"var_out.weight", "var_out.bias"}
        return model.to(next(self.parameters()).device)


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a :class:`DigitClassifier`."""

    hidden: int = 128  # width of the two hidden layers
    dropout: float = 0.1  # dropout during training

    def __post_init__(self) -> None:
        check_int(self.hidden, "ClassifierConfig.hidden", low=1, high=MAX_WIDTH)
        check_number(
            self.dropout, "ClassifierConfig.dropout", low=0.0, high=1.0, high_inclusive=False
        )

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    """MLP digit classifier on images in [0, 1]: (B, 1, 8, 8) -> (B, 10) logits."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        h = config.hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(NUM_PIXELS, h),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(h, h),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(h, NUM_CLASSES),
        )

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or tuple(images.shape[1:]) != IMAGE_SHAPE:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 1, 8, 8) tensor in [0, 1], got {shape}")
        return self.net(images)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: eps = eps_null + scale * (eps_cond - eps_null).

    ``scale = 1`` is the conditional model itself (one forward). A variance channel,
    if any, is taken from the conditional output. The shipped weights use scale 1 (no
    guidance, ``guidance_scale`` in the manifest): the base's samples are already
    classified as their prompt 99% of the time. The base was trained with 10% class
    dropout, so scales above 1 work too.
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.guidance_scale = check_number(guidance_scale, "guidance_scale")
        self.model = model

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.guidance_scale == 1.0 or cond is None:
            return self.model(x_t, t, cond)
        null = torch.full_like(cond, NULL_CLASS)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        out_c, out_u = both.chunk(2)
        eps = out_u[:, :1] + self.guidance_scale * (out_c[:, :1] - out_u[:, :1])
        return torch.cat([eps, out_c[:, 1:]], dim=1)
