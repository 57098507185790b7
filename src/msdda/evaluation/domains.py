"""Domains a sweep can run on: the problem, the rewards it reports, its prompts.

``digits`` (the default) loads the shipped digits bundle; ``toy`` is the exact 2-D
mixture of :mod:`msdda.evaluation.toy`, seconds to sweep; ``sd`` is Stable Diffusion with
reward models (:mod:`msdda.sd.sweep`, options as in ``msdda sweep --config``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import reading
from ..methods import MethodContext
from ..rewards import Reward
from ..validation import check_seed

__all__ = ["SweepDomain", "DOMAINS", "load_domain", "digits_domain", "toy_domain", "sd_domain"]


@dataclass(frozen=True, eq=False)
class SweepDomain:
    """What a sweep needs from a domain."""

    name: str
    context: MethodContext  # the problem every method is built on
    objectives: tuple[str, ...]  # names of context.rewards, in weight order
    eval_rewards: Mapping[str, Reward]  # every reward reported, on decode(x0); objectives first
    prompts: tuple[Any, ...]  # default prompts
    condition: Callable[[Sequence[Any]], Any]  # per-sample prompts -> the denoisers' cond
    identity: Mapping[str, Any] = field(default_factory=dict)  # what pins the models down
    check_prompt: Callable[[Any], Any] = lambda p: p  # validate one prompt (ValueError)
    judges: tuple[str, ...] = ()  # eval_rewards no method reads, reported beside (held out)
    #: model space -> the final images that are scored and saved (None: context.decode)
    render: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: one final image -> a PIL image saved as PNG beside the results (None: no pictures)
    picture: Callable[[torch.Tensor], Any] | None = None

    def final_images(self, x0: torch.Tensor) -> torch.Tensor:
        """The final images of samples ``x0`` (B, ...) in model space: what rewards score."""
        return (self.render or self.context.decode)(x0)

    def __post_init__(self) -> None:
        if len(self.objectives) != self.context.num_objectives:
            raise ValueError(
                f"{len(self.objectives)} objective names for {self.context.num_objectives} experts"
            )
        missing = [n for n in self.objectives if n not in self.eval_rewards]
        if missing:
            raise ValueError(f"eval_rewards must include the objectives; missing {missing}")
        wrong = [n for n in self.judges if n not in self.eval_rewards or n in self.objectives]
        if wrong:
            raise ValueError(f"judges must be eval_rewards other than the objectives, got {wrong}")


def _sha256(path: Path) -> str:
    with reading(path, "manifest"):
        return hashlib.sha256(path.read_bytes()).hexdigest()


def digits_domain(
    weights_dir: str | None = None,
    objectives: Sequence[str] = ("legibility", "boldness"),
    expert_kind: str = "fixed",
) -> SweepDomain:
    """The shipped digits models: base, experts for ``objectives`` of ``expert_kind``, oracles.

    Oracles (models fine-tuned on a weighted reward) are taken of ``expert_kind`` where
    one exists for a weight, else of the other kind: their variance kind is not what
    they are compared on.

    Rewards are the bundle's standardised rewards; prompts are the digits 0-9.
    """
    from ..digits.bundle import load_digits_bundle
    from ..digits.data import IMAGE_SHAPE, check_prompts, decode

    bundle = load_digits_bundle(weights_dir)
    if isinstance(objectives, str):
        raise TypeError(f"objectives must be a sequence of reward names, got {objectives!r}")
    objectives = tuple(objectives)
    if not objectives or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must be distinct reward names, got {list(objectives)}")
    for name in objectives:
        if name not in bundle.rewards:
            raise ValueError(f"unknown objective {name!r}; digits rewards: {list(bundle.rewards)}")
    experts = tuple(bundle.expert(name, expert_kind) for name in objectives)
    oracles = {}  # an oracle of the experts' kind where there is one, else of any kind
    for o in sorted(bundle.oracles, key=lambda o: o.kind == expert_kind):
        nonzero = {n for n, w in o.weights.items() if w != 0.0}
        if nonzero <= set(objectives):
            oracles[tuple(float(o.weights.get(n, 0.0)) for n in objectives)] = o.expert
    context = MethodContext(
        schedule=bundle.schedule,
        reference=bundle.reference,
        experts=experts,
        sample_shape=IMAGE_SHAPE,
        rewards=tuple(bundle.rewards[n] for n in objectives),
        decode=decode,
        oracles=oracles,
        student=_digits_student(bundle, objectives, expert_kind),
    )
    order = list(objectives) + [n for n in bundle.rewards if n not in objectives]
    manifest = Path(bundle.path) / "manifest.json"
    students = Path(bundle.path) / "students.json"

    def check_prompt(p):
        check_prompts(p, "prompt")
        return int(p)

    return SweepDomain(
        name="digits",
        context=context,
        objectives=objectives,
        eval_rewards={n: bundle.rewards[n] for n in order},
        prompts=tuple(range(10)),
        condition=lambda prompts: torch.tensor(list(prompts), dtype=torch.long),
        identity={
            "manifest_sha256": _sha256(manifest),
            "expert_kind": expert_kind,
            **({"students_sha256": _sha256(students)} if context.student else {}),
        },
        check_prompt=check_prompt,
    )


def _digits_student(bundle, objectives, expert_kind):
    """``weights -> Expert`` of the shipped student of these objectives and kind (seed 0),
    None if there is none or it was distilled from other experts than the shipped ones."""
    from ..digits.student import load_students

    for s in load_students(bundle):
        if s.objectives == tuple(objectives) and s.kind == expert_kind and s.seed == 0:
            return s.expert if s.current else None
    return None


def toy_domain(seed: int = 0) -> SweepDomain:
    """The exact 2-D toy problem (no prompts: the single prompt 0 stands for none)."""
    from .toy import toy_context

    seed = check_seed(seed)
    context, rewards = toy_context(seed)

    def check_prompt(p):
        if p != 0:
            raise ValueError(f"the toy domain has one prompt, 0; got {p!r}")
        return 0

    return SweepDomain(
        name="toy",
        context=context,
        objectives=tuple(rewards),
        eval_rewards=rewards,
        prompts=(0,),
        condition=lambda prompts: None,
        identity={"seed": seed},
        check_prompt=check_prompt,
    )


def sd_domain(**options: Any) -> SweepDomain:
    """Stable Diffusion: base, experts, oracles and reward models of ``options`` (plain
    data, see :func:`msdda.sd.sweep.sd_sweep`); every image is also saved as a PNG."""
    from ..sd.sweep import check_prompt, sd_sweep, to_picture

    sd = sd_sweep(**options)
    return SweepDomain(
        name="sd",
        context=sd.context,
        objectives=sd.objectives,
        eval_rewards=sd.eval_rewards,
        prompts=sd.prompts,
        condition=sd.condition,
        identity=sd.identity,
        check_prompt=check_prompt,
        judges=sd.judges,
        render=sd.render,
        picture=to_picture,
    )


DOMAINS: dict[str, Callable[..., SweepDomain]] = {
    "digits": digits_domain,
    "toy": toy_domain,
    "sd": sd_domain,
}


def load_domain(name: str, **options) -> SweepDomain:
    """The domain ``name`` built with ``options`` (see :data:`DOMAINS`)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name](**options)
