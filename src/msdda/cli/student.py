"""``msdda train-student``: distil MSDDA over the shipped digits experts into one student.

One network conditioned on the preference weights (:mod:`msdda.digits.student`), fitted
by the exact Gaussian KL to MSDDA's step at visited states; no reward model is read. It
trains from whatever experts the weights folder holds, so after the experts are retrained
the same command retrains the students. The file and its ``students.json`` entry go into
the weights folder (default: the shipped one).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from . import app
from .common import (
    check_kind,
    checked,
    fail,
    input_folder,
    integer,
    number,
    seed_value,
    user_errors,
    writes_to,
)

#: Objective sets the shipped students cover.
DEFAULT_OBJECTIVES = "legibility,boldness"


def _objectives(text: str) -> tuple[str, ...]:
    from ..digits.rewards import REWARDS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in REWARDS]
    if not names or bad or len(set(names)) != len(names):
        fail(f"--objectives must be distinct names of {', '.join(REWARDS)}, got {text!r}")
    return names


@app.command("train-student")
def train_student_command(
    objectives: str = typer.Option(
        DEFAULT_OBJECTIVES, help="Comma-separated objectives (K = 2 or 3)."
    ),
    expert_kind: str = typer.Option("fixed", help="Experts' variance: fixed or learned."),
    seed: int = checked(
        0,
        check=seed_value,
        help="Training seed; the teacher is MSDDA over the experts of this seed.",
    ),
    rounds: int = checked(30, check=integer(1), help="Rounds of fresh rollouts."),
    chains: int = checked(32, check=integer(1), help="MSDDA chains per weight and round."),
    student_chains: int = checked(
        16, check=integer(0), help="Student chains per weight and round."
    ),
    updates: int = checked(8, check=integer(1), help="Optimiser steps per round."),
    lr: float = checked(2e-3, check=number(0.0, above=True), help="Adam learning rate."),
    weights_dir: Path = checked(
        None, check=input_folder(), help="Weights folder (default: the shipped weights)."
    ),
    threads: int = checked(1, check=integer(1, 4096), help="torch threads."),
) -> None:
    """Distil MSDDA into a weight-conditioned student (one forward per step for every weight)."""
    from ..digits.bundle import load_digits_bundle
    from ..digits.sampling import torch_threads
    from ..digits.student import save_student, student_record, train_student
    from ..student import DistillConfig

    names = _objectives(objectives)
    kind = check_kind(expert_kind)
    config = DistillConfig(
        rounds=rounds,
        chains=chains,
        student_chains=student_chains,
        updates=updates,
        lr=lr,
        seed=seed,
        random_weights=2 if len(names) == 2 else 4,
    )
    console = Console()

    def show(record) -> None:
        paths = " ".join(f"{w} {kl:.3f}" for w, kl in record.path_kl.items())
        console.print(f"round {record.round}: loss {record.loss:.4f}; path KL {paths}")

    with user_errors(), torch_threads(threads):
        bundle = load_digits_bundle(weights_dir)
        folder = Path(weights_dir or bundle.path)
        student, result = train_student(
            bundle, names, kind, config, teacher_seed=seed, progress=show
        )
        with writes_to(folder):
            entry = save_student(
                folder,
                bundle,
                student,
                names,
                seed=seed,
                training={**config.to_dict(), "command": _command(names, kind, config)},
                metrics=student_record(result),
            )
    console.print(f"wrote {folder / entry['file']} ({result.seconds:.0f} s)")


def _command(names, kind: str, config) -> str:
    return (
        f"msdda train-student --objectives {','.join(names)} --expert-kind {kind} "
        f"--seed {config.seed} --rounds {config.rounds} --chains {config.chains} "
        f"--student-chains {config.student_chains} --updates {config.updates} --lr {config.lr:g}"
    )
