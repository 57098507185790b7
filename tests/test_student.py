"""The weight-conditioned student distilled from MSDDA (msdda.student, msdda.digits.student).

Tiny random digits folders (msdda.digits.testing): the untrained student is the base bit
for bit, the loss is the exact Gaussian KL, the student at a vertex approaches that
expert as it trains, the shipped-format file reloads into the same student, and the
``student`` method runs through the registry with one network evaluation per step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from msdda.digits.bundle import load_digits_bundle
from msdda.digits.student import (
    distillation_problem,
    find_student,
    load_students,
    new_student,
    save_student,
    student_expert,
    student_factory,
    train_student,
)
from msdda.digits.testing import make_tiny_weights
from msdda.experts import expert_policy
from msdda.gaussian import Gaussian
from msdda.methods import METHODS, run_method
from msdda.student import (
    DistillConfig,
    WeightEmbedding,
    collect,
    distill,
    distillation_weights,
    measure,
    step_kl,
)

OBJECTIVES = ("legibility", "boldness")
FAST = DistillConfig(rounds=2, chains=4, student_chains=2, updates=2, batch_rows=64, log_every=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = make_tiny_weights(tmp_path_factory.mktemp("student") / "weights")
    return load_digits_bundle(folder, num_inference_steps=6)


def _inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_the_untrained_student_is_the_base_bit_for_bit(bundle, kind):
    student = new_student(bundle.base, 2, kind)
    x, t, c = _inputs()
    w = distillation_weights(2, 3, torch.Generator().manual_seed(1)).float()[:6]
    out = student(x, t, c, w)
    assert torch.equal(out[:, :1], bundle.base(x, t, c))
    if kind == "learned":  # the variance head starts at v = 0: the base's fixed_small step
        assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))
    step = expert_policy(student_expert(student, (0.3, 0.7), 1.0), bundle.schedule, c)
    ref = expert_policy(bundle.reference, bundle.schedule, c)
    for t_ in bundle.schedule.timesteps[:-1]:
        a, b = step(x, int(t_)), ref(x, int(t_))
        assert torch.equal(a.mean, b.mean)
        if kind == "fixed":
            assert torch.equal(a.variance, b.variance)
        else:  # learned_log: beta_tilde exp(0), computed in log space, is fixed_small to round-off
            torch.testing.assert_close(
                a.variance, b.variance.expand_as(a.variance), rtol=1e-6, atol=0
            )


def test_the_weight_embedding_starts_at_zero_and_checks_its_input():
    emb = WeightEmbedding(3, 8)
    assert torch.equal(emb(torch.rand(4, 3)), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="2 objectives, the embedding 3"):
        emb(torch.rand(4, 2))


def test_distillation_weights_hold_the_vertices_and_the_centre():
    w = distillation_weights(3, 5, torch.Generator().manual_seed(0))
    assert w.shape == (9, 3)
    torch.testing.assert_close(w[:3], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(w[3], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(9, dtype=torch.float64))


def test_the_loss_is_the_exact_gaussian_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    p = Gaussian(torch.randn(1, 5, generator=g), 0.5 + torch.rand(1, 5, generator=g))
    q = Gaussian(torch.randn(1, 5, generator=g), 0.5 + torch.rand(1, 5, generator=g))
    exact = step_kl(p, q)
    n = 400_000
    x = p.mean + p.std * torch.randn(n, 5, generator=g)
    ratio = Gaussian(p.mean.expand(n, 5), p.variance.expand(n, 5)).log_prob(x) - Gaussian(
        q.mean.expand(n, 5), q.variance.expand(n, 5)
    ).log_prob(x)
    mc, se = ratio.mean(), ratio.std() / n**0.5
    assert abs(float(exact) - float(mc)) < 4 * float(se)
    assert float(step_kl(p, p)) == 0.0


def _vertex_kl(bundle, student, seed=5):
    """Mean path KL of the student at w = (1, 0) to expert 0 on that expert's chains."""
    problem = distillation_problem(bundle, OBJECTIVES, student)
    config = dataclasses.replace(FAST, random_weights=0, chains=32, student_chains=0, seed=seed)
    paths, _ = measure(problem, collect(problem, config, torch.Generator().manual_seed(seed)))
    return paths["(1.00, 0.00)"]


def test_the_student_at_a_vertex_approaches_that_expert_as_it_trains(bundle):
    torch.manual_seed(0)
    student = new_student(bundle.base, 2, "fixed")
    before = _vertex_kl(bundle, student)
    problem = distillation_problem(bundle, OBJECTIVES, student)
    config = dataclasses.replace(FAST, rounds=12, updates=12, lr=2e-2, batch_rows=256)
    result = distill(problem, config)
    after = _vertex_kl(bundle, student)
    assert before > 0 and after < 0.5 * before, (before, after)
    first, last = result.records[0], result.records[-1]
    assert len(first.step_kl) == len(bundle.schedule.timesteps) - 1  # the last step has no KL
    assert set(first.path_kl) >= {"(1.00, 0.00)", "(0.00, 1.00)", "(0.50, 0.50)"}
    assert last.path_kl["(0.50, 0.50)"] < first.path_kl["(0.50, 0.50)"]


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_a_saved_student_reloads_as_the_same_model(bundle, kind, tmp_path):
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(bundle.path, folder)
    student, result = train_student(bundle, OBJECTIVES, kind, FAST)
    entry = save_student(folder, bundle, student, OBJECTIVES, seed=0, training={"x": 1})
    loaded = find_student(load_students(bundle, folder), OBJECTIVES, kind)
    assert loaded.current and entry["file"] == f"student-legibility-boldness-{kind}.safetensors"
    x, t, c = _inputs()
    w = torch.tensor([[0.2, 0.8]]).expand(6, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.student(x, t, c, w), student(x, t, c, w))
    assert not torch.equal(loaded.student(x, t, c, w)[:, :1], bundle.base(x, t, c))
    with pytest.raises(ValueError, match="train-student"):
        find_student([loaded], OBJECTIVES, kind, seed=3)


def test_the_student_method_runs_with_one_evaluation_per_step(bundle):
    from msdda.digits.sampling import method_context

    assert METHODS["student"].needs_student
    student = new_student(bundle.base, 2, "fixed")
    ctx = dataclasses.replace(
        method_context(bundle, OBJECTIVES), student=student_factory(student, 1.0)
    )
    c = torch.arange(4)
    run = run_method("student", ctx, (0.4, 0.6), c, [1, 2, 3, 4], measure_kl=True)
    base = run_method("base", ctx, None, c, [1, 2, 3, 4])
    assert run.nfe_per_image == len(bundle.schedule.timesteps)
    torch.testing.assert_close(run.samples, base.samples, rtol=0, atol=0)  # untrained: the base
    assert torch.equal(run.kl, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="trained student"):
        run_method("student", method_context(bundle, OBJECTIVES), (0.5, 0.5), c, [1, 2, 3, 4])


# ----------------------------------------------------------------- Stable Diffusion (UNet)


@pytest.fixture(scope="module")
def tiny_sd():
    pytest.importorskip("diffusers")
    import copy

    from msdda.experts import Expert
    from msdda.gaussians import Schedule, StepSpec
    from msdda.sd.student import unet_denoiser
    from msdda.sd.testing import TinySDConfig, _sd_scheduler, random_lora, tiny_unet

    base = tiny_unet(TinySDConfig(sample_size=8))
    experts = []
    for i in range(2):
        unet = copy.deepcopy(base)
        random_lora(unet, seed=10 + i, std=0.3)
        experts.append(Expert(unet_denoiser(unet.eval()), StepSpec("epsilon"), 1.0, f"e{i}"))
    schedule = Schedule.from_scheduler(_sd_scheduler("ddpm"), 4)
    prompts = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    return base, experts, schedule, prompts


def test_the_untrained_unet_student_is_the_base_and_its_loss_falls(tiny_sd):
    import copy

    from msdda.sd.student import UNetStudent, unet_distillation_problem

    base, experts, schedule, prompts = tiny_sd
    student = UNetStudent(copy.deepcopy(base), 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        out = student(x, t, prompts[:2], torch.tensor([[0.3, 0.7], [1.0, 0.0]]))
        assert torch.equal(out, base(x, t, encoder_hidden_states=prompts[:2]).sample)
    problem = unet_distillation_problem(student, experts, schedule, (4, 8, 8), prompts)
    config = dataclasses.replace(FAST, rounds=6, updates=4, lr=1e-2, batch_rows=48, chains=4)
    result = distill(problem, config)
    first, last = result.records[0], result.records[-1]
    assert sum(last.path_kl.values()) < sum(first.path_kl.values()), (first, last)


def test_train_student_then_generate_with_it_from_the_command_line(bundle, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from msdda.cli import app

    folder = tmp_path / "weights"
    shutil.copytree(bundle.path, folder)
    runner = CliRunner()
    small = ["--rounds", "1", "--chains", "2", "--student-chains", "1", "--updates", "1"]
    result = runner.invoke(app, ["train-student", "--weights-dir", str(folder), *small])
    assert result.exit_code == 0, result.output
    (entry,) = load_students(load_digits_bundle(folder), folder)
    assert entry.current and entry.entry["training"]["command"].startswith("msdda train-student")
    out = tmp_path / "s.npy"
    args = ["generate", "--prompt", "3", "--weight", "legibility=0.25", "--weight", "boldness=0.75"]
    args += ["--method", "student", "--weights-dir", str(folder), "--num-samples", "3"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    import numpy as np

    images = np.load(out)
    assert images.shape == (3, 8, 8) and np.isfinite(images).all()
    result = runner.invoke(
        app, [*args, "--expert-kind", "learned", "--out", str(tmp_path / "x.npy")]
    )
    assert result.exit_code == 2 and "train-student" in result.output
    assert not (tmp_path / "x.npy").exists()
