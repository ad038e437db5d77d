"""The driver of ``predict --engine ray``: a Ray Data pipeline over the job's pending global batches
(CPU decode tasks -> model actors), each finished batch written by the driver as its part file."""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from ..evaluation.runner import _check_manifest, _part_path, pending_batches
from ..io import atomic_write_bytes
from . import require_ray
from .predictor import FAULT_ENV, Predictor
from .units import decode_unit, template_of, work_units, write_manifest


@dataclass
class RayOptions:
    address: str | None = None  # None: a local Ray instance for this run; "auto" or HOST:PORT: a running cluster
    actors: int | None = None  # model actors (None: one per GPU of the cluster, else 1)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # also the actor's torch threads
    decode_cpus: float = 1.0  # per decode task of GPU actors (CPU actors decode with their own CPUs)


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
    else:  # a local instance sized to this machine, gone at the end of the run
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, **quiet)
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
    need_cpus = actors * options.cpus_per_actor + (options.decode_cpus if per_actor else 0)
    problems = []
    if actors * per_actor > gpus:
        problems.append(f"{actors} actors x {per_actor:g} GPUs but the cluster has {gpus:g} GPUs")
    if need_cpus > cpus:
        problems.append(f"{actors} actors x {options.cpus_per_actor:g} CPUs"
                        + (f" + {options.decode_cpus:g} for decoding" if per_actor else "")
                        + f" but the cluster has {cpus:g} CPUs")
    if problems and local:
        raise ValueError("; ".join(problems) + ": lower --actors / --cpus-per-actor / --gpus-per-actor")
    for problem in problems:
        warnings.warn(f"{problem}: the run waits until the cluster has them")
    return actors, per_actor


def _decode_cpus(options: RayOptions, gpus_per_actor: float) -> float:
    """CPUs of one decode task. For CPU actors, the actor's own: Ray fuses two map stages only when their
    resources are equal, and unfused decode tasks would wait for ever for CPUs the actors hold."""
    return options.decode_cpus if gpus_per_actor else options.cpus_per_actor


def run_on_ray(job, state, load_model: Callable, spec: dict, collate: Callable, options: RayOptions,
               progress: Callable | None = None):
    """Run ``job``'s pending batches on Ray, one part file per batch as the local engine writes them.
    ``state``: a fresh ``Progress`` / ``DetectionProgress`` (updated and returned); ``load_model(device)``
    builds the model in each actor (a picklable function of the checkpoint path and flags)."""
    ray = require_ray()
    _check_manifest(job)
    job.parts_dir.mkdir(parents=True, exist_ok=True)
    manifest = job.parts_dir / "ray-manifest.parquet"
    if not manifest.exists():
        write_manifest(manifest, job.dataset, job.batch_size)
    todo = pending_batches(job)
    if not todo:
        return state
    started = _connect(ray, options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts images
        context.max_errored_blocks = 0  # data errors are rows; anything reaching Ray is a failure
        if hasattr(context, "max_consecutive_actor_init_deaths"):
            context.max_consecutive_actor_init_deaths = 2  # a model that cannot load fails fast
        actors, gpus_per_actor = _actors(ray, options, local=started and not options.address)
        units = work_units(job.dataset, todo, job.batch_size)
        actors = min(actors, len(units))  # no idle actors for a short run or the tail of a resumed one
        remote_env = {k: os.environ[k] for k in (FAULT_ENV,) if k in os.environ}
        extra = {"runtime_env": {"env_vars": remote_env}} if remote_env else {}
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map(decode_unit, fn_kwargs={"template": template_of(job.dataset), "collate": collate},
                    num_cpus=_decode_cpus(options, gpus_per_actor), **extra)
        ds = ds.map_batches(Predictor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"load_model": load_model, "spec": spec,
                                                   "threads": int(max(1, options.cpus_per_actor))},
                            num_gpus=gpus_per_actor, num_cpus=options.cpus_per_actor, **extra)
        start = time.perf_counter()
        for row in ds.iter_rows():
            atomic_write_bytes(_part_path(job.parts_dir, int(row["batch"])), row["rows"])
            state.add(pickle.loads(row["counts"]))
            state.elapsed = time.perf_counter() - start
            if progress:
                progress(state)
    finally:
        if started:
            ray.shutdown()
    return state
