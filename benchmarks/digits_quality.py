"""MSDDA against the oracle on the digits domain: the paper's central claim, measured.

For preference weights (legibility, boldness) = (w, 1 - w), the weighted standardised
reward R_w = w * legibility + (1 - w) * boldness of

- ``msdda``: the closed-form product of the legibility and boldness experts (no training);
- ``oracle``: a model trained by the same step-level DPO on R_w itself;
- ``db``: the experts' epsilons mixed (variances ignored): equal to msdda for fixed
  variances, the measure of what precision weighting changes for learned ones;
- ``base``, and ``target``: the exact step-level optimum of R_w by per-step importance
  resampling from the base (M candidates), which tells under-trained experts from an
  objective that itself rewards degenerate images;

on the same prompts (digits cycling 0-9) and the same per-sample seeds, for fixed- and
learned-variance experts, over several training seeds. Reported: means with the standard
error over samples, the spread (std) over training seeds, and the gain ratio
(R_msdda - R_base) / (R_oracle - R_base) (1 = as good as the oracle).

Models of a training seed come from the shipped weights when they hold that seed (they
hold seeds 0 and 1 of every expert and oracle, fixed and learned), else from adapters
cached under ``--cache`` (trained here on first use, with their time reported). Run
(measured 8-12 minutes on a shared 2-core CPU with the defaults when it also trained
the 15 models the shipped weights then lacked, ~4 minutes of it)::

    .venv/bin/python benchmarks/digits_quality.py
    .venv/bin/python benchmarks/digits_quality.py --samples 1000 --target-samples 500  # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from msdda import Expert
from msdda.digits import decode, load_digits_bundle
from msdda.digits.align import (
    ORACLE_WEIGHTS,
    AlignConfig,
    PairsConfig,
    load_adapter,
    save_adapter,
    train_experts_and_oracles,
)
from msdda.digits.bundle import DigitsBundle, expert_spec
from msdda.digits.models import GuidedDenoiser
from msdda.digits.store import oracle_tag
from msdda.methods import MethodContext, MethodSettings, run_method

OBJECTIVES = ("legibility", "boldness")
GRID = tuple(w["legibility"] for w in ORACLE_WEIGHTS)  # the oracles' legibility weights w
console = Console(width=200)


def weights_of(w: float) -> dict[str, float]:
    return {"legibility": w, "boldness": 1.0 - w}


def shipped_models(bundle: DigitsBundle, seed: int, kind: str, grid) -> dict | None:
    """The bundle's experts and oracles of ``kind`` and training ``seed``, if it holds them all."""
    try:
        experts = {r: bundle.expert(r, kind, seed=seed) for r in OBJECTIVES}
        oracles = {w: bundle.oracle(weights_of(w), kind, seed=seed) for w in grid}
    except ValueError:
        return None
    return {"experts": experts, "oracles": oracles}


def _as_expert(bundle: DigitsBundle, model, kind: str, kl_coef: float, name: str) -> Expert:
    denoiser = (
        model if bundle.guidance_scale == 1.0 else GuidedDenoiser(model, bundle.guidance_scale)
    )
    return Expert(denoiser, expert_spec(kind), kl_coef, name)


def cached_models(bundle: DigitsBundle, cache: Path, seed: int, kinds) -> dict:
    """Adapters of ``seed`` from ``cache``; trained (and cached) here when absent or stale."""

    def file(weights: dict, kind: str) -> Path:
        return cache / f"seed{seed}-{oracle_tag(weights)}-{kind}.safetensors"

    def load_all() -> dict:
        out = {}
        for kind in kinds:
            experts, oracles = {}, {}
            for r in OBJECTIVES:
                model, info = load_adapter(file({r: 1.0}, kind), bundle.base)
                experts[r] = _as_expert(
                    bundle, model, kind, info["kl_coef"], f"{r}/{kind}/seed{seed}"
                )
            for w in GRID:
                model, info = load_adapter(file(weights_of(w), kind), bundle.base)
                oracles[w] = _as_expert(
                    bundle, model, kind, info["kl_coef"], f"oracle {w}/{kind}/seed{seed}"
                )
            out[kind] = {"experts": experts, "oracles": oracles}
        return out

    try:
        return load_all()
    except ValueError as err:  # missing, or trained on another base
        console.print(f"seed {seed}: {err}")
    console.print(f"training seed {seed}: experts and oracles ({', '.join(kinds)}) ...")
    start = time.perf_counter()
    models = train_experts_and_oracles(
        bundle,
        seed=seed,
        rewards=OBJECTIVES,
        oracle_weights=tuple(weights_of(w) for w in GRID),
        kinds=tuple(kinds),
        config=AlignConfig(eval_samples=0),
        pairs_config=PairsConfig(),
    )
    cache.mkdir(parents=True, exist_ok=True)
    for m in models:
        save_adapter(file(m.weights, m.kind), m)
    console.print(
        f"  trained seed {seed}: {len(models)} models in {time.perf_counter() - start:.0f} s"
    )
    return load_all()


def context(bundle: DigitsBundle, models: dict | None, grid) -> MethodContext:
    experts = models["experts"] if models else {r: bundle.reference for r in OBJECTIVES}
    oracles = {(w, 1.0 - w): models["oracles"][w] for w in grid} if models else {}
    return MethodContext(
        schedule=bundle.schedule,
        reference=bundle.reference,
        experts=tuple(experts[r] for r in OBJECTIVES),
        sample_shape=(1, 8, 8),
        rewards=tuple(bundle.rewards[r] for r in OBJECTIVES),
        decode=decode,
        oracles=oracles,
    )


@torch.no_grad()
def evaluate(bundle, ctx, method, w, num, eval_seed, batch, settings) -> dict:
    """Rewards of ``num`` samples of ``method`` (prompts i % 10, seeds eval_seed + i)."""
    legs, bolds, accs, xs = [], [], [], []
    seconds = 0.0
    for s in range(0, num, batch):
        idx = torch.arange(s, min(s + batch, num))
        prompts = idx % 10
        run = run_method(
            method,
            ctx,
            (w, 1.0 - w) if method != "base" else None,
            prompts,
            [eval_seed + int(i) for i in idx],
            settings=settings,
        )
        images = decode(run.samples)
        legs.append(bundle.rewards["legibility"](images, prompts))
        bolds.append(bundle.rewards["boldness"](images, prompts))
        accs.append((bundle.classifier(images).argmax(1) == prompts).float())
        xs.append(run.samples)
        seconds += run.seconds
    leg, bold = torch.cat(legs).double(), torch.cat(bolds).double()
    return {
        "leg": leg,
        "bold": bold,
        "acc": float(torch.cat(accs).mean()),
        "x": torch.cat(xs),
        "seconds": seconds,
    }


def summary(r: dict, w: float) -> dict:
    rw = w * r["leg"] + (1 - w) * r["bold"]
    n = rw.numel()
    return {
        "R": float(rw.mean()),
        "R_se": float(rw.std() / math.sqrt(n)),
        "legibility": float(r["leg"].mean()),
        "boldness": float(r["bold"].mean()),
        "accuracy": r["acc"],
        "n": n,
        "seconds": r["seconds"],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="digits weights folder (default: shipped)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument(
        "--grid",
        type=float,
        nargs="+",
        default=list(GRID),
        choices=GRID,
        help="legibility weights w",
    )
    p.add_argument("--kinds", nargs="+", default=["fixed", "learned"], choices=["fixed", "learned"])
    p.add_argument("--samples", type=int, default=5000, help="evaluation samples per point")
    p.add_argument(
        "--target-samples", type=int, default=2000, help="samples of the target per weight"
    )
    p.add_argument(
        "--target-candidates", type=int, default=32, help="M candidates per step of target"
    )
    p.add_argument("--eval-seed", type=int, default=1_000_000, help="first per-sample seed")
    p.add_argument("--batch", type=int, default=2500, help="samples per chain batch")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("msdda-out/quality-models"),
        help="adapters of seeds trained here",
    )
    p.add_argument(
        "--no-shipped", action="store_true", help="train every seed here, ignore shipped experts"
    )
    p.add_argument(
        "--out", type=Path, default=Path("msdda-out/digits-quality.json"), help="results JSON"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_digits_bundle(args.weights)
    grid = sorted(set(args.grid))
    settings = MethodSettings(target_candidates=args.target_candidates)

    # Models per (seed, kind): shipped when the bundle holds them all, else cached adapters.
    models: dict[tuple[int, str], dict] = {}
    sources: dict[str, str] = {}
    for seed in args.seeds:
        missing = []
        for k in args.kinds:
            shipped = None if args.no_shipped else shipped_models(bundle, seed, k, grid)
            if shipped:
                models[(seed, k)] = shipped
                sources[f"seed {seed} {k}"] = "shipped"
            else:
                missing.append(k)
        if missing:
            for k, m in cached_models(bundle, args.cache, seed, missing).items():
                models[(seed, k)] = m
                sources[f"seed {seed} {k}"] = f"cache {args.cache}"
    models = dict(sorted(models.items()))
    console.print("models: " + ", ".join(f"{key}: {src}" for key, src in sources.items()))

    rows = []
    ev = dict(num=args.samples, eval_seed=args.eval_seed, batch=args.batch, settings=settings)
    base_ctx = context(bundle, None, grid)
    base = evaluate(bundle, base_ctx, "base", 0.5, **ev)
    for w in grid:
        rows.append({"method": "base", "w": w, "kind": None, "seed": None, **summary(base, w)})
        tgt = evaluate(bundle, base_ctx, "target", w, **{**ev, "num": args.target_samples})
        rows.append(
            {
                "method": "target",
                "w": w,
                "kind": None,
                "seed": None,
                "M": args.target_candidates,
                **summary(tgt, w),
            }
        )
        console.print(
            f"w={w}: base R={rows[-2]['R']:.3f}, target R={rows[-1]['R']:.3f} ({tgt['seconds']:.0f} s)"
        )
    for (seed, kind), m in models.items():
        ctx = context(bundle, m, grid)
        for w in grid:
            got = {meth: evaluate(bundle, ctx, meth, w, **ev) for meth in ("msdda", "oracle", "db")}
            diff = float((got["msdda"]["x"] - got["db"]["x"]).abs().mean())
            for meth, r in got.items():
                rows.append({"method": meth, "w": w, "kind": kind, "seed": seed, **summary(r, w)})
            rows[-1]["mean_abs_pixel_diff_to_msdda"] = diff
            console.print(
                f"seed {seed} {kind} w={w}: msdda R={rows[-3]['R']:.3f} oracle R={rows[-2]['R']:.3f} "
                f"db R={rows[-1]['R']:.3f} |x_msdda - x_db|={diff:.2e} "
                f"({sum(r['seconds'] for r in got.values()):.0f} s)"
            )

    # Summary: mean over seeds, spread (std over seeds), gain ratios.
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["w"], r["kind"])].append(r)
    base_r = {w: by[("base", w, None)][0]["R"] for w in grid}
    target_r = {w: by[("target", w, None)][0]["R"] for w in grid}
    table = Table(
        title=f"Weighted reward R_w = w*legibility + (1-w)*boldness (standardised), {args.samples} samples/point, seeds {args.seeds}"
    )
    for col in (
        "w",
        "kind",
        "base",
        "target",
        "oracle",
        "msdda",
        "db",
        "se",
        "msdda/oracle gain",
        "msdda/target gain",
    ):
        table.add_column(col, justify="right")
    summaries = []
    for w in grid:
        for kind in args.kinds:
            cell = {}
            for meth in ("oracle", "msdda", "db"):
                rs = by[(meth, w, kind)]
                mean, std = _mean_std([r["R"] for r in rs])
                se = statistics.fmean([r["R_se"] for r in rs]) / math.sqrt(len(rs))
                cell[meth] = (mean, std, se)
            ratios = [
                (m["R"] - base_r[w]) / (o["R"] - base_r[w])
                for m, o in zip(by[("msdda", w, kind)], by[("oracle", w, kind)], strict=True)
            ]
            ratio, ratio_std = _mean_std(ratios)
            to_target = (cell["msdda"][0] - base_r[w]) / (target_r[w] - base_r[w])
            summaries.append(
                {
                    "w": w,
                    "kind": kind,
                    "base": base_r[w],
                    "target": target_r[w],
                    **{f"{k}_mean": v[0] for k, v in cell.items()},
                    **{f"{k}_std_over_seeds": v[1] for k, v in cell.items()},
                    **{f"{k}_se": v[2] for k, v in cell.items()},
                    "gain_ratio_msdda_over_oracle": ratio,
                    "gain_ratio_std_over_seeds": ratio_std,
                    "gain_ratio_msdda_over_target": to_target,
                }
            )
            fmt = lambda c: f"{c[0]:.3f} ± {c[1]:.3f}"  # noqa: E731
            table.add_row(
                f"{w:g}",
                kind,
                f"{base_r[w]:.3f}",
                f"{target_r[w]:.3f}",
                fmt(cell["oracle"]),
                fmt(cell["msdda"]),
                fmt(cell["db"]),
                f"{cell['msdda'][2]:.3f}",
                f"{ratio:.3f} ± {ratio_std:.3f}",
                f"{to_target:.3f}",
            )
    console.print(table)
    console.print(
        "± is the std over training seeds; se the standard error (over samples) of msdda's mean over "
        f"seeds; target: importance resampling, M = {args.target_candidates}, {args.target_samples} samples; "
        "gains are over base."
    )
    elapsed = time.perf_counter() - start
    console.print(f"total {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sources": sources,
        "rows": rows,
        "summary": summaries,
        "seconds": elapsed,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
