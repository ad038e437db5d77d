"""``predict --engine ray``: its options, the flags it refuses, and the schedule it hands ``Job.run`` in
place of the local DataLoader (``nested_svit.ray``)."""
from __future__ import annotations

import argparse
import os
from typing import Callable

ENGINE_FLAGS = ("--ray-address", "--actors", "--gpus-per-actor", "--cpus-per-actor", "--decode-cpus")
# flags of the local engine that mean nothing on Ray, and what to use instead
NOT_ON_RAY = {"save_vis": ("--save-vis", "pictures are drawn by the local engine only"),
              "calibrate": ("--calibrate", "calibrate with the local engine and --save-calibrated, then pass that file"),
              "calibrate_data": ("--calibrate-data", "calibrate with the local engine"),
              "save_calibrated": ("--save-calibrated", "calibrate with the local engine"),
              "keep_targets": ("--keep-targets", "calibrate with the local engine"),
              "threads": ("--threads", "use --cpus-per-actor (each actor's torch threads)")}


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (predict only)")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (or torchrun's); ray: Ray Data over a cluster or a local Ray instance "
                        "(pip install -e '.[ray]'): CPU decode tasks feed model actors, lost actors are retried, "
                        "a rerun with the same --out resumes")
    g.add_argument("--ray-address", default=None,
                   help="a running cluster: auto or HOST:PORT (default: RAY_ADDRESS when set, else a local Ray "
                        "instance started for this run)")
    g.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs per model actor, also its torch threads (default: on a local Ray instance the local "
                        "run's threads, as far as its CPUs allow, so rows equal a local run's; on a cluster 1)")
    g.add_argument("--decode-cpus", type=float, default=None,
                   help="CPUs per decode task feeding GPU actors (default 1; CPU actors decode with their own CPUs); "
                        "Ray runs as many decode tasks at once as the cluster's free CPUs hold")


def check_engine_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, what the chosen engine cannot do."""
    from .arguments import WORKERS

    if args.engine != "ray":
        given = [f for f in ENGINE_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --engine ray")
        return
    for dest, (flag, instead) in NOT_ON_RAY.items():
        value = getattr(args, dest, None)
        if value not in (None, 0, False, ""):
            raise ValueError(f"{flag} is not supported with --engine ray: {instead}")
    if args.device not in ("auto", "cpu"):
        raise ValueError("--device is not supported with --engine ray: each actor runs on its GPU (--gpus-per-actor) "
                         "or its CPUs")
    if args.workers != WORKERS:
        raise ValueError("--workers is not supported with --engine ray: decoding runs in Ray tasks")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--engine ray runs from one driver process: start it without torchrun")
    if args.actors is not None and args.actors < 1:
        raise ValueError(f"--actors must be >= 1, got {args.actors}")
    if (args.gpus_per_actor or 0) < 0 or (args.cpus_per_actor is not None and not args.cpus_per_actor > 0):
        raise ValueError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
    if args.decode_cpus is not None and not args.decode_cpus > 0:
        raise ValueError(f"--decode-cpus must be > 0, got {args.decode_cpus:g}")


def schedule_for(args: argparse.Namespace, job) -> Callable | None:
    """The engine's schedule of ``job`` for ``Job.run``: None (this process's DataLoader), or its pending
    batches on Ray Data, its model built in each actor from the job's ``ModelSpec``, its batch step run there."""
    if args.engine != "ray":
        return None
    from ..ray import require_ray
    from ..ray.engine import RayOptions, ray_schedule

    try:
        require_ray()  # before any work: the extra may not be installed
    except ImportError as e:
        raise ValueError(str(e)) from e
    options = RayOptions(address=ray_address(args), actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                         cpus_per_actor=ray_threads(args), decode_cpus=args.decode_cpus)
    return ray_schedule(job, options)


def ray_address(args: argparse.Namespace) -> str | None:
    """The cluster to join: ``--ray-address``, else ``RAY_ADDRESS`` (Ray's own variable: ``ray job submit``
    sets it for the command it runs), else none (a local instance for this run)."""
    return args.ray_address or os.environ.get("RAY_ADDRESS") or None


def retried_note(state) -> str:
    """The summary's words for the batches of this run that took more than one attempt (a model actor,
    a decode task or a node's objects lost and the work done again by Ray), or nothing."""
    if not state.retried:
        return ""
    batches = sorted(state.retried)
    shown = ", ".join(map(str, batches[:20])) + (f" ... ({len(batches)} in all)" if len(batches) > 20 else "")
    return f"; Ray retried batch{'es' if len(batches) > 1 else ''} {shown} (work lost with an actor or a node, done again)"


def ray_threads(args: argparse.Namespace) -> int:
    """The torch threads of each model actor (``--cpus-per-actor``, else the local run's on a local Ray
    instance: ``ray.engine.actor_threads``)."""
    import torch

    from ..ray.engine import RayOptions, actor_threads

    options = RayOptions(address=ray_address(args), cpus_per_actor=args.cpus_per_actor or 0.0)
    return actor_threads(options, args.actors or 1, torch.get_num_threads())


def threads_note(args: argparse.Namespace) -> list[str]:
    """Said first when Ray's actors run other torch threads than a local run would: floats differ in the
    last bits (and a gate decision near its threshold may flip)."""
    import torch

    threads, local = ray_threads(args), torch.get_num_threads()
    if threads == local:
        return []
    return [f"note: each Ray actor runs {threads} torch thread(s), a local run {local}: rows can differ from a local "
            f"run's in the last bits (--cpus-per-actor {local} gives the local run's floats)"]
