"""The driver of ``predict --engine ray``: a schedule of the one inference loop (``inference.run_batches``):
a Ray Data pipeline over the job's pending global batches (CPU decode tasks -> model actors running the
job's batch step), each finished batch committed by the driver as its part file."""
from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from dataclasses import dataclass

from ..inference.loop import BatchResult, Schedule
from ..inference.parts import PartStore
from . import require_ray
from .ledger import start_ledger
from .predictor import FAULT_ENV, Predictor
from .quiet import without_actor_argument_noise
from .units import decode_unit, template_of, work_units, write_image_table


@dataclass
class RayOptions:
    address: str | None = None  # None: a local Ray instance for this run; "auto" or HOST:PORT: a running cluster
    actors: int | None = None  # model actors (None: one per GPU of the cluster, else 1)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # also the actor's torch threads (``actor_threads``)
    decode_cpus: float | None = None  # per decode task of GPU actors (None: 1; CPU actors decode with their own CPUs)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT nothing listens on, in seconds (``ray.init`` would retry it for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or address == "auto" or address.startswith("ray://"):
        return
    if not port.isdigit():
        raise ValueError(f"--ray-address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"no Ray cluster answers at --ray-address {address} ({e.strerror or e}); start one with "
                         "`ray start --head` there, or leave --ray-address out for a local instance") from e


def local_instance_cpus() -> int:
    """The CPUs of the local Ray instance a run without ``--ray-address`` starts."""
    return max(2, os.cpu_count() or 2)


def actor_threads(options: RayOptions, actors: int, local_threads: int) -> int:
    """Torch threads per model actor: ``cpus_per_actor`` when given; else, on a local instance, the local
    run's threads (the same reduction order, so the same floats) as far as the instance's CPUs allow for
    ``actors`` actors; on a cluster, 1."""
    if options.cpus_per_actor:
        return int(max(1, options.cpus_per_actor))
    if options.address:
        return 1
    return max(1, min(local_threads, local_instance_cpus() // max(actors, 1)))


def _connect(ray, options: RayOptions) -> bool:
    """Join or start Ray. -> whether this run started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # our own bar and messages say what happens
    if options.address:
        _check_reachable(options.address)
        try:
            ray.init(address=options.address, **quiet)
        except ConnectionError as e:  # "auto" with no cluster on this machine, a head that went away
            raise ValueError(f"cannot join the Ray cluster at --ray-address {options.address}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    else:  # a local instance sized to this machine, gone at the end of the run; "local": never the cluster
        # that /tmp/ray/ray_current_cluster names (any cluster once started here, alive or long gone)
        ray.init(address="local", num_cpus=local_instance_cpus(), include_dashboard=False, **quiet)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def _actors(ray, options: RayOptions, local: bool) -> tuple[int, float]:
    """(actors, GPUs each) from the options, defaults from the cluster's resources. Refuses what would
    wait for ever on a local instance (a cluster given by address may still grow: a warning there)."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = options.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    # GPU actors run apart from the decode tasks; CPU actors take the decode in (_decode_cpus)
    need_cpus = actors * options.cpus_per_actor + (_decode_cpus(options, per_actor) if per_actor else 0)
    problems = []
    if actors * per_actor > gpus:
        problems.append(f"{actors} actors x {per_actor:g} GPUs but the cluster has {gpus:g} GPUs")
    if need_cpus > cpus:
        problems.append(f"{actors} actors x {options.cpus_per_actor:g} CPUs"
                        + (f" + {_decode_cpus(options, per_actor):g} for decoding" if per_actor else "")
                        + f" but the cluster has {cpus:g} CPUs")
    if problems and local:
        raise ValueError("; ".join(problems) + ": lower --actors / --cpus-per-actor / --gpus-per-actor")
    for problem in problems:
        warnings.warn(f"{problem}: the run waits until the cluster has them")
    return actors, per_actor


def _decode_cpus(options: RayOptions, gpus_per_actor: float) -> float:
    """CPUs of one decode task. For CPU actors, the actor's own: Ray fuses two map stages only when their
    resources are equal, and unfused decode tasks would wait for ever for CPUs the actors hold."""
    if gpus_per_actor:
        return options.decode_cpus or 1.0
    return options.cpus_per_actor


def _check_decode_cpus(options: RayOptions, gpus_per_actor: float) -> None:
    if options.decode_cpus is not None and not gpus_per_actor:
        warnings.warn(f"--decode-cpus {options.decode_cpus:g} is for the decode tasks of GPU actors; these actors run "
                      f"on CPUs and decode inside themselves with their --cpus-per-actor {options.cpus_per_actor:g}")


def ray_schedule(job, options: RayOptions) -> Schedule:
    """The schedule of ``job`` (an ``inference.Job``) on Ray, for ``Job.run``: its pending batches decoded in
    Ray tasks with the data set's own code, its batch step run in model actors that build their model from
    the job's ``ModelSpec``; each finished batch committed by the driver, in the one loop of every engine."""
    ray = require_ray()
    return lambda todo: _ray_results(ray, job.store, job.dataset, job.step, job.spec, options, todo)


def _ray_results(ray, store: PartStore, dataset, step, spec, options: RayOptions, todo: list[list[int]]):
    """The schedule of ``run_batches``: pending batches -> decode tasks -> model actors -> ``BatchResult``s."""
    images = store.side_file("ray-images.parquet")
    if not images.exists():
        write_image_table(images, dataset, store.batch_size)
    if not todo:
        return
    with without_actor_argument_noise():
        yield from _pipeline(ray, store, dataset, step, spec, options, todo)


def _pipeline(ray, store: PartStore, dataset, step, spec, options: RayOptions, todo: list[list[int]]):
    started = _connect(ray, options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts images
        context.max_errored_blocks = 0  # data errors are rows; anything reaching Ray is a failure
        if hasattr(context, "max_consecutive_actor_init_deaths"):
            context.max_consecutive_actor_init_deaths = 2  # a model that cannot load fails fast
        actors, gpus_per_actor = _actors(ray, options, local=started and not options.address)
        _check_decode_cpus(options, gpus_per_actor)
        units = work_units(dataset, todo, store.batch_size)
        actors = min(actors, len(units))  # no idle actors for a short run or the tail of a resumed one
        remote_env = {k: os.environ[k] for k in (FAULT_ENV,) if k in os.environ}
        extra = {"runtime_env": {"env_vars": remote_env}} if remote_env else {}
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ledger = start_ledger(ray)
        ds = ds.map(decode_unit, fn_kwargs={"template": template_of(dataset), "ledger": ledger},
                    num_cpus=_decode_cpus(options, gpus_per_actor), **extra)
        ds = ds.map_batches(Predictor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"step": step.detached(), "spec": spec,
                                                   "threads": int(max(1, options.cpus_per_actor)),
                                                   "ledger": ledger},
                            num_gpus=gpus_per_actor, num_cpus=options.cpus_per_actor, **extra)
        for row in ds.iter_rows():
            yield BatchResult(int(row["batch"]), row["rows"], pickle.loads(row["counts"]), int(row["attempts"]))
    finally:
        if started:
            ray.shutdown()
