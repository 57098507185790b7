"""Where exactness matters: MSDDA, db and rs against the exact step-level target (issue 15).

Each *setting* stresses an approximation of the simple methods: a small beta (experts far
from the base), a full fine-tune instead of a LoRA (far in weight space), a short schedule
with a learned variance (distinct variances), experts sampled at distinct DDIM etas, and
K = 3 objectives. For every setting and training seed this trains (here, seeded) the
experts and the oracle at the same beta, then samples on the same prompts and noise:

- ``msdda``: the closed-form product of the experts' step Gaussians;
- ``db``: the experts' epsilons mixed (``fixed_small``, or the fused eta: variances ignored);
- ``rs``: the experts' weights averaged (rewarded soups);
- ``target``: the exact step-level optimum p_ref exp(sum_i w_i r_i / beta), by per-step
  importance resampling from the base with M candidates (converged in M: ``--convergence``);
- ``oracle``: a model trained by the same step-level DPO on the weighted reward.

Reported per method: the weighted standardised reward R_w, its gap to the target and to the
oracle, the gain ratio (R - R_base) / (R_target - R_base), the path KL to the base (nats;
an upper bound for ``target``), and the paired differences MSDDA - db and MSDDA - rs with
standard errors (same noise, sample by sample; over seeds: mean, se combined), for the
reward and for the regularised objective R_w - beta KL.

With distinct etas the experts' product tilts the geometric mean of the two DDIM bases;
the target and the oracle use the base at the fused eta (1/eta^2 = sum_i w_i / eta_i^2),
and db and rs sample at that eta too (they get the right variance; only the mean differs).

Measured costs on a 2-core machine shared by several jobs (load 5-13): one setting, one
seed, 1000 samples, 8-10 minutes (71 s for 500 samples when nearly idle); the README's table
(3 settings x 2 seeds) 21 minutes; ``--convergence --ms 32 256`` on 1000 samples 9 minutes::

    nice -n 10 .venv/bin/python benchmarks/bench_exactness.py --settings beta0.25-lora \
        steps10-learned-beta0.25 beta1-lora --samples 1000 --plot docs/figures/exactness.png
    .venv/bin/python benchmarks/bench_exactness.py --list
    .venv/bin/python benchmarks/bench_exactness.py --convergence --samples 1000
    .venv/bin/python benchmarks/bench_exactness.py --gap "shipped" "steps x4" --seeds 0
    .venv/bin/python benchmarks/bench_exactness.py --settings beta0.25-lora \
        --save-preset src/msdda/digits/presets/beta0.25   # the demo preset's adapters
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from msdda import Expert, StepSpec
from msdda.digits import decode, load_digits_bundle
from msdda.digits.align import (
    AlignConfig,
    LoraSettings,
    PairsConfig,
    collect_digit_pairs,
    sampler_bundle,
    save_adapter,
    train_aligned,
    variance_offsets,
)
from msdda.digits.bundle import DigitsBundle
from msdda.methods import MethodContext, MethodSettings, run_method

METHODS = ("base", "msdda", "db", "rs", "target", "oracle")


@dataclass(frozen=True)
class Setting:
    """One stress setting: how the experts and the oracle are trained and sampled."""

    name: str
    beta: float = 1.0  # KL coefficient of experts, oracle and target
    steps: int = 50  # sampling steps (DDPM, or DDIM when etas are given)
    adapter: str = "lora"  # "lora" or "full"
    kind: str = "fixed"  # "fixed" or "learned" variance
    etas: tuple[float, ...] | None = None  # per-expert DDIM eta (None: DDPM)
    objectives: tuple[str, ...] = ("legibility", "boldness")
    train: Mapping = field(default_factory=dict)  # AlignConfig overrides
    pairs: Mapping = field(default_factory=dict)  # PairsConfig overrides
    note: str = ""

    @property
    def weights(self) -> tuple[float, ...]:
        k = len(self.objectives)
        return tuple(1.0 / k for _ in range(k))


FULL = {"adapter": "full", "lr": 3e-4}
LEARNED = {"variance_lr": 1e-3}  # 1e-2 runs the head to its bound at beta 0.25 (KL ~400/step)
SETTINGS = {
    s.name: s
    for s in (
        Setting("beta1-lora", note="the shipped setting"),
        Setting("beta0.5-lora", beta=0.5),
        Setting("beta0.25-lora", beta=0.25),
        Setting("beta0.25-full", beta=0.25, adapter="full", train=FULL),
        Setting("beta1-full", adapter="full", train=FULL),
        Setting("steps10-learned", steps=10, kind="learned", train=LEARNED, pairs={"skip_last": 1}),
        Setting(
            "steps10-learned-beta0.25",
            beta=0.25,
            steps=10,
            kind="learned",
            train=LEARNED,
            pairs={"skip_last": 1},
        ),
        Setting("steps20-learned", steps=20, kind="learned", train=LEARNED, pairs={"skip_last": 2}),
        Setting("steps50-learned", kind="learned", train=LEARNED),
        Setting("eta1-0.5", etas=(1.0, 0.5)),
        Setting("eta1-0.5-beta0.25", beta=0.25, etas=(1.0, 0.5)),
        Setting("k3-symmetry", objectives=("legibility", "boldness", "symmetry")),
    )
}


def fused_eta(etas, weights) -> float:
    """The eta whose DDIM variance is the fused one: 1/eta^2 = sum_i w_i / eta_i^2."""
    return 1.0 / math.sqrt(sum(w / e**2 for w, e in zip(weights, etas, strict=True)))


def _train(bundle, setting: Setting, weights: dict, pairs, seed: int, keep=None) -> Expert:
    config = AlignConfig(kl_coef=setting.beta, eval_samples=0, **dict(setting.train))
    m = train_aligned(bundle, weights, setting.kind, pairs=pairs, config=config, seed=seed)
    if keep is not None:
        keep.append(m)
    return m.expert


def _offsets(experts, pairs) -> list[dict]:
    """How far each learned variance moved: stats of log(var / beta_tilde) at reference states."""
    return [variance_offsets(e, pairs) for e in experts if e.spec.learned_variance]


def train_setting(bundle: DigitsBundle, setting: Setting, seed: int, keep=None) -> dict:
    """The setting's experts (by objective), oracle and sampler bundles of one training seed.

    ``keep``: a list the trained :class:`AlignedModel` s are appended to (to save them).
    """
    pairs_config = PairsConfig(**dict(setting.pairs))
    etas = setting.etas or (None,) * len(setting.objectives)
    w = setting.weights
    oracle_eta = None if setting.etas is None else fused_eta(setting.etas, w)
    bundles = {e: sampler_bundle(bundle, setting.steps, e) for e in {*etas, oracle_eta}}
    pairs = {e: collect_digit_pairs(b, pairs_config, seed) for e, b in bundles.items()}
    experts = tuple(
        _train(bundles[e], setting, {r: 1.0}, pairs[e], seed, keep)
        for r, e in zip(setting.objectives, etas, strict=True)
    )
    oracle = _train(
        bundles[oracle_eta],
        setting,
        dict(zip(setting.objectives, w, strict=True)),
        pairs[oracle_eta],
        seed,
        keep,
    )
    offsets = _offsets((*experts, oracle), pairs[oracle_eta])
    return {"experts": experts, "oracle": oracle, "bundle": bundles[oracle_eta], "offsets": offsets}


def contexts(bundle: DigitsBundle, setting: Setting, models: dict) -> dict[str, MethodContext]:
    """The method contexts: one for msdda (experts as trained), one where db and rs sample."""
    fused = models["bundle"]  # the sampler of the target and the oracle
    base = MethodContext(
        schedule=fused.schedule,
        reference=fused.reference,
        experts=models["experts"],
        sample_shape=(1, 8, 8),
        rewards=tuple(bundle.rewards[r] for r in setting.objectives),
        decode=decode,
        oracles={setting.weights: models["oracle"]},
        kl_coef=setting.beta,
    )
    mixing = base
    if setting.etas is not None:  # db and rs sample at the fused eta
        spec = StepSpec("epsilon", "fixed_small", fused.reference.spec.eta)
        mixing = replace(base, experts=tuple(replace(e, spec=spec) for e in base.experts))
    return {"msdda": base, "db": mixing, "rs": mixing}


@torch.no_grad()
def evaluate(bundle, ctx, setting, method, num, eval_seed, batch, settings) -> dict:
    """Per-sample weighted reward and path KL of ``num`` samples (prompts i % 10)."""
    rs, kls, seconds = [], [], 0.0
    w = setting.weights
    for s in range(0, num, batch):
        idx = torch.arange(s, min(s + batch, num))
        prompts = idx % 10
        run = run_method(
            method,
            ctx,
            None if method == "base" else w,
            prompts,
            [eval_seed + int(i) for i in idx],
            settings=settings,
            measure_kl=method != "base",
        )
        images = decode(run.samples)
        r = sum(
            wi * bundle.rewards[n](images, prompts).double()
            for wi, n in zip(w, setting.objectives, strict=True)
        )
        rs.append(r)
        kls.append(torch.zeros(len(idx), dtype=torch.float64) if run.kl is None else run.kl)
        seconds += run.seconds
    return {"R": torch.cat(rs), "kl": torch.cat(kls), "seconds": seconds}


def _se(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def run_setting(bundle, setting: Setting, seeds, args, log) -> dict:
    """Train and evaluate one setting over ``seeds``; per-seed rows and the seed mean."""
    settings = MethodSettings(target_candidates=args.target_candidates)
    ev = dict(num=args.samples, eval_seed=args.eval_seed, batch=args.batch, settings=settings)
    per_seed = []
    for seed in seeds:
        start = time.perf_counter()
        models = train_setting(bundle, setting, seed)
        train_s = time.perf_counter() - start
        ctxs = contexts(bundle, setting, models)
        got = {}
        for m in METHODS:
            ctx = ctxs.get(m, ctxs["msdda"])
            n = args.target_samples if m == "target" else args.samples
            got[m] = evaluate(bundle, ctx, setting, m, **{**ev, "num": n})
        eval_s = time.perf_counter() - start - train_s
        per_seed.append(summarise(got, setting.beta, train_s, eval_s))
        per_seed[-1]["log_variance_offsets"] = models["offsets"]
        log(f"  {setting.name} seed {seed}: " + _line(per_seed[-1]))
    return {
        "setting": setting.name,
        "seeds": list(seeds),
        "per_seed": per_seed,
        **combine(per_seed),
    }


def summarise(got: dict, beta: float, train_s: float, eval_s: float) -> dict:
    """Means, gaps, gain ratios, KL and paired differences of one training seed.

    J = R_w - beta * path KL per sample: the KL-regularised objective every model solves.
    """
    base, target = float(got["base"]["R"].mean()), float(got["target"]["R"].mean())
    oracle = float(got["oracle"]["R"].mean())
    out = {"methods": {}, "train_s": train_s, "eval_s": eval_s}
    for m, r in got.items():
        mean, j = float(r["R"].mean()), r["R"] - beta * r["kl"]
        out["methods"][m] = {
            "R": mean,
            "R_se": _se(r["R"]),
            "gap_to_target": mean - target,
            "gap_to_oracle": mean - oracle,
            "gain_ratio_to_target": (mean - base) / (target - base) if target != base else None,
            "kl": float(r["kl"].mean()),
            "J": float(j.mean()),
        }
    for other in ("db", "rs"):
        a, b = got["msdda"], got[other]
        d = a["R"] - b["R"]
        dj = d - beta * (a["kl"] - b["kl"])
        out[f"msdda_minus_{other}"] = {"mean": float(d.mean()), "se": _se(d)}
        out[f"msdda_minus_{other}_J"] = {"mean": float(dj.mean()), "se": _se(dj)}
    return out


def combine(per_seed: list[dict]) -> dict:
    """Seed means of every number; paired differences with their se combined over seeds."""
    k = len(per_seed)
    methods = {}
    for m in per_seed[0]["methods"]:
        rows = [p["methods"][m] for p in per_seed]
        methods[m] = {
            key: (None if any(r[key] is None for r in rows) else sum(r[key] for r in rows) / k)
            for key in rows[0]
        }
        methods[m]["R_se"] = math.sqrt(sum(r["R_se"] ** 2 for r in rows)) / k
    out = {"methods": methods}
    for key in ("db", "rs", "db_J", "rs_J"):
        ds = [p[f"msdda_minus_{key}"] for p in per_seed]
        mean = sum(d["mean"] for d in ds) / k
        se = math.sqrt(sum(d["se"] ** 2 for d in ds)) / k
        out[f"msdda_minus_{key}"] = {"mean": mean, "se": se, "z": mean / se if se else None}
    return out


def _line(r: dict) -> str:
    m = r["methods"]
    parts = [f"{k} {v['R']:+.3f}" for k, v in m.items()]
    d = r["msdda_minus_db"], r["msdda_minus_rs"]
    return (
        ", ".join(parts)
        + f"; msdda-db {d[0]['mean']:+.4f}±{d[0]['se']:.4f}, msdda-rs {d[1]['mean']:+.4f}±{d[1]['se']:.4f}"
    )


def table(results: list[dict]) -> str:
    """The comparison as a markdown table (seed means)."""
    head = (
        "| setting | method | R_w | gap to target | gap to oracle | gain / target's | path KL "
        "| R_w - beta KL |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for res in results:
        for m, v in res["methods"].items():
            ratio = "-" if v["gain_ratio_to_target"] is None else f"{v['gain_ratio_to_target']:.3f}"
            kl = f"<= {v['kl']:.2f}" if m == "target" else f"{v['kl']:.2f}"
            lines.append(
                f"| {res['setting']} | {m} | {v['R']:+.3f} ± {v['R_se']:.3f} | "
                f"{v['gap_to_target']:+.3f} | {v['gap_to_oracle']:+.3f} | {ratio} | {kl} | "
                f"{v['J']:+.3f} |"
            )
    lines += [
        "",
        "| setting | MSDDA - db (R_w) | z | MSDDA - rs (R_w) | z | MSDDA - db (R_w - beta KL) "
        "| z | MSDDA - rs (R_w - beta KL) | z |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        cells = []
        for key in ("db", "rs", "db_J", "rs_J"):
            d = res[f"msdda_minus_{key}"]
            cells.append(f"{d['mean']:+.4f} ± {d['se']:.4f} | {d['z'] or 0:+.1f}")
        lines.append(f"| {res['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def convergence(bundle, ms, num, eval_seed, batch, log) -> list[dict]:
    """The target's weighted reward at w = (0.5, 0.5), beta = 1 over M candidates."""
    ctx = MethodContext(
        schedule=bundle.schedule,
        reference=bundle.reference,
        experts=(bundle.reference, bundle.reference),
        sample_shape=(1, 8, 8),
        rewards=(bundle.rewards["legibility"], bundle.rewards["boldness"]),
        decode=decode,
    )
    setting = Setting("convergence")
    out = []
    for m in ms:
        r = evaluate(
            bundle,
            ctx,
            setting,
            "target",
            num,
            eval_seed,
            batch,
            MethodSettings(target_candidates=m),
        )
        out.append(
            {"M": m, "R": float(r["R"].mean()), "R_se": _se(r["R"]), "seconds": r["seconds"]}
        )
        log(
            f"  target M={m}: R_w {out[-1]['R']:+.4f} ± {out[-1]['R_se']:.4f} ({r['seconds']:.0f} s)"
        )
    return out


#: What the gap study varies, from the shipped training (AlignConfig / PairsConfig overrides).
GAP_VARIANTS: dict[str, tuple[dict, dict]] = {
    "shipped": ({}, {}),
    "steps x4": ({"num_steps": 1200}, {}),
    "skip_last 0": ({}, {"skip_last": 0}),
    "pairs x4, steps x4": ({"num_steps": 1200}, {"pairs_per_state": 4}),
    "rank 32": ({"lora": LoraSettings(rank=32, alpha=32.0)}, {}),
    "lr x2.5": ({"lr": 5e-3}, {}),
    "full, lr 3e-4": ({"adapter": "full", "lr": 3e-4}, {}),
    "rank 32, steps x4": ({"num_steps": 1200, "lora": LoraSettings(rank=32, alpha=32.0)}, {}),
    "all: pairs x4, steps x4, rank 32, skip 0": (
        {"num_steps": 1200, "lora": LoraSettings(rank=32, alpha=32.0)},
        {"pairs_per_state": 4, "skip_last": 0},
    ),
}


@torch.no_grad()
def gap_study(bundle, variants, args, log) -> list[dict]:
    """Oracles of w = (0.5, 0.5), beta = 1, trained several ways: their gain / the target's."""
    setting = Setting("gap")
    weights = dict(zip(setting.objectives, setting.weights, strict=True))
    ctx = contexts(
        bundle,
        setting,
        {"experts": (bundle.reference,) * 2, "oracle": bundle.reference, "bundle": bundle},
    )["msdda"]
    settings = MethodSettings(target_candidates=args.target_candidates)
    ev = dict(num=args.samples, eval_seed=args.eval_seed, batch=args.batch, settings=settings)
    base = evaluate(bundle, ctx, setting, "base", **ev)["R"]
    target = evaluate(bundle, ctx, setting, "target", **ev)["R"]
    gain_t = float((target - base).mean())
    log(f"  target M={args.target_candidates}: gain {gain_t:+.4f} ± {_se(target - base):.4f}")
    out, pairs = [], {}
    for name in variants:
        train, pair_over = GAP_VARIANTS[name]
        for seed in args.seeds:
            key = (tuple(sorted(pair_over.items())), seed)
            if key not in pairs:
                pairs[key] = collect_digit_pairs(bundle, PairsConfig(**pair_over), seed)
            start = time.perf_counter()
            config = AlignConfig(eval_samples=0, **train)
            with torch.enable_grad():
                m = train_aligned(
                    bundle, weights, "fixed", pairs=pairs[key], config=config, seed=seed
                )
            seconds = time.perf_counter() - start
            oracle = replace(ctx, oracles={setting.weights: m.expert})
            r = evaluate(bundle, oracle, setting, "oracle", **ev)["R"]
            gain = float((r - base).mean())
            out.append(
                {
                    "variant": name,
                    "seed": seed,
                    "gain": gain,
                    "gain_se": _se(r - base),
                    "ratio": gain / gain_t,
                    "train_s": seconds,
                    "target_gain": gain_t,
                }
            )
            log(
                f"  {name} seed {seed}: gain {gain:+.4f} ± {out[-1]['gain_se']:.4f}, "
                f"ratio {gain / gain_t:.3f}, trained in {seconds:.0f} s"
            )
    return out


def plot(report: dict, path: Path) -> None:
    """R_w against path KL for every method of each setting (seed means; target: KL bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.get("results", [])
    fig, axes = plt.subplots(1, max(1, len(results)), figsize=(4.2 * max(1, len(results)), 3.6))
    axes = [axes] if len(results) <= 1 else list(axes)
    marks = {"base": "k.", "msdda": "r*", "db": "bs", "rs": "g^", "target": "mD", "oracle": "co"}
    for ax, res in zip(axes, results, strict=False):
        for m, v in res["methods"].items():
            ax.errorbar(v["kl"], v["R"], yerr=v["R_se"], fmt=marks.get(m, "x"), label=m, ms=7)
        ax.set_title(res["setting"])
        ax.set_xlabel("path KL to base (nats; target: upper bound)")
        ax.set_ylabel("weighted reward R_w")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_preset(bundle: DigitsBundle, setting: Setting, folder: Path, seed: int = 0) -> None:
    """Train the setting's experts and oracle (seed 0) and write them as a demo preset.

    The adapters go to ``folder`` with ``preset.json`` (what :func:`msdda.digits.demo.load_preset`
    reads); only LoRA settings on the shipped sampler can be a preset.
    """
    if setting.adapter != "lora" or setting.etas is not None or setting.steps != 50:
        raise ValueError(f"setting {setting.name} cannot be a preset: LoRA, 50 DDPM steps only")
    kept: list = []
    train_setting(bundle, setting, seed, keep=kept)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for m in kept:
        name = "-".join(f"{n}{w:g}" for n, w in m.weights.items()) + f"-{m.kind}.safetensors"
        save_adapter(folder / name, m)
        files.append({"file": name, "weights": m.weights, "kind": m.kind, "kl_coef": m.kl_coef})
    meta = {"setting": setting.name, "seed": seed, "beta": setting.beta, "models": files}
    (folder / "preset.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["beta1-lora"], help="see --list")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--samples", type=int, default=2000, help="samples per method and point")
    p.add_argument("--target-samples", type=int, default=None, help="default: --samples")
    p.add_argument("--target-candidates", type=int, default=32, help="M of the target")
    p.add_argument("--convergence", action="store_true", help="the target's curve over M")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--gap", nargs="*", default=None, help="gap study variants (none: all)")
    p.add_argument("--eval-seed", type=int, default=2_000_000, help="first per-sample seed")
    p.add_argument("--batch", type=int, default=1000, help="samples per chain batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("msdda-out/exactness.json"))
    p.add_argument("--plot", type=Path, default=None, help="also draw R_w vs KL (a .png)")
    p.add_argument("--replot", type=Path, default=None, help="only redraw --plot from this JSON")
    p.add_argument("--save-preset", type=Path, default=None, help="train --settings[0] and save")
    args = p.parse_args(argv)
    if args.list:
        for s in SETTINGS.values():
            print(f"{s.name}: {s}")
        return 0
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0
    args.target_samples = args.target_samples or args.samples
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    bundle = load_digits_bundle()
    if args.save_preset is not None:
        save_preset(bundle, SETTINGS[args.settings[0]], args.save_preset)
        log(f"preset {args.settings[0]}: {args.save_preset}")
        return 0
    report: dict = {"config": {k: str(v) for k, v in vars(args).items()}}
    if args.convergence:
        report["convergence"] = convergence(
            bundle, args.ms, args.samples, args.eval_seed, args.batch, log
        )
    if args.gap is not None:
        report["gap"] = gap_study(bundle, args.gap or list(GAP_VARIANTS), args, log)
    results = []
    for name in args.settings if not (args.convergence or args.gap is not None) else []:
        results.append(run_setting(bundle, SETTINGS[name], args.seeds, args, log))
        print(table(results[-1:]), flush=True)
    report["results"] = results
    if results:
        print("\n" + table(results))
    report["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".tmp").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".tmp").replace(args.out)
    if args.plot is not None and results:
        plot(report, args.plot)
    log(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
