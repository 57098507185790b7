"""The digits student: one network for every preference weight, distilled from MSDDA.

:class:`DigitStudent` is the base :class:`DigitDenoiser` plus a LoRA adapter (peft, the
experts' settings) plus a :class:`msdda.student.WeightEmbedding` of the weights added
beside the class embedding (``extra_emb``), and, for the ``"learned"`` kind, the variance
head trained in full, as the learned-variance experts have it. Everything new starts at
zero, so the untrained student is the base bit for bit. It predicts what the experts of
its kind predict (epsilon, and the ``learned_log`` variance channel), so its step is a
Gaussian of their family, and is fitted by :func:`msdda.student.distill` to MSDDA over
the experts of ``objectives`` (:func:`train_student`).

A trained student is stored as one safetensors file: the peft adapter keys of
:mod:`msdda.digits.lora` plus ``weight_embedding.*``, with string metadata (format,
objectives, kind, LoRA settings, base fingerprint, training seed, and the sha256 of the
expert files it was distilled from). Shipped students are listed in ``students.json``
beside the weights' manifest; :func:`load_students` reads them, merges the adapter into
the base (sampling costs one base forward plus a (1, K) embedding per chain) and says
which were distilled from other experts than the shipped ones (``current``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputFileError, check_output_path, writing
from ..experts import Expert, expert_policy
from ..gaussians import step_gaussian
from ..io import atomic_write_text
from ..methods import MethodContext, msdda_policy
from ..student import DistillationProblem, DistillConfig, DistillResult, WeightEmbedding, distill
from ..validation import check_int, check_seed, check_simplex_weights
from .bundle import DigitsBundle, expert_spec
from .data import IMAGE_SHAPE, NUM_CLASSES, decode
from .lora import (
    LoraSettings,
    adapter_keys,
    base_fingerprint,
    merged_denoiser,
    peft_adapter_state,
    peft_lora_model,
)
from .models import DigitDenoiser
from .rewards import REWARDS
from .store import (
    check_expert_kind,
    check_finite,
    encode_safetensors,
    model_file_name,
    read_json_file,
    read_safetensors,
    write_weight_file,
)

__all__ = [
    "STUDENT_FORMAT",
    "STUDENTS_MANIFEST",
    "StudentSettings",
    "DigitStudent",
    "LoadedStudent",
    "new_student",
    "student_tensors",
    "merged_student",
    "student_expert",
    "student_factory",
    "distillation_problem",
    "train_student",
    "teacher_files",
    "save_student",
    "load_students",
    "find_student",
]

STUDENT_FORMAT = "msdda-digits-student/1"
STUDENTS_MANIFEST = "students.json"
STUDENTS_FORMAT = "msdda-digits-students/1"
EMBEDDING_PREFIX = "weight_embedding."


@dataclass(frozen=True)
class StudentSettings:
    """The student's shape beyond the base."""

    lora: LoraSettings = field(default_factory=LoraSettings)  # the experts' LoRA settings
    embed_hidden: int = 64  # hidden width of the weight embedding

    def __post_init__(self) -> None:
        if not isinstance(self.lora, LoraSettings):
            raise TypeError(f"lora must be a LoraSettings, got {type(self.lora).__name__}")
        check_int(self.embed_hidden, "embed_hidden", low=1, high=65_536)

    def to_dict(self) -> dict:
        return {"lora": self.lora.to_dict(), "embed_hidden": self.embed_hidden}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudentSettings:
        return cls(LoraSettings.from_dict(raw["lora"]), int(raw["embed_hidden"]))


class DigitStudent(nn.Module):
    """``(x_t, t, cond, weights (B, K)) -> (B, C_out, 8, 8)``: a weight-conditioned denoiser."""

    def __init__(self, model: nn.Module, embedding: WeightEmbedding, kind: str) -> None:
        super().__init__()
        self.model = model  # a peft model while training, a merged DigitDenoiser after
        self.weight_embedding = embedding
        self.kind = check_expert_kind(kind)

    @property
    def num_objectives(self) -> int:
        return self.weight_embedding.num_objectives

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None, weights: Tensor) -> Tensor:
        return self.model(x_t, t, cond, extra_emb=self.weight_embedding(weights))


def new_student(
    base: DigitDenoiser, num_objectives: int, kind: str, settings: StudentSettings | None = None
) -> DigitStudent:
    """An untrained student of ``base`` (peft LoRA, zero embedding): the base bit for bit."""
    check_expert_kind(kind)
    settings = settings or StudentSettings()
    model = peft_lora_model(base, kind, settings.lora)
    embedding = WeightEmbedding(num_objectives, base.config.hidden, settings.embed_hidden)
    return DigitStudent(model, embedding, kind)


def student_tensors(student: DigitStudent) -> dict[str, Tensor]:
    """The tensors a student file stores: peft adapter keys and ``weight_embedding.*``."""
    out = peft_adapter_state(student.model)
    for k, v in student.weight_embedding.state_dict().items():
        out[EMBEDDING_PREFIX + k] = v.detach().cpu().clone()
    return out


def _split(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    adapter = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDING_PREFIX)}
    emb = {
        k[len(EMBEDDING_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EMBEDDING_PREFIX)
    }
    return adapter, emb


def _embedding_shapes(k: int, hidden: int, dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{EMBEDDING_PREFIX}net.0.weight": (hidden, k),
        f"{EMBEDDING_PREFIX}net.0.bias": (hidden,),
        f"{EMBEDDING_PREFIX}net.2.weight": (dim, hidden),
        f"{EMBEDDING_PREFIX}net.2.bias": (dim,),
    }


def student_shapes(
    base: DigitDenoiser, k: int, kind: str, settings: StudentSettings
) -> dict[str, tuple[int, ...]]:
    """Every key of a student file of ``base``, with its shape."""
    start = base.with_variance_head() if kind == "learned" else base
    shapes = adapter_keys(start, settings.lora, kind)
    return {**shapes, **_embedding_shapes(k, settings.embed_hidden, base.config.hidden)}


def merged_student(
    base: DigitDenoiser,
    tensors: Mapping[str, Tensor],
    k: int,
    kind: str,
    settings: StudentSettings,
) -> DigitStudent:
    """A student for sampling: the adapter merged into the base, eval mode, no grads."""
    adapter, emb = _split(tensors)
    model = merged_denoiser(base, adapter, settings.lora, kind)
    embedding = WeightEmbedding(k, base.config.hidden, settings.embed_hidden)
    embedding.load_state_dict(emb)
    return DigitStudent(model, embedding, kind).eval().requires_grad_(False)


def student_expert(student: DigitStudent, weights, kl_coef: float, name: str = "student") -> Expert:
    """The student at one weight vector as an msdda :class:`Expert` (one forward per step).

    The weight embedding is computed once here: each step costs one base-sized forward.
    """
    w = check_simplex_weights(weights, student.num_objectives)
    param = next(student.weight_embedding.parameters())
    with torch.no_grad():
        extra = student.weight_embedding(torch.tensor([w], dtype=param.dtype, device=param.device))
    model = student.model

    def denoiser(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return model(x_t, t, cond, extra_emb=extra.expand(x_t.shape[0], -1))

    return Expert(denoiser, expert_spec(student.kind), kl_coef, name)


def student_factory(student: DigitStudent, kl_coef: float) -> Callable[[tuple], Expert]:
    """``weights -> Expert``: what :class:`msdda.methods.MethodContext` takes as ``student``."""
    return lambda weights: student_expert(student, weights, kl_coef)


def _context(bundle: DigitsBundle, objectives: Sequence[str], kind: str, seed: int):
    experts = tuple(bundle.expert(n, kind, seed) for n in objectives)
    return MethodContext(bundle.schedule, bundle.reference, experts, IMAGE_SHAPE, decode=decode)


def distillation_problem(
    bundle: DigitsBundle,
    objectives: Sequence[str],
    student: DigitStudent,
    *,
    teacher_seed: int = 0,
) -> DistillationProblem:
    """The digits problem for :func:`msdda.student.distill`: MSDDA over the experts of
    ``objectives`` (of the student's kind and training seed ``teacher_seed``) teaches
    ``student``; conditions are uniform digits."""
    objectives = _check_objectives(objectives)
    if len(objectives) != student.num_objectives:
        raise ValueError(
            f"{len(objectives)} objectives for a student of K = {student.num_objectives}"
        )
    ctx = _context(bundle, objectives, student.kind, teacher_seed)
    spec = expert_spec(student.kind)
    schedule = bundle.schedule

    def student_step(x_t, t, cond, weights):
        return step_gaussian(student(x_t, t, cond, weights), x_t, t, schedule, spec)

    return DistillationProblem(
        schedule=schedule,
        num_objectives=len(objectives),
        sample_shape=IMAGE_SHAPE,
        teacher=lambda w, cond: msdda_policy(ctx, w, cond),
        student=student_step,
        draw_cond=lambda n, g: torch.randint(0, NUM_CLASSES, (n,), generator=g),
        parameters=[p for p in student.parameters() if p.requires_grad],
    )


def _check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
    if isinstance(objectives, str) or not objectives:
        raise ValueError(
            f"objectives must be a non-empty sequence of reward names, got {objectives!r}"
        )
    objectives = tuple(objectives)
    unknown = [n for n in objectives if n not in REWARDS]
    if unknown or len(set(objectives)) != len(objectives):
        raise ValueError(
            f"objectives must be distinct names of {list(REWARDS)}, got {list(objectives)}"
        )
    return objectives


def train_student(
    bundle: DigitsBundle,
    objectives: Sequence[str],
    kind: str = "fixed",
    config: DistillConfig | None = None,
    settings: StudentSettings | None = None,
    *,
    teacher_seed: int = 0,
    progress=None,
) -> tuple[DigitStudent, DistillResult]:
    """Distil MSDDA over the shipped experts of ``objectives`` into a new student."""
    objectives = _check_objectives(objectives)
    check_expert_kind(kind)
    for n in objectives:
        bundle.expert(n, kind, teacher_seed)  # a clear error before any work
    student = new_student(bundle.base, len(objectives), kind, settings)
    problem = distillation_problem(bundle, objectives, student, teacher_seed=teacher_seed)
    with torch.enable_grad():
        result = distill(problem, config, progress=progress)
    return student.eval(), result


# ------------------------------------------------------------------------- files


def teacher_files(bundle: DigitsBundle, objectives: Sequence[str], kind: str, seed: int) -> dict:
    """``{reward: sha256}`` of the expert files MSDDA over ``objectives`` reads."""
    out = {}
    for e in bundle.manifest.get("experts", []):
        if (
            e.get("reward") in objectives
            and e.get("kind") == kind
            and int(e.get("seed", 0)) == seed
        ):
            out[e["reward"]] = e.get("sha256", "")
    return {n: out.get(n, "") for n in objectives}


def _file_name(objectives: Sequence[str], kind: str, seed: int) -> str:
    return model_file_name("student", "-".join(objectives), kind, seed)


def _read_index(weights_dir: Path) -> dict:
    path = Path(weights_dir) / STUDENTS_MANIFEST
    if not path.exists():
        return {"format": STUDENTS_FORMAT, "students": []}
    index = read_json_file(path, "students manifest")
    if not isinstance(index, dict) or index.get("format") != STUDENTS_FORMAT:
        raise InputFileError(path, f"not a {STUDENTS_FORMAT} manifest")
    if not isinstance(index.get("students"), list):
        raise InputFileError(path, "'students' must be a list")
    return index


def save_student(
    weights_dir: str | Path,
    bundle: DigitsBundle,
    student: DigitStudent,
    objectives: Sequence[str],
    *,
    seed: int,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    settings: StudentSettings | None = None,
) -> dict:
    """Write the student's file into ``weights_dir`` and record it in ``students.json``.

    Replaces an earlier student of the same objectives, kind and seed. Returns the entry.
    """
    objectives = _check_objectives(objectives)
    seed = check_seed(seed)
    settings = settings or StudentSettings()
    weights_dir = Path(weights_dir)
    file = _file_name(objectives, student.kind, seed)
    path = check_output_path(weights_dir / file)
    index = _read_index(weights_dir)
    teachers = teacher_files(bundle, objectives, student.kind, seed)
    meta = {
        "format": STUDENT_FORMAT,
        "objectives": json.dumps(list(objectives)),
        "kind": student.kind,
        "settings": json.dumps(settings.to_dict()),
        "seed": str(seed),
        "base": base_fingerprint(bundle.base),
        "teachers": json.dumps(teachers),
    }
    with writing(path):
        sha = write_weight_file(path, encode_safetensors(student_tensors(student), meta))
    entry = {
        "file": file,
        "sha256": sha,
        "objectives": list(objectives),
        "kind": student.kind,
        "seed": seed,
        "settings": settings.to_dict(),
        "teachers": teachers,
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
    }
    key = (tuple(objectives), student.kind, seed)
    kept = [
        e for e in index["students"] if (tuple(e["objectives"]), e["kind"], int(e["seed"])) != key
    ]
    index = {"format": STUDENTS_FORMAT, "students": [*kept, entry]}
    text = json.dumps(index, indent=2, allow_nan=False) + "\n"
    with writing(weights_dir / STUDENTS_MANIFEST):
        atomic_write_text(weights_dir / STUDENTS_MANIFEST, text)
    return entry


@dataclass(frozen=True, eq=False)
class LoadedStudent:
    objectives: tuple[str, ...]
    kind: str
    seed: int
    student: DigitStudent
    current: bool  # distilled from the expert files the bundle ships now
    entry: dict

    def expert(self, weights, kl_coef: float = 1.0) -> Expert:
        return student_expert(self.student, weights, kl_coef, name=f"student/{self.kind}")


def _load_entry(bundle: DigitsBundle, weights_dir: Path, entry: Any, fingerprint: str):
    where = weights_dir / STUDENTS_MANIFEST
    try:
        objectives = _check_objectives(entry["objectives"])
        kind = check_expert_kind(entry["kind"])
        seed = check_seed(int(entry["seed"]))
        settings = StudentSettings.from_dict(entry["settings"])
        file = weights_dir / Path(entry["file"]).name
        sha = entry["sha256"]
    except (KeyError, TypeError, ValueError) as err:
        raise InputFileError(where, f"bad student entry {entry!r}: {err}") from None
    shapes = student_shapes(bundle.base, len(objectives), kind, settings)
    tensors, meta = read_safetensors(file, sha, "student file", expected=shapes)
    check_finite(tensors, file, "student file")
    if meta.get("format") != STUDENT_FORMAT or meta.get("base") != fingerprint:
        raise InputFileError(file, "not a student of this folder's base model")
    student = merged_student(bundle.base, tensors, len(objectives), kind, settings)
    current = entry.get("teachers") == teacher_files(bundle, objectives, kind, seed)
    return LoadedStudent(objectives, kind, seed, student, current, entry)


def load_students(
    bundle: DigitsBundle, weights_dir: str | Path | None = None
) -> list[LoadedStudent]:
    """Every student listed in ``students.json`` of ``weights_dir`` (default: the bundle's)."""
    weights_dir = Path(weights_dir or bundle.path)
    index = _read_index(weights_dir)
    fingerprint = base_fingerprint(bundle.base)
    return [_load_entry(bundle, weights_dir, e, fingerprint) for e in index["students"]]


def find_student(
    students: Sequence[LoadedStudent], objectives: Sequence[str], kind: str, seed: int = 0
) -> LoadedStudent:
    """The student of exactly these objectives (in order), kind and seed; a clear error if none."""
    objectives = tuple(objectives)
    for s in students:
        if s.objectives == objectives and s.kind == kind and s.seed == seed:
            return s
    have = ", ".join(f"{'+'.join(s.objectives)}/{s.kind}/seed{s.seed}" for s in students) or "none"
    raise ValueError(
        f"no student for objectives {list(objectives)}, kind {kind!r}, seed {seed} (have: {have}); "
        "train one with `msdda train-student`"
    )


def student_record(result: DistillResult) -> dict:
    """The last training record as JSON-able metrics."""
    if not result.records:
        return {}
    last = result.records[-1]
    return {**asdict(last), "seconds_total": result.seconds}


def generate_student(
    bundle: DigitsBundle,
    prompt: int,
    weights: Mapping[str, float],
    num_samples: int,
    seed: int = 0,
    expert_kind: str = "fixed",
) -> Tensor:
    """Images (N, 1, 8, 8) in [0, 1] of digit ``prompt`` from the shipped student of the
    objectives named in ``weights`` (in that order; weights on the simplex)."""
    from .sampling import run_policy

    check_expert_kind(expert_kind, "expert_kind")
    names = _check_objectives(tuple(weights))
    w = check_simplex_weights(tuple(weights.values()), len(names))
    found = find_student(load_students(bundle), names, expert_kind)
    if not found.current:
        raise ValueError(
            f"the student {'+'.join(names)}/{expert_kind} was distilled from other experts than "
            "the shipped ones: retrain it with `msdda train-student`"
        )
    prompts = torch.full((num_samples,), int(prompt), dtype=torch.long)
    policy = expert_policy(found.expert(w), bundle.schedule, prompts)
    return run_policy(policy, num_samples, bundle.schedule, seed)
