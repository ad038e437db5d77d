"""What the driver spends before and around the images, as the number of images grows (issue 25, item 5).

For N synthetic object URIs (``s3://bucket/val/<wnid>/<n>.JPEG``; no object exists and none is read), each
size in a fresh process so that its peak memory is its own:
  * ``resolve``: ``resolve_records`` of a Parquet manifest of the N URIs with labels (``data/manifest.py``),
  * ``digest``: ``Records.digest`` (what resume compares),
  * ``pending``: ``PartStore.pending`` with half of the batches already committed (resume's anti-join),
  * ``ray_plan``: the Ray driver's work units and its manifest file (``ray/units.py``),
and the process's peak RSS above its baseline after imports. And, in a process of its own, ``list``: the
driver's side of listing a prefix of N keys (``resolve_records("s3://bucket/val/")``: the listing's N
entries turned into objects, folder rules, class folders, records), with the store's answer made up in
memory beforehand (the entries s3fs returns); its peak memory includes that answer, as a real listing's
would. The LIST requests themselves are not timed (S3 answers 1,000 keys per request, so 1M keys are
1,000 sequential calls: on paper, about 1-3 minutes at 60-200 ms each).

Run: ``python bench/planning_cost.py [--sizes 10000,100000,1000000] [--out bench/results/planning-cost-<date>.csv]``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    """This process's peak resident memory (Linux ``VmHWM``: reset by exec, unlike ``ru_maxrss``, which a
    child inherits from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_manifest_of(n: int, path: Path) -> None:
    """A Parquet manifest of ``n`` synthetic URIs with ImageNet labels (in the parent: not measured)."""
    import pandas as pd

    from nested_svit.data.classes import imagenet_classes

    wnids = list(imagenet_classes()[0])
    labels = [i % 1000 for i in range(n)]
    pd.DataFrame({"uri": [f"s3://bucket/val/{wnids[lab]}/{i:08d}.JPEG" for i, lab in enumerate(labels)],
                  "label": labels}).to_parquet(path, index=False)


class ListingOnly:
    """An fsspec filesystem that answers ``find`` with ``n`` made-up entries, as s3fs does after its
    LIST requests (``name``, ``size``, ``ETag``, ``type``)."""

    def __init__(self, n: int):
        from nested_svit.data.classes import imagenet_classes

        wnids = list(imagenet_classes()[0])
        self.answer = {f"bucket/val/{wnids[i % 1000]}/{i:08d}.JPEG": {
            "name": f"bucket/val/{wnids[i % 1000]}/{i:08d}.JPEG", "size": 110_000 + i % 977,
            "ETag": f'"{i:032x}"', "type": "file"} for i in range(n)}

    def find(self, path: str, detail: bool = True) -> dict:
        return self.answer

    def unstrip_protocol(self, name: str) -> str:
        return "s3://" + name


def measure_listing(n: int) -> dict:
    """The driver's side of listing a prefix of ``n`` keys, in this process -> its figures."""
    import nested_svit.data.objectstore as objectstore
    from nested_svit.data.records import resolve_records

    base = _rss_mb()
    fake = ListingOnly(n)
    objectstore.filesystem = lambda uri: (fake, uri[len("s3://"):])
    t0 = time.perf_counter()
    records = resolve_records("s3://bucket/val/")
    seconds = time.perf_counter() - t0
    assert len(records) == n and records.kind == "imagefolder", (len(records), records.kind)
    return {"images": n, "list_s": seconds, "list_peak_rss_above_baseline_mb": _rss_mb() - base}


def measure(n: int, batch_size: int, manifest: Path) -> dict:
    """One size, in this process -> its figures."""
    from nested_svit.data.dataset import ImageRecordDataset
    from nested_svit.data.records import resolve_records
    from nested_svit.distributed import DistInfo
    from nested_svit.inference.parts import PartStore
    from nested_svit.ray.units import work_units, write_image_table


    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = _rss_mb()
        out = {"images": n, "batch_size": batch_size}
        t0 = time.perf_counter()
        records = resolve_records(manifest)
        out["resolve_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        records.digest()
        out["digest_s"] = time.perf_counter() - t0
        dataset = ImageRecordDataset(records, transform=None)
        parts = tmp / "out.parquet.parts"
        store = PartStore(parts, {"run": 1}, batch_size, n, DistInfo())
        store.open()
        batches = (n + batch_size - 1) // batch_size
        for b in range(0, batches, 2):  # half committed: empty part files are enough to be seen as done
            store.part_path(b).touch()
        t0 = time.perf_counter()
        todo = store.pending()
        out["pending_s"] = time.perf_counter() - t0
        out["pending_batches"] = len(todo)
        t0 = time.perf_counter()
        units = work_units(dataset, todo, batch_size)
        write_image_table(tmp / "ray-images.parquet", dataset, batch_size)
        out["ray_plan_s"] = time.perf_counter() - t0
        out["ray_units"] = len(units)
        out["peak_rss_above_baseline_mb"] = _rss_mb() - base
        out["peak_rss_mb"] = _rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: measure one size
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--listing", action="store_true", help=argparse.SUPPRESS)  # a child: the listing stage
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / f"planning-cost-{datetime.date.today()}.csv"))
    args = p.parse_args(argv)
    if args.one is not None:
        figures = measure_listing(args.one) if args.listing else measure(args.one, args.batch_size, Path(args.manifest))
        print(json.dumps(figures))
        return 0
    import pandas as pd

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.parquet"
            write_manifest_of(n, manifest)
            done = subprocess.run([sys.executable, __file__, "--one", str(n), "--batch-size", str(args.batch_size),
                                   "--manifest", str(manifest)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        listed = subprocess.run([sys.executable, __file__, "--one", str(n), "--listing"], capture_output=True,
                                text=True, check=True)
        rows[-1].update(json.loads(listed.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    for col in [c for c in frame.columns if c.endswith("_s")]:
        frame[f"{col[:-2]}_us_per_image"] = (frame[col] / frame["images"] * 1e6).round(2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.round(4).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
