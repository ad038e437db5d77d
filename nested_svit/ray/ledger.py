"""The run's ledger of attempts: a Ray actor on the driver's node (it lives as long as the driver,
whichever worker node is lost) that counts, per global batch, how often each stage (decode, model)
started it. A stage asks it before working on a batch, so a batch whose decode or model actor died
with its node, or whose finished output was lost with a node's object store and recomputed, is
counted again; the model stage's answer travels with the batch's rows to the driver (``attempts``)."""
from __future__ import annotations


class Ledger:
    """``begin(stage, batch)`` -> the most starts of any stage of ``batch`` so far, this one counted."""

    def __init__(self):
        self.starts: dict[int, dict[str, int]] = {}  # batch -> stage -> starts

    def begin(self, stage: str, batch: int) -> int:
        stages = self.starts.setdefault(int(batch), {})
        stages[stage] = stages.get(stage, 0) + 1
        return max(stages.values())


def start_ledger(ray):
    """A ``Ledger`` actor pinned to this (the driver's) node, needing no CPU. Hard affinity: a soft one
    placed it on a worker node whenever the driver's node had no CPUs (a head that runs no work), and
    it died with that node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(Ledger).remote()


def begin(ledger, stage: str, batch: int) -> int:
    """Count a start of ``stage`` on ``batch`` (waiting for the ledger's answer: a start counted before
    the work, never lost with a process that dies during it) -> the batch's attempts so far (1: none
    before). No ledger (a unit decoded outside a run): 1."""
    if ledger is None:
        return 1
    import ray

    return int(ray.get(ledger.begin.remote(stage, batch)))
