"""The sweep on a Ray cluster: the same rows as here, nothing lost when a worker dies, loopback only.

One local cluster for the module (2 CPUs and 2 logical GPUs, so that the GPU placement
code runs on a CPU machine), started on 127.0.0.1 only and shut down at the end.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from msdda.errors import InputFileError, MsddaError
from msdda.evaluation import SweepConfig, read_results, run_sweep, simplex_grid
from msdda.evaluation.executors import (
    RAY_LOOPBACK_ENV,
    LocalExecutor,
    RayExecutor,
    UnitWork,
    make_executor,
)
from msdda.evaluation.units import SweepUnit

for _k, _v in {**RAY_LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled"}.items():
    os.environ[_k] = _v  # before Ray is imported: it reads them then
ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")

pytestmark = pytest.mark.usefixtures("one_thread")

TIMINGS = ("seconds_per_image", "base_seconds_per_image", "peak_memory_bytes", "peak_memory_kind")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_digits(**changes) -> SweepConfig:
    base = {
        "domain": "digits",
        "methods": ("base", "msdda", "rs"),
        "weights": simplex_grid(3),
        "oracle_weights": False,
        "prompts": (3, 7),
        "seeds": (0,),
        "images_per_prompt": 2,
        "tuning": None,
    }
    return SweepConfig(**{**base, **changes})


def values(path: Path) -> dict:
    """Every row's fields but its timings: equal for equal seeds, wherever a unit ran."""
    rows = read_results(path).rows
    out = {}
    for r in rows:
        d = dataclasses.asdict(r)
        out[r.key] = {k: v for k, v in d.items() if k not in TIMINGS}
    assert len(out) == len(rows)
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "local.jsonl"
    run_sweep(small_digits(), path, executor=LocalExecutor())
    return values(path)


def test_the_ray_executor_writes_the_local_executors_rows_value_for_value(
    cluster, local_run, tmp_path
):
    path = tmp_path / "ray.jsonl"
    executor = RayExecutor(workers=2)
    summary = run_sweep(small_digits(), path, executor=executor)
    assert summary.units_run == summary.units == 1 + 3 * 2
    assert len(set(executor.pids)) == 2 and os.getpid() not in executor.pids
    assert values(path) == local_run


def test_a_killed_worker_loses_and_duplicates_nothing(cluster, local_run, tmp_path):
    path = tmp_path / "killed.jsonl"
    executor = RayExecutor(workers=2)
    killed = []

    def progress(what: str, done: int, total: int) -> None:
        if done >= 1 and not killed and executor.pids:  # kill one worker while units run
            killed.append(executor.pids[0])
            os.kill(executor.pids[0], signal.SIGKILL)

    run_sweep(small_digits(), path, executor=executor, progress=progress)
    assert killed and len(executor.pids) == 3  # the dead worker was replaced
    lines = path.read_text().splitlines()[1:]
    assert len(lines) == len(local_run)  # 0 lost, 0 duplicated
    assert values(path) == local_run


def test_a_sweep_interrupted_on_ray_resumes_with_the_local_executor(cluster, local_run, tmp_path):
    path = tmp_path / "resumed.jsonl"

    def interrupt_after_three(what: str, done: int, total: int) -> None:
        if done >= 3:
            raise KeyboardInterrupt  # the driver stopped by hand

    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            small_digits(), path, executor=RayExecutor(workers=2), progress=interrupt_after_three
        )
    written = len(path.read_text().splitlines()) - 1
    assert 0 < written < len(local_run)
    summary = run_sweep(small_digits(), path, executor=LocalExecutor())
    assert 0 < summary.units_run < summary.units
    assert values(path) == local_run


def test_an_error_inside_msdda_stops_the_sweep_with_that_error(cluster, tmp_path):
    missing = tmp_path / "no-such-weights"
    work = UnitWork("digits", (("weights_dir", str(missing)),), (3,), 2, {})
    with pytest.raises(InputFileError, match="no-such-weights"):
        list(RayExecutor(workers=1).run(work, [SweepUnit("base", None, 0)]))


def test_workers_take_one_gpu_each_where_the_cluster_has_gpus(cluster):
    assert RayExecutor()._placement(ray) == (2, {"num_gpus": 1, "num_cpus": 1})

    class CpuOnly:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0}

    assert RayExecutor(cpus_per_worker=3)._placement(CpuOnly) == (2, {"num_cpus": 3})
    assert RayExecutor(workers=5)._placement(CpuOnly) == (5, {"num_cpus": 1})
    with pytest.raises(MsddaError, match="need 9 CPUs; the cluster has 8"):
        RayExecutor(workers=3, cpus_per_worker=3)._placement(CpuOnly)
    with pytest.raises(MsddaError, match="has 2 GPU"):  # never a hang waiting for a GPU
        RayExecutor(workers=3)._placement(ray)


def _listening_sockets(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in state LISTEN held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # a process that ended meanwhile
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    found.append(parts[1].split(":")[0])
    return found


def _ray_processes() -> set[int]:
    """This process and every process started under it (the Ray cluster it started)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
    tree, grew = {os.getpid()}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_every_ray_process_listens_on_loopback_only(cluster):
    @ray.remote
    def pid():
        return os.getpid()

    assert ray.get(pid.remote()) != os.getpid()
    processes = _ray_processes()
    assert len(processes) >= 3  # the driver, the GCS, the raylet (and workers)
    addresses = _listening_sockets(processes)
    assert addresses, "the Ray processes listen on nothing?"
    assert set(addresses) <= LOOPBACK, addresses


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MsddaError, match=r"msdda\[ray\]"):
        make_executor("ray")
    with pytest.raises(ValueError, match="executor must be one of local, ray"):
        make_executor("dask")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_tiny_sd_sweep_runs_on_two_ray_actors(cluster, tmp_path):
    """The Stable Diffusion sweep from a config on Ray: the local executor's rows and pictures."""
    import runpy

    from msdda.evaluation.config import load_config

    runpy.run_path(str(EXAMPLES / "make_tiny_sd.py"))["make_tiny_sd"](tmp_path / "tiny")
    text = (EXAMPLES / "tiny-sd.toml").read_text()
    text = "tuning = false\n" + text[: text.index("[tuning]")].replace("steps = 4 ", "steps = 2 ")
    text = text.replace(
        'methods = ["base", "rs", "db", "db-ls", "rgg", "code", "target", "msdda", "oracle"]',
        'methods = ["base", "msdda", "rgg"]',
    ).replace("target_candidates = 2", "rgg_scale = 1.0")
    (tmp_path / "sd.toml").write_text(text)
    config = load_config(tmp_path / "sd.toml")
    run_sweep(config, tmp_path / "local.jsonl")
    executor = RayExecutor(workers=2)
    run_sweep(config, tmp_path / "ray.jsonl", executor=executor)
    assert len(set(executor.pids)) == 2
    local, on_ray = values(tmp_path / "local.jsonl"), values(tmp_path / "ray.jsonl")
    assert on_ray.keys() == local.keys() and len(local) == 2 * 2 * (1 + 2 * 3)
    for key, row in local.items():
        files = row.pop("image_files")
        ray_files = on_ray[key].pop("image_files")
        assert on_ray[key] == row
        for a, b in zip(files, ray_files, strict=True):  # the driver wrote the same pictures
            assert (tmp_path / a.replace("local-images", "ray-images")).read_bytes() == (
                tmp_path / b
            ).read_bytes()
