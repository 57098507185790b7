"""``sample_chain``: one loop, x_{t-1} = mean + sqrt(variance) * z, no noise after the last step."""

from __future__ import annotations

import pytest
import torch

from msdda import Gaussian, SeededNoise, sample_chain

TIMESTEPS = (900, 700, 500, 300, 100, 0)


class RecordingNoise:
    """Wraps a noise sampler and keeps every z the loop drew, by step index."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.draws: list[tuple[int, torch.Tensor]] = []

    def __call__(self, step_index: int, like: torch.Tensor) -> torch.Tensor:
        z = self.inner(step_index, like)
        self.draws.append((step_index, z.clone()))
        return z


def shrink(x_t: torch.Tensor, t: int) -> Gaussian:
    """A per-sample (element-wise) policy: N(0.9 x_t + t / 1000, 0.1)."""
    return Gaussian(0.9 * x_t + t / 1000, torch.full_like(x_t, 0.1))


def drift(x_t: torch.Tensor, t: int) -> Gaussian:
    """A different policy with a per-element variance."""
    return Gaussian(x_t - 0.5, 0.2 + x_t.abs())


def test_no_noise_is_added_after_the_last_step():
    def policy(x_t, t):  # huge variance at the last step must not matter
        return Gaussian(x_t + 1.0, torch.full_like(x_t, 1e6 if t == 0 else 0.0))

    x_T = torch.zeros(3, 2)
    out = sample_chain(policy, x_T, TIMESTEPS, SeededNoise(0))
    assert torch.equal(out, torch.full((3, 2), float(len(TIMESTEPS))))


def test_every_step_draws_mean_plus_sqrt_variance_times_z():
    noise = RecordingNoise(SeededNoise(0))
    states = []
    x_T = SeededNoise(5).initial((4, 3))
    out = sample_chain(drift, x_T, TIMESTEPS, noise, callback=lambda i, t, x: states.append(x))
    assert [i for i, _ in noise.draws] == list(range(len(TIMESTEPS) - 1))
    prev = x_T
    for (i, z), x in zip(noise.draws, states, strict=False):
        g = drift(prev, TIMESTEPS[i])
        torch.testing.assert_close(x, g.mean + g.variance.sqrt() * z, rtol=0, atol=0)
        prev = x
    assert torch.equal(out, drift(states[-2], TIMESTEPS[-1]).mean)


def test_two_different_policies_run_from_one_seed_see_identical_noise():
    x_T = SeededNoise(3).initial((4, 3))
    a, b = RecordingNoise(SeededNoise(11)), RecordingNoise(SeededNoise(11))
    out_a = sample_chain(shrink, x_T, TIMESTEPS, a)
    out_b = sample_chain(drift, x_T, TIMESTEPS, b)
    assert not torch.allclose(out_a, out_b)
    assert len(a.draws) == len(b.draws) == len(TIMESTEPS) - 1
    for (i, za), (j, zb) in zip(a.draws, b.draws, strict=True):
        assert i == j and torch.equal(za, zb)
    # and the noise differs from step to step
    assert not torch.equal(a.draws[0][1], a.draws[1][1])


def test_same_seed_gives_the_same_samples_and_another_seed_does_not():
    def run(seed):
        noise = SeededNoise(seed)
        return sample_chain(shrink, noise.initial((4, 3)), TIMESTEPS, noise)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_a_sample_with_its_own_seed_does_not_depend_on_the_rest_of_the_batch():
    def run(seeds):
        noise = SeededNoise(seeds)
        x_T = noise.initial((len(seeds), 2, 3))
        return sample_chain(shrink, x_T, TIMESTEPS, noise)

    batch = run([3, 4, 5])
    alone = run([4])
    other_batch = run([9, 4])
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(other_batch[1], alone[0])
    assert not torch.allclose(batch[0], batch[1])


def test_per_sample_seeds_refuse_a_batch_of_another_size():
    with pytest.raises(ValueError, match="batch of 2 samples for 3 seeds"):
        SeededNoise([1, 2, 3]).initial((2, 4))


def test_seeds_must_be_ints():
    with pytest.raises(TypeError, match="seed must be an int"):
        SeededNoise([1, 2.5])
    with pytest.raises(TypeError, match="seeds must be an int or a non-empty sequence of ints"):
        SeededNoise([])
    with pytest.raises(TypeError, match="seeds must be an int or a non-empty sequence of ints"):
        SeededNoise("12")
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        SeededNoise([True])


def test_step_noise_takes_the_dtype_of_the_state():
    z = SeededNoise(0)(0, torch.zeros(2, 3, dtype=torch.float64))
    assert z.dtype == torch.float64 and z.shape == (2, 3)


def test_a_point_mass_step_moves_to_its_mean():
    """Methods that pick the next state themselves return variance 0."""
    x_T = torch.randn(2, 3)
    out = sample_chain(
        lambda x, t: Gaussian(x * 2, torch.zeros_like(x)), x_T, TIMESTEPS, SeededNoise(0)
    )
    assert torch.equal(out, x_T * 2 ** len(TIMESTEPS))


def test_the_callback_sees_every_step_in_order():
    seen = []
    sample_chain(
        shrink,
        torch.zeros(1, 2),
        TIMESTEPS,
        SeededNoise(0),
        callback=lambda i, t, x: seen.append((i, t)),
    )
    assert seen == list(enumerate(TIMESTEPS))


def test_a_mean_of_the_wrong_shape_is_refused():
    def bad(x_t, t):
        return Gaussian(x_t[:, :1], torch.ones_like(x_t[:, :1]))

    with pytest.raises(
        ValueError, match=r"step returned a mean of shape \(2, 1\) for x_t of \(2, 3\)"
    ):
        sample_chain(bad, torch.zeros(2, 3), TIMESTEPS, SeededNoise(0))


def test_empty_timesteps_are_refused():
    with pytest.raises(ValueError, match="timesteps is empty"):
        sample_chain(shrink, torch.zeros(2, 3), [], SeededNoise(0))


def test_slices_of_the_timesteps_continue_the_whole_chain_exactly():
    from msdda.sampling import NoiseTape

    tape = NoiseTape.seeded([1, 2])
    x_T = tape.initial((2, 3))
    states: list[torch.Tensor] = []
    whole = sample_chain(drift, x_T, TIMESTEPS, tape, callback=lambda i, t, x: states.append(x))
    head = sample_chain(drift, x_T, TIMESTEPS[:2], tape, ends_chain=False)
    seen = []
    tail = sample_chain(
        drift,
        head,
        TIMESTEPS[2:],
        tape,
        first_index=2,
        callback=lambda i, t, x: seen.append((i, t)),
    )
    assert torch.equal(head, states[1]) and torch.equal(tail, whole)
    assert seen == list(enumerate(TIMESTEPS))[2:]  # global step indices


def test_a_slice_that_ends_the_chain_adds_no_noise_and_one_that_does_not_adds_it():
    noise = RecordingNoise(SeededNoise(0))
    sample_chain(shrink, torch.zeros(1, 2), TIMESTEPS[1:3], noise, first_index=1)
    assert [i for i, _ in noise.draws] == [1]
    noise = RecordingNoise(SeededNoise(0))
    sample_chain(shrink, torch.zeros(1, 2), TIMESTEPS[1:3], noise, first_index=1, ends_chain=False)
    assert [i for i, _ in noise.draws] == [1, 2]
    with pytest.raises(ValueError, match="first_index must be an int >= 0"):
        sample_chain(shrink, torch.zeros(1, 2), TIMESTEPS, noise, first_index=-1)


def test_every_noise_source_lives_in_the_sampling_module():
    import msdda.methods as methods
    import msdda.sampling as sampling

    for name in ("NoiseTape", "SampleGenerators", "derive_seed"):
        assert getattr(methods, name) is getattr(sampling, name)


def test_generator_noise_draws_as_diffusers_does():
    from diffusers.utils.torch_utils import randn_tensor

    from msdda.sampling import GeneratorNoise

    like = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    noise = GeneratorNoise(torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32)
    got = [noise(i, like) for i in range(2)]
    gen = torch.Generator().manual_seed(5)
    want = [randn_tensor((2, 4, 3, 3), generator=gen, dtype=torch.float32) for _ in range(2)]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float64 and torch.equal(g, w.double())
