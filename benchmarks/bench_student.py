"""The digits students against MSDDA, the base and the oracles: reward, path KL, time.

For each shipped student (objectives, kind, training seed) and each weight of the grid
(11 weights for K = 2, the 10 points of the 1/3 grid on the K = 3 simplex), samples
``--samples`` images with the base, MSDDA (over the experts of the student's seed), the
student and the oracle where one exists, on identical seeds and digits (uniform), and
prints the weighted standardised reward sum_i w_i r_i (mean +- standard error), the
student's gain over the base as a fraction of MSDDA's, the path KL of the student to
MSDDA (sum over steps of KL(MSDDA step || student step) on MSDDA's chains, exact), and
the time per image relative to the base measured in the same run: in the sampling runs
(``run_method``, seeded per-sample noise included) and, for the chains alone, as the
median over interleaved repeats on pre-drawn noise (``chain``).

    nice -n 10 .venv/bin/python benchmarks/bench_student.py --samples 5000 --out /tmp/student.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time

import torch

from msdda.digits.bundle import load_digits_bundle
from msdda.digits.data import decode
from msdda.digits.sampling import method_context
from msdda.digits.student import distillation_problem, load_students
from msdda.methods import run_method
from msdda.student import Buffer, measure, visited_steps


def weight_grid(k: int) -> list[tuple[float, ...]]:
    if k == 2:
        return [(i / 10, 1 - i / 10) for i in range(11)]
    n = 3
    return [
        tuple(c / n for c in combo)
        for combo in itertools.product(range(n + 1), repeat=k)
        if sum(combo) == n
    ]


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def weighted_reward(bundle, names, w, x0, cond) -> torch.Tensor:
    images = decode(x0)
    return sum(wi * bundle.rewards[n](images, cond) for wi, n in zip(w, names, strict=True))


def _oracle(bundle, names, w, kind, seed):
    try:
        return bundle.oracle(dict(zip(names, w, strict=True)), kind, seed)
    except ValueError:
        return None


def evaluate_point(bundle, loaded, w, samples, chunk):
    """Rewards and seconds per method at one weight (same seeds and digits for all)."""
    names, kind, seed = loaded.objectives, loaded.kind, loaded.seed
    ctx = method_context(bundle, names, kind)
    experts = tuple(bundle.expert(n, kind, seed) for n in names)
    oracle = _oracle(bundle, names, w, kind, seed)
    ctx = dataclasses.replace(
        ctx,
        experts=experts,
        student=lambda weights: loaded.expert(weights),
        oracles={} if oracle is None else {tuple(w): oracle},
    )
    methods = ["base", "msdda", "student"] + ([] if oracle is None else ["oracle"])
    rewards = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for start in range(0, samples, chunk):
        seeds = list(range(10_000 + start, 10_000 + min(samples, start + chunk)))
        cond = torch.tensor([s % 10 for s in seeds])
        for m in methods:
            run = run_method(m, ctx, None if m == "base" else w, cond, seeds)
            rewards[m].append(weighted_reward(bundle, names, w, run.samples, cond))
            seconds[m] += run.seconds
    return {m: torch.cat(r) for m, r in rewards.items()}, seconds


def path_kl(bundle, loaded, w, chains: int) -> float:
    """Mean over MSDDA chains of sum_t KL(MSDDA step || student step), nats."""
    problem = distillation_problem(
        bundle, loaded.objectives, loaded.student, teacher_seed=loaded.seed
    )
    g = torch.Generator().manual_seed(778)
    cond = problem.draw_cond(chains, g)
    x_T = torch.randn((chains, *problem.sample_shape), generator=g)
    teacher = problem.teacher(tuple(w), cond)
    visited = visited_steps(
        teacher,
        teacher,
        x_T,
        problem.schedule,
        lambda i, like: torch.randn(like.shape, generator=g),
        roll_is_teacher=True,
    )
    buffer = Buffer(
        visited.x, visited.t, problem.tile(cond, visited.steps),
        torch.tensor([w], dtype=torch.float32).expand(visited.x.shape[0], -1), visited.teacher,
        [("w", slice(0, visited.x.shape[0]), chains)], visited.steps,
    )  # fmt: skip
    paths, _ = measure(problem, buffer)
    return paths["w"]


def timing(bundle, loaded, w, n: int, repeats: int) -> dict[str, float]:
    """Median over interleaved repeats of seconds per image of each policy relative to the
    base, on one x_T and one set of step noises drawn beforehand (the chain alone)."""
    from msdda.experts import expert_policy
    from msdda.methods import msdda_policy
    from msdda.sampling import sample_chain

    names, kind = loaded.objectives, loaded.kind
    ctx = method_context(bundle, names, kind)
    experts = tuple(bundle.expert(nm, kind, loaded.seed) for nm in names)
    ctx = dataclasses.replace(ctx, experts=experts)
    cond = torch.arange(n) % 10
    policies = {
        "base": expert_policy(bundle.reference, bundle.schedule, cond),
        "student": expert_policy(loaded.expert(w), bundle.schedule, cond),
        "msdda": msdda_policy(ctx, w, cond),
    }
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(n, 1, 8, 8, generator=g)
    zs = [torch.randn(n, 1, 8, 8, generator=g) for _ in bundle.schedule.timesteps]
    ratios = {"student": [], "msdda": []}
    orders = list(itertools.permutations(policies))
    for r in range(repeats):
        sec = {}
        for m in orders[r % len(orders)]:
            start = time.perf_counter()
            sample_chain(policies[m], x_T, bundle.schedule.timesteps, lambda i, like: zs[i])
            sec[m] = time.perf_counter() - start
        for m in ratios:
            ratios[m].append(sec[m] / sec["base"])
    return {m: sorted(v)[len(v) // 2] for m, v in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--kl-chains", type=int, default=256)
    parser.add_argument("--kinds", nargs="+", default=["fixed", "learned"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", default=None)
    parser.add_argument("--time-images", type=int, default=1000)
    parser.add_argument("--time-repeats", type=int, default=7)
    parser.add_argument("--weights-dir", default=None, help="default: the shipped weights")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    bundle = load_digits_bundle(args.weights_dir, num_inference_steps=args.steps)
    rows = []
    for loaded in load_students(bundle):
        if loaded.kind not in args.kinds or loaded.seed not in args.seeds:
            continue
        tag = f"{'+'.join(loaded.objectives)}/{loaded.kind}/seed{loaded.seed}"
        print(f"\n## {tag} (distilled from the shipped experts: {loaded.current})")
        print(
            "| w | base | msdda | student | oracle | student - msdda | gain ratio | path KL st-msdda "
            "| time st/base | time msdda/base | chain st/base | chain msdda/base |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for w in weight_grid(len(loaded.objectives)):
            start = time.perf_counter()
            rewards, seconds = evaluate_point(bundle, loaded, w, args.samples, args.chunk)
            stats = {m: _mean_se(r) for m, r in rewards.items()}
            paired = _mean_se(rewards["student"] - rewards["msdda"])  # same seeds and digits
            gain_m = stats["msdda"][0] - stats["base"][0]
            gain_s = stats["student"][0] - stats["base"][0]
            ratio = gain_s / gain_m if abs(gain_m) > 1e-9 else float("nan")
            kl = path_kl(bundle, loaded, w, args.kl_chains)
            chain = timing(bundle, loaded, w, args.time_images, args.time_repeats)
            row = {
                "model": tag, "weights": list(w),
                **{m: {"mean": v[0], "se": v[1]} for m, v in stats.items()},
                "gain_ratio": ratio, "student_minus_msdda": {"mean": paired[0], "se": paired[1]}, "path_kl_student_msdda": kl,
                "time_student_vs_base": seconds["student"] / seconds["base"],
                "time_msdda_vs_base": seconds["msdda"] / seconds["base"],
                "chain_time_student_vs_base": chain["student"],
                "chain_time_msdda_vs_base": chain["msdda"],
                "seconds": time.perf_counter() - start,
            }  # fmt: skip
            rows.append(row)
            fmt = {m: f"{v[0]:+.3f} ± {v[1]:.3f}" for m, v in stats.items()}
            print(
                f"| {tuple(round(x, 3) for x in w)} | {fmt['base']} | {fmt['msdda']} | "
                f"{fmt['student']} | {fmt.get('oracle', '-')} | {paired[0]:+.3f} ± {paired[1]:.3f} | "
                f"{ratio:.3f} | {kl:.3f} | "
                f"{row['time_student_vs_base']:.2f} | {row['time_msdda_vs_base']:.2f} | "
                f"{chain['student']:.2f} | {chain['msdda']:.2f} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"samples": args.samples, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
