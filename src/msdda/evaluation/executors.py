"""Who runs a sweep's units: this process, in plan order (``local``), or a Ray cluster.

The driver (:func:`msdda.evaluation.run_sweep`) is the only writer of the results file:
an executor takes the units still to run and yields each unit's rows (and its pictures,
as PNG bytes) when the unit has finished; the driver then writes the pictures and appends
the rows, with the same fsync and resume rules whatever ran them. A unit's rows depend
only on the unit (its seeds fix x_T and every step's noise), never on where it ran.

:class:`RayExecutor` keeps one actor per GPU (``num_gpus=1``), or per ``cpus_per_worker``
CPUs where there are no GPUs; each actor builds the domain (models, experts, rewards) once
from the sweep's config and then runs units one at a time. A unit whose actor dies (a
killed process, a lost node) is run again on a fresh actor; a unit that fails inside msdda
(bad input, missing weights) stops the sweep with that error. See ``docs/distributed.md``.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MsddaError, writing
from ..io import atomic_write_bytes
from ..methods import MethodSettings
from ..validation import check_int
from .domains import SweepDomain, load_domain
from .results import ResultRow
from .units import ImageSink, SweepUnit, run_unit

__all__ = [
    "EXECUTORS",
    "UnitWork",
    "UnitResult",
    "LocalExecutor",
    "RayExecutor",
    "loopback_ray_environment",
    "make_executor",
    "write_pictures",
]

EXECUTORS = ("local", "ray")

#: Environment for a Ray cluster started here: every process on and to 127.0.0.1 only
#: (Ray otherwise advertises the machine's other address and binds every interface), no
#: usage statistics. Set before the first ``ray.init``.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class BufferedImages(ImageSink):
    """An :class:`ImageSink` that keeps the PNG bytes instead of writing them (a worker's)."""

    def __init__(self, sink: ImageSink) -> None:
        super().__init__(sink.folder, sink.root, sink.prompts)
        object.__setattr__(self, "files", {})

    def save(self, picture, unit: SweepUnit, prompt: Any, index: int) -> str:
        rel = self.relative(unit, prompt, index)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        self.files[rel] = buf.getvalue()
        return rel


@dataclass(frozen=True)
class UnitResult:
    """A finished unit: its rows and its pictures (relative path -> PNG bytes)."""

    unit: SweepUnit
    rows: list[ResultRow]
    pictures: Mapping[str, bytes]


@dataclass(frozen=True)
class UnitWork:
    """Everything a worker needs to build the domain and run units (picklable)."""

    domain_name: str
    domain_options: tuple[tuple[str, Any], ...]
    prompts: tuple[Any, ...]
    images_per_prompt: int
    settings: Mapping[str, MethodSettings]  # per sweep method
    sink: ImageSink | None = None  # where pictures go (None: the domain has none)
    threads: int = 0  # torch threads of a worker (0: leave torch's default)

    def build(self) -> SweepDomain:
        return load_domain(self.domain_name, **dict(self.domain_options))

    def run(self, domain: SweepDomain, unit: SweepUnit) -> UnitResult:
        sink = None if self.sink is None else BufferedImages(self.sink)
        rows = run_unit(
            unit, domain, self.prompts, self.images_per_prompt, self.settings[unit.method],
            companion=True, images=sink,
        )  # fmt: skip
        return UnitResult(unit, rows, {} if sink is None else dict(sink.files))


class LocalExecutor:
    """Run the units here, one after the other, on the driver's domain."""

    name = "local"

    def run(
        self, work: UnitWork, units: Sequence[SweepUnit], domain: SweepDomain | None = None
    ) -> Iterator[UnitResult]:
        domain = domain or work.build()
        for unit in units:
            yield work.run(domain, unit)


def loopback_ray_environment() -> None:
    """Set :data:`RAY_LOOPBACK_ENV` (kept where the user set a variable already)."""
    for k, v in RAY_LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


def _import_ray(local: bool = False):
    """``ray``; with ``local`` (a cluster started here) after :func:`loopback_ray_environment`,
    since Ray reads those variables when it is imported."""
    if local:
        loopback_ray_environment()
    try:
        import ray
    except ImportError:
        raise MsddaError(
            "--executor ray needs Ray: install the extra with `pip install 'msdda[ray]'`"
        ) from None
    return ray


class _Worker:
    """A Ray actor's body: the domain built once, then units one at a time."""

    def __init__(self, work: UnitWork) -> None:
        self.work = work
        self.error: BaseException | None = None
        try:
            if work.threads:
                import torch

                torch.set_num_threads(work.threads)
            self.domain = work.build()
        except Exception as err:  # reported by ready(), as the task's own error
            self.error = err

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()

    def run(self, unit: SweepUnit) -> UnitResult:
        return self.work.run(self.domain, unit)


class RayExecutor:
    """Run the units on a Ray cluster: ``address`` (None: start a local one, loopback only).

    ``workers``: actors to start (None: one per GPU, else one per ``cpus_per_worker``
    CPUs of the cluster); ``max_restarts``: how many dead actors are replaced before the
    sweep gives up (None: 3 per worker).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int | None = None,
        cpus_per_worker: int = 1,
        max_restarts: int | None = None,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise TypeError(f"address must be a Ray address string or None, got {address!r}")
        self.address = address
        self.workers = None if workers is None else check_int(workers, "workers", low=1)
        self.cpus_per_worker = check_int(cpus_per_worker, "cpus_per_worker", low=1, high=4096)
        self.max_restarts = (
            None if max_restarts is None else check_int(max_restarts, "max_restarts", low=0)
        )
        self.init_options = dict(init_options or {})
        self.pids: list[int] = []  # the worker processes' ids, once started

    def _start(self, ray) -> bool:
        """Connect to the cluster (starting a local one); True when this call started it."""
        if ray.is_initialized():
            return False
        loopback_ray_environment()
        options = {"include_dashboard": False, "log_to_driver": False, **self.init_options}
        if self.address is None:
            ray.init(**options)
        else:
            options.pop("num_cpus", None), options.pop("num_gpus", None)
            ray.init(address=self.address, **options)
        return True

    def _placement(self, ray) -> tuple[int, dict[str, float]]:
        """(actors, resources per actor): one GPU each where the cluster has GPUs."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            count, each = self.workers or gpus, {"num_gpus": 1, "num_cpus": 1}
            if count > gpus:  # the extra actors would wait for a GPU for ever
                raise MsddaError(f"--ray-workers {count}: the cluster has {gpus} GPU(s), one each")
            return count, each
        per = self.cpus_per_worker
        count = self.workers or max(1, cpus // per)
        if count * per > cpus:
            raise MsddaError(
                f"{count} Ray worker(s) of {per} CPU(s) need {count * per} CPUs; the cluster "
                f"has {cpus} (lower --ray-workers or --ray-cpus)"
            )
        return count, {"num_cpus": per}

    def run(
        self, work: UnitWork, units: Sequence[SweepUnit], domain: SweepDomain | None = None
    ) -> Iterator[UnitResult]:
        ray = _import_ray(local=self.address is None)
        started = self._start(ray)
        try:
            yield from self._run(ray, work, list(units))
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, work: UnitWork, units: list[SweepUnit]) -> Iterator[UnitResult]:
        if not units:
            return
        count, resources = self._placement(ray)
        count = min(count, len(units))
        if "num_cpus" in resources and not work.threads:
            work = UnitWork(**{**work.__dict__, "threads": int(resources["num_cpus"])})
        actor_cls = ray.remote(_Worker).options(**resources)
        pool = _Pool(ray, lambda: actor_cls.remote(work), count)
        self.pids = pool.pids
        restarts = 3 * count if self.max_restarts is None else self.max_restarts
        try:
            yield from pool.drain(deque(units), restarts)
        finally:
            pool.close()


class _Pool:
    """Actors with one unit each at a time; a dead actor's unit goes back to the queue."""

    def __init__(self, ray, make, count: int) -> None:
        self.ray, self.make = ray, make
        self.idle: list = []
        self.actors: list = []  # every actor started, for close()
        self.pids: list[int] = []
        for _ in range(count):
            self._add()

    def _add(self) -> None:
        actor = self.make()
        self.actors.append(actor)
        self.pids.append(_unwrap(self.ray, lambda: self.ray.get(actor.ready.remote())))
        self.idle.append(actor)

    def drain(self, queue: deque, restarts: int) -> Iterator[UnitResult]:
        ray, pending = self.ray, {}
        while queue or pending:
            while queue and self.idle:
                actor, unit = self.idle.pop(), queue.popleft()
                pending[actor.run.remote(unit)] = (unit, actor)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ref)
            try:
                result = _unwrap(ray, lambda ref=ref: ray.get(ref))
            except ray.exceptions.RayActorError:  # the process died: run the unit elsewhere
                if restarts <= 0:
                    raise MsddaError(
                        "Ray workers kept dying; the sweep stopped (rows written so far are "
                        "kept: run it again to resume)"
                    ) from None
                restarts -= 1
                queue.appendleft(unit)
                self.ray.kill(actor)  # (an unavailable one may still hold its GPU)
                self._add()
                continue
            self.idle.append(actor)
            yield result

    def close(self) -> None:
        for actor in self.actors:  # idle, busy (an interrupted sweep) or dead
            self.ray.kill(actor)


def _unwrap(ray, call):
    """``call()``, with an error raised inside msdda re-raised as itself (not Ray's wrapper)."""
    try:
        return call()
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (ValueError, TypeError, OSError)):
            raise cause from None
        raise


def make_executor(
    name: str = "local",
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
):
    """The executor ``name`` (one of :data:`EXECUTORS`)."""
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
    if name == "local":
        if address is not None or workers is not None:
            raise ValueError("address and workers apply to the ray executor only")
        return LocalExecutor()
    _import_ray(local=address is None)
    return RayExecutor(address, workers=workers, cpus_per_worker=cpus_per_worker)


def write_pictures(root: Path, pictures: Mapping[str, bytes]) -> None:
    """Write a unit's pictures under ``root`` atomically (the driver, before the rows)."""
    for rel, data in pictures.items():
        path = root / rel
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
