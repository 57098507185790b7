"""A sweep described by a TOML file: ``msdda sweep RESULTS --config FILE.toml``.

The whole file is checked before any model loads: unknown keys, types, ranges, missing
files, with errors that name the key (``[experts.aesthetic].path: ...``). Paths are
relative to the config file's folder. The result is a :class:`SweepConfig` whose
``domain_options`` are plain data, so the domain can be rebuilt from the config alone.

Top-level keys (every one optional but the domain's own)::

    domain = "sd"                 # digits (default), toy or sd
    methods = ["base", "msdda"]   # default: every method
    weights = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]  # or: grid = 11 (points (w, 1 - w))
    oracle_weights = true         # also sample at the oracles' weights
    prompts = "prompts.txt"       # sd: a .txt/.jsonl file or a list; digits: a list of ints
    seeds = [0, 1]
    images_per_prompt = 1         # default 1 for sd (one row per image), 64 otherwise
    [settings]                    # untuned method settings (msdda.methods.MethodSettings)
    [tuning]                      # msdda.evaluation.TuningConfig fields; tuning = false: none
    [digits]                      # weights_dir, expert_kind, objectives
    [toy]                         # seed
    [sd]                          # base, family, steps, guidance, eta, height, width, dtype,
                                  # device, lora_mode, kl_coef, guidance_rescale, cache_dir,
                                  # [sd.decode]; flow models: noise_level, step_rule (no eta)
    [experts.NAME]                # sd: path, reward (a [rewards] name), kl_coef, eta, guidance
                                  # (flow models: noise_level, step_rule in place of eta)
    [rewards.NAME]                # sd: model (msdda.sd.rewards.REWARDS), path
    [judges.NAME]                 # sd: held-out rewards no method reads: model, path
    [[oracles]]                   # sd: weights, path (a model trained on the weighted reward)

The sd domain runs every family msdda has a pipeline for: SD 1.x/2.x, SDXL, SD3 and FLUX.
``[sd].family`` is read from the base folder's ``model_index.json`` (or given, for a config
checked without its files); its defaults are :data:`msdda.sd.families.SWEEP_DEFAULTS`. A
flow model (sd3, flux) samples with a stochastic flow sampler: ``noise_level`` (default
0.7) and ``step_rule`` (``sde``, ``cps``, ``dance``), in ``[sd]`` and per expert (experts
trained with other samplers have other step variances); ``eta`` is DDIM's and is refused
there, as ``noise_level`` is for SD.

``examples/`` holds a documented config per use: ``tiny-sd.toml`` (smoke runs),
``tiny-flow.toml`` (the same on tiny SD3 and FLUX models), ``digits.toml`` (today's
default digits sweep), ``sd15-paper.toml`` (the paper's) and ``sd35-flow-grpo.toml``
(Flow-GRPO's three SD3.5-Medium LoRAs as a K = 3 blend).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputFileError, reading
from ..methods import METHODS, MethodSettings
from ..validation import check_int, check_number, check_seed
from .domains import DOMAINS
from .sweep import MAX_GRID, MAX_IMAGES, SweepConfig, simplex_grid
from .tuning import TuningConfig

__all__ = ["ConfigError", "load_config", "config_from_dict", "SD_TABLES"]

#: The top-level tables only the sd domain reads.
SD_TABLES = ("experts", "rewards", "judges", "oracles")
_TOP = {
    "domain", "methods", "weights", "grid", "oracle_weights", "prompts", "seeds",
    "images_per_prompt", "settings", "tuning", *DOMAINS, *SD_TABLES,
}  # fmt: skip
_TUNING = {f.name for f in dataclasses.fields(TuningConfig)}
_SETTINGS = {f.name for f in dataclasses.fields(MethodSettings)}
_SD = {
    "base", "family", "steps", "guidance", "eta", "noise_level", "step_rule", "height", "width",
    "dtype", "device", "lora_mode", "kl_coef", "guidance_rescale", "cache_dir", "decode",
}  # fmt: skip
_DECODE = {"dtype", "slicing", "tiling", "checkpointing", "scale"}
_EXPERT = {"path", "reward", "kl_coef", "eta", "noise_level", "step_rule", "guidance"}
#: The keys of a sampler's noise: DDIM's (sd, sdxl) and a flow sampler's (sd3, flux).
_DDIM_NOISE, _FLOW_NOISE = ("eta",), ("noise_level", "step_rule")
_REWARD = {"model", "path"}
_ORACLE = {"weights", "path"}


class ConfigError(InputFileError):
    """A sweep config that cannot be used: ``ConfigError(path, "[key]: problem")``."""


# --- typed values, each error naming its key ---------------------------------------------------


def _keys(table: Any, where: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
    """``table`` as a dict with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )
    missing = [k for k in required if k not in table]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return table


def _str(value: Any, key: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _list(value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, got {type(value).__name__}")
    return value


def _strs(value: Any, key: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(_list(value, key)))


def _numbers(value: Any, key: str, **range_: Any) -> tuple[float, ...]:
    return tuple(check_number(v, f"{key}[{i}]", **range_) for i, v in enumerate(_list(value, key)))


def _local(value: Any, key: str, base_dir: Path) -> Path:
    """A path relative to the config's folder (``~`` expanded)."""
    path = Path(_str(value, key)).expanduser()
    return path if path.is_absolute() else base_dir / path


@dataclass(frozen=True)
class _Files:
    """How paths of the config are read: relative to ``base_dir``; ``check`` whether the
    files exist (False: the config's shape and values only, no file is looked at)."""

    base_dir: Path
    check: bool = True
    cache_dir: str | None = None


def _model_path(value: Any, key: str, files: _Files) -> str:
    """A local file or folder (made absolute), or a hub id found in the local HF cache."""
    from ..sd.loading import resolve_hub_id

    path = _local(value, key, files.base_dir)
    cache_dir = files.cache_dir
    parts = value.split("/")
    hub_id = len(parts) == 2 and all(parts) and not value.startswith((".", "~", "/"))
    if not files.check:
        return value if hub_id and not path.exists() else os.fspath(path.absolute())
    if path.exists():
        return os.fspath(path.resolve())
    if hub_id:  # org/name
        try:
            resolve_hub_id(value, cache_dir=cache_dir)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        return value
    raise ValueError(f"{key}: no such file or folder {os.fspath(path)!r} (nor a hub id)")


# --- the generic parts -------------------------------------------------------------------------


def _weights(data: dict) -> tuple[tuple[float, ...], ...]:
    if "weights" in data and "grid" in data:
        raise ValueError("give either weights or grid, not both")
    if "grid" in data:
        return simplex_grid(check_int(data["grid"], "grid", low=2, high=MAX_GRID))
    if "weights" not in data:
        return simplex_grid(11)
    rows = _list(data["weights"], "weights")
    return tuple(_numbers(w, f"weights[{i}]", low=0.0) for i, w in enumerate(rows))


def _settings(table: Any) -> MethodSettings:
    table = _keys(table, "[settings]", _SETTINGS)
    try:
        return MethodSettings(**table)
    except (TypeError, ValueError) as err:
        raise ValueError(f"[settings]: {err}") from None


def _tuning(value: Any) -> TuningConfig | None:
    if isinstance(value, bool):
        return TuningConfig() if value else None
    table = _keys(value, "[tuning]", _TUNING)
    if "code_grid" in table:
        grid = _list(table["code_grid"], "[tuning].code_grid")
        table = {**table, "code_grid": tuple(tuple(_list(p, "[tuning].code_grid")) for p in grid)}
    if "weights" in table:
        weights = _list(table["weights"], "[tuning].weights")
        table = {**table, "weights": tuple(tuple(_list(w, "[tuning].weights")) for w in weights)}
    for key in ("seeds", "rules", "rgg_scales"):
        if key in table:
            table = {**table, key: tuple(_list(table[key], f"[tuning].{key}"))}
    try:
        return TuningConfig(**table)
    except (TypeError, ValueError) as err:
        raise ValueError(f"[tuning]: {err}") from None


def _digits(table: Any, files: _Files) -> dict:
    """digits' options, every one filled as ``msdda sweep`` fills them."""
    table = _keys(table, "[digits]", {"weights_dir", "expert_kind", "objectives"})
    weights_dir = None
    if "weights_dir" in table:
        weights_dir = _local(table["weights_dir"], "[digits].weights_dir", files.base_dir)
        if files.check and not weights_dir.is_dir():
            raise ValueError(f"[digits].weights_dir: no such folder {os.fspath(weights_dir)!r}")
        weights_dir = os.fspath(weights_dir.absolute())
    return {
        "weights_dir": weights_dir,
        "expert_kind": _str(
            table.get("expert_kind", "fixed"), "[digits].expert_kind", ("fixed", "learned")
        ),
        "objectives": _strs(
            table.get("objectives", ["legibility", "boldness"]), "[digits].objectives"
        ),
    }


def _toy(table: Any, files: _Files) -> dict:
    table = _keys(table, "[toy]", {"seed"})
    return {"seed": check_seed(table["seed"], "[toy].seed")} if "seed" in table else {}


# --- Stable Diffusion ----------------------------------------------------------------------------


def _sd_scalars(table: dict, files: _Files) -> tuple[dict, _Files]:
    from ..lora import LORA_MODES
    from ..sd.sweep import DTYPES

    out: dict[str, Any] = {}
    if table.get("cache_dir") is not None:
        out["cache_dir"] = os.fspath(_local(table["cache_dir"], "[sd].cache_dir", files.base_dir))
        files = replace(files, cache_dir=out["cache_dir"])
    from ..sd.families import FLOW_FAMILIES, SWEEP_DEFAULTS

    out["base"] = _model_path(table["base"], "[sd].base", files)
    out["family"] = _family(table, out["base"], files)
    defaults = SWEEP_DEFAULTS[out["family"]]
    steps = table.get("steps", defaults["steps"])
    out["steps"] = check_int(steps, "[sd].steps", low=1, high=10_000)
    guidance = table.get("guidance", defaults["guidance"])
    out["guidance"] = check_number(guidance, "[sd].guidance", low=0.0)
    out.update(_noise(table, "[sd]", out["family"], defaults))
    if out["family"] in FLOW_FAMILIES and "guidance_rescale" in table:
        raise ValueError(f"[sd].guidance_rescale does not apply to a {out['family']} model")
    for side in ("height", "width"):
        if side in table:
            out[side] = check_int(table[side], f"[sd].{side}", low=8, high=16_384)
            if out[side] % 8:
                raise ValueError(f"[sd].{side} must be a multiple of 8, got {out[side]}")
    out["dtype"] = _str(table.get("dtype", "auto"), "[sd].dtype", ("auto", *DTYPES))
    out["device"] = _str(table.get("device", "auto"), "[sd].device")
    out["lora_mode"] = _str(table.get("lora_mode", "auto"), "[sd].lora_mode", LORA_MODES)
    if "kl_coef" in table:
        out["kl_coef"] = check_number(
            table["kl_coef"], "[sd].kl_coef", low=0.0, low_inclusive=False
        )
    out["guidance_rescale"] = check_number(
        table.get("guidance_rescale", 0.0), "[sd].guidance_rescale", low=0.0
    )
    if "decode" in table:
        out["decode"] = _decode(table["decode"])
    return out, files


def _family(table: dict, base: str, files: _Files) -> str:
    """``[sd].family``: read from the base folder's model_index.json when it has one (a
    given family must then agree), else the one given, else sd."""
    from ..sd.families import FAMILIES, detect_family, pipeline_folder

    given = _str(table["family"], "[sd].family", FAMILIES) if "family" in table else None
    if not files.check and not Path(base).is_dir():
        return given or "sd"
    folder = pipeline_folder(base, cache_dir=files.cache_dir)
    if not (folder / "model_index.json").is_file():
        return given or "sd"
    try:
        found = detect_family(folder)
    except ValueError as err:
        raise ValueError(f"[sd].base: {err}") from None
    if given is not None and given != found:
        raise ValueError(f"[sd].family is {given!r}, but the base is a {found} pipeline")
    return found


def _noise(
    table: dict, where: str, family: str, defaults: Mapping, inherited: Mapping | None = None
) -> dict:
    """The sampler's noise keys of ``table``: DDIM's ``eta`` (sd, sdxl) or a flow sampler's
    ``noise_level`` and ``step_rule`` (sd3, flux); a missing key takes ``defaults``' value
    (or is left out). A flow noise level is checked against its rule (``cps``: at most 1),
    the missing one ``inherited`` (an expert's from ``[sd]``)."""
    from ..flows import FLOW_RULES, FlowStepSpec
    from ..sd.families import FLOW_FAMILIES

    flow = family in FLOW_FAMILIES
    keys, other = (_FLOW_NOISE, _DDIM_NOISE) if flow else (_DDIM_NOISE, _FLOW_NOISE)
    for key in other:
        if key in table:
            raise ValueError(
                f"{where}.{key} does not apply to a {family} model: its sampler's noise is "
                f"set by {' and '.join(keys)}"
            )
    out = {k: table.get(k, defaults.get(k)) for k in keys if k in table or k in defaults}
    if "eta" in out:
        out["eta"] = check_number(out["eta"], f"{where}.eta", low=0.0)
    if "step_rule" in out:
        out["step_rule"] = _str(out["step_rule"], f"{where}.step_rule", FLOW_RULES)
    if "noise_level" in out:
        out["noise_level"] = check_number(out["noise_level"], f"{where}.noise_level", low=0.0)
    if flow and out:
        step = {**(inherited or {}), **out}
        try:
            FlowStepSpec(step["step_rule"], step["noise_level"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return out


def _decode(table: Any) -> dict:
    from ..sd.sweep import DTYPES

    table = _keys(table, "[sd.decode]", _DECODE)
    out: dict[str, Any] = {}
    for key in ("slicing", "tiling", "checkpointing"):
        if key in table:
            out[key] = _bool(table[key], f"[sd.decode].{key}")
    if "dtype" in table:
        out["dtype"] = _str(table["dtype"], "[sd.decode].dtype", tuple(DTYPES))
    if "scale" in table:
        out["scale"] = check_number(table["scale"], "[sd.decode].scale", low=0.0, high=1.0,
                                    low_inclusive=False)  # fmt: skip
    return out


def _reward_tables(data: dict, name: str, files: _Files) -> dict[str, dict]:
    from ..sd.rewards import REWARDS

    out = {}
    for col, table in _keys(data.get(name, {}), f"[{name}]", set(data.get(name, {}))).items():
        where = f"[{name}.{col}]"
        table = _keys(table, where, _REWARD, ("model",))
        entry = {"model": _str(table["model"], f"{where}.model", tuple(REWARDS))}
        if "path" in table:
            entry["path"] = _model_path(table["path"], f"{where}.path", files)
        out[col] = entry
    return out


def _experts(data: dict, files: _Files, rewards: dict, sd: Mapping) -> list[dict]:
    from ..sd.loading import resolve_expert_source
    from ..sd.registry import REFERENCE

    experts = _keys(data.get("experts", {}), "[experts]", set(data.get("experts", {})))
    if not experts:
        raise ValueError("[experts]: the sd domain needs at least one expert ([experts.NAME])")
    out = []
    for name, table in experts.items():
        where = f"[experts.{name}]"
        if name == REFERENCE or name.startswith("oracle-"):
            raise ValueError(f"{where}: the names {REFERENCE!r} and 'oracle-N' are reserved")
        table = _keys(table, where, _EXPERT, ("path", "reward"))
        path = _model_path(table["path"], f"{where}.path", files)
        try:
            if files.check:
                resolve_expert_source(name, path, cache_dir=files.cache_dir)
        except ValueError as err:
            raise ValueError(f"{where}.path: {err}") from None
        entry = {"name": name, "path": path, "reward": _str(table["reward"], f"{where}.reward")}
        if entry["reward"] not in rewards:
            raise ValueError(
                f"{where}.reward: {entry['reward']!r} is not a [rewards] table; "
                f"known: {', '.join(rewards) or 'none'}"
            )
        if "kl_coef" in table:
            entry["kl_coef"] = check_number(
                table["kl_coef"], f"{where}.kl_coef", low=0.0, low_inclusive=False
            )
        entry.update(_noise(table, where, sd["family"], {}, sd))
        if "guidance" in table:
            entry["guidance"] = check_number(table["guidance"], f"{where}.guidance", low=0.0)
        out.append(entry)
    return out


def _oracles(data: dict, files: _Files, k: int) -> list[dict]:
    out = []
    for i, table in enumerate(_list(data.get("oracles", []), "[[oracles]]")):
        where = f"[[oracles]] #{i + 1}"
        table = _keys(table, where, _ORACLE, ("weights", "path"))
        weights = _numbers(table["weights"], f"{where}.weights", low=0.0)
        if len(weights) != k or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"{where}.weights must be {k} weights on the simplex, got {weights}")
        path = _model_path(table["path"], f"{where}.path", files)
        out.append({"weights": list(weights), "path": path})
    return out


def _sd(data: dict, files: _Files) -> dict:
    """The sd domain's options from [sd], [experts.*], [rewards.*], [judges.*], [[oracles]]."""
    table = _keys(data.get("sd"), "[sd]", _SD, ("base",)) if "sd" in data else None
    if table is None:
        raise ValueError("[sd]: the sd domain needs an [sd] table with base = ...")
    out, files = _sd_scalars(table, files)
    rewards = _reward_tables(data, "rewards", files)
    judges = _reward_tables(data, "judges", files)
    both = sorted(set(rewards) & set(judges))
    if both:
        raise ValueError(f"[judges]: {both} are also [rewards]: a column has one name")
    experts = _experts(data, files, rewards, out)
    used = [e["reward"] for e in experts]
    twice = sorted({r for r in used if used.count(r) > 1})
    if twice:
        raise ValueError(f"[experts]: the reward(s) {twice} are the objective of several experts")
    unused = [r for r in rewards if r not in used]
    if unused:
        raise ValueError(
            f"[rewards]: {unused} score no expert's objective; held-out rewards go in [judges]"
        )
    oracles = _oracles(data, files, len(experts))
    return {**out, "experts": experts, "rewards": rewards, "judges": judges, "oracles": oracles}


def _check_fusable(options: Mapping[str, Any]) -> None:
    """msdda fuses step variances: no expert may sample deterministically (eta or a flow
    noise level of 0, the expert's own or the one of ``[sd]`` it inherits)."""
    key = "noise_level" if "noise_level" in options else "eta"
    zero = [f"[experts.{e['name']}].{key}" for e in options["experts"] if e.get(key) == 0]
    if options[key] == 0 and any(key not in e for e in options["experts"]):
        zero.insert(0, f"[sd].{key}")
    if zero:
        raise ValueError(
            f"{', '.join(zero)} = 0 is a deterministic step (variance 0), which method msdda "
            f"cannot fuse; use {key} > 0 or leave msdda out of methods"
        )


_DOMAIN_OPTIONS: dict[str, Callable[[Any, _Files], dict]] = {"digits": _digits, "toy": _toy}


def _prompts(data: dict, domain: str, base_dir: Path) -> tuple | None:
    if "prompts" not in data:
        return None
    value = data["prompts"]
    if domain == "sd":
        from ..sd.sweep import check_prompt, read_prompts

        if isinstance(value, str):
            try:
                return read_prompts(_local(value, "prompts", base_dir))
            except InputFileError as err:
                raise ValueError(f"prompts: {err}") from None
        items = _list(value, "prompts")
        return tuple(check_prompt(p) for p in items)
    return tuple(check_int(p, f"prompts[{i}]") for i, p in enumerate(_list(value, "prompts")))


def _domain_options(data: dict, domain: str, files: _Files) -> dict:
    stray = [t for t in (*DOMAINS, *SD_TABLES) if t in data and t != domain]
    stray = [t for t in stray if not (domain == "sd" and t in SD_TABLES)]
    if stray:
        raise ValueError(f"[{stray[0]}] does not apply to domain {domain!r}")
    if domain == "sd":
        return _sd(data, files)
    return _DOMAIN_OPTIONS[domain](data.get(domain, {}), files)


def config_from_dict(
    data: Mapping[str, Any], *, base_dir: str | os.PathLike = ".", check_files: bool = True
) -> SweepConfig:
    """The :class:`SweepConfig` of a parsed TOML document (paths relative to ``base_dir``);
    ValueError naming the key at fault. ``check_files=False`` checks everything but whether
    the files it names exist (a config written for another machine)."""
    data = _keys(dict(data), "the config", _TOP)
    files = _Files(Path(base_dir), check_files)
    base_dir = files.base_dir
    domain = _str(data.get("domain", "digits"), "domain", tuple(DOMAINS))
    options = _domain_options(data, domain, files)
    weights = _weights(data)
    k = len(options["experts"]) if domain == "sd" else len(weights[0]) if weights else 0
    for i, w in enumerate(weights):
        if len(w) != k:
            raise ValueError(f"weights[{i}] has {len(w)} entries for {k} experts")
    seeds = _list(data.get("seeds", [0, 1]), "seeds")
    images = data.get("images_per_prompt", 1 if domain == "sd" else 64)
    methods = _strs(data.get("methods", list(METHODS)), "methods")
    if domain == "sd" and "msdda" in methods:
        _check_fusable(options)
    return SweepConfig(
        domain=domain,
        domain_options=tuple(options.items()),
        methods=methods,
        weights=weights,
        oracle_weights=_bool(data.get("oracle_weights", True), "oracle_weights"),
        prompts=_prompts(data, domain, base_dir),
        seeds=tuple(check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)),
        images_per_prompt=check_int(images, "images_per_prompt", low=1, high=MAX_IMAGES),
        settings=_settings(data.get("settings", {})),
        tuning=_tuning(data.get("tuning", {})),
    )


def load_config(path: str | os.PathLike, *, check_files: bool = True) -> SweepConfig:
    """Read and check the TOML sweep config ``path`` (nothing is loaded or sampled);
    ``check_files=False``: all but the existence of the model files it names.

    Raises:
        ConfigError: naming the file and the key at fault (or the TOML syntax error).
    """
    path = Path(path)
    if path.suffix != ".toml":
        raise ConfigError(path, "a sweep config is a .toml file")
    with reading(path, "sweep config"):
        raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(path, f"not valid TOML: {err}") from None
    try:
        return config_from_dict(data, base_dir=path.parent, check_files=check_files)
    except (TypeError, ValueError) as err:
        raise ConfigError(path, str(err)) from None
