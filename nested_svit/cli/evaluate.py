"""``nested-svit eval imagenet`` (classifiers: top-1/top-5, keep ratios, token usage) and ``nested-svit
eval coco`` (detectors: box and mask AP with pycocotools, token usage, FPS^w / FPS^b)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options
from .arguments import CLS, DET, add_inference_options, add_valid_labels_option
from .common import all_skipped, capacity_note, check_suffix, warn
from .models import class_names_file, keep_budget, model_spec, show
from .runs import data_options, progress, run_options, validate_inference_args
from .sets import DataSetArg, data_sets


def add_parser(sub, formatter) -> None:
    e = sub.add_parser("eval", help="evaluate on a data set (imagenet: classifiers; coco: detectors)",
                       formatter_class=formatter)
    esub = e.add_subparsers(dest="task", required=True)
    about = "classifiers: ImageNet-style top-1/top-5, keep ratios per gated block, token usage (resumable, torchrun)"
    ei = esub.add_parser("imagenet", help=about, description=about, formatter_class=formatter)
    add_inference_options(ei, (CLS,))
    g = ei.add_argument_group("data and output")
    g.add_argument("--data", "--input", dest="data", required=True, action="append", metavar="[NAME=]PATH[:OPTS]",
                   help="ImageFolder tree (wnid folders -> ImageNet ids; ImageNet-V2's 0..999 folders -> those ids), "
                        "parquet shards/file or save_to_disk folder. Give it several times as NAME=PATH to evaluate "
                        "several test sets with the model loaded once; a set's own scoring follows its path: "
                        "NAME=PATH:valid=imagenet-r, NAME=PATH:real=real.json (:valid=none / :real=none: off for it)")
    g.add_argument("--real-labels", default=None, metavar="REAL_JSON",
                   help="ReaL labels (the official real.json; files matched by val number, ILSVRC2012_val_N*): adds "
                        "real_top1 / real_top5 (images without a ReaL label are left out and counted)")
    g.add_argument("--out", default="results.json",
                   help="output file (.json, with a .csv in timm's columns beside it, one row per set; or .csv); "
                        "<stem>[.<set>].per_class.csv and .reliability.png beside it")
    options.add(ei, g, "--topk", type=int, defaults={CLS: 5}, families=(CLS,), help="classes per image in the output")
    add_valid_labels_option(ei, g, (CLS,))
    ei.set_defaults(func=cmd_eval_imagenet)

    about = "detectors: COCO box and mask AP (pycocotools), token usage, FPS^w / FPS^b (resumable, torchrun)"
    c = esub.add_parser("coco", help=about, description=about, formatter_class=formatter)
    add_inference_options(c, (DET,), split=None, split_help="COCO split under --data (default: val2017)",
                          manifests=False)
    g = c.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="COCO root with annotations/instances_<split>.json and <split>/")
    g.add_argument("--ann", default=None, help="annotation json (with --images, instead of --data)")
    g.add_argument("--images", default=None, help="image folder of --ann")
    g.add_argument("--max-images", type=int, default=None, help="evaluate the first N images by id (default: all)")
    g.add_argument("--out", default="coco-results.json", help=".json result; <name>.detections.json beside it")
    c.set_defaults(func=cmd_eval_coco)


def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    from ..distributed import shutdown
    from ..evaluation.imagenet import SetFiles, write_results
    from ..inference import OutputOptions, Scoring, classifier_job, load_for_runs

    args = options.resolve(args, CLS, args.model)
    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--out {out}: use .json (full result; a .csv summary, one row per set, is written beside it) "
                         "or .csv")
    validate_inference_args(args)
    sets = data_sets(args)
    json_out, csv_out = out.with_suffix(".json"), out.with_suffix(".csv")
    files = {s.name: SetFiles.beside(out, s.name) for s in sets}
    parts = {s.name: out.with_name(out.name + (f".{s.name}" if s.name else "") + ".parts") for s in sets}
    ours = [out, json_out, csv_out, *(f for fs in files.values() for f in (fs.per_class, fs.reliability))]
    spec, run, names = model_spec(args, CLS), run_options(args), class_names_file(args.class_names)
    loaded = load_for_runs(spec, run)
    show(loaded.built.messages)
    try:
        jobs = []
        for s in sets:  # every set's data and scoring checked before the first image is read
            jobs.append(classifier_job(spec, data_options(args, s.path, False, ours), run,
                                       OutputOptions(parts=str(parts[s.name])), "eval-imagenet", keep_budget(args),
                                       topk=args.topk, class_names=names, scoring=Scoring(s.valid, s.real),
                                       loaded=loaded))
            show([f"{s.name}: {m}" if s.name else m for m in jobs[-1].messages])
        results = []
        for s, job in zip(sets, jobs):
            results.append(_eval_set(job, s, files[s.name]))
        if loaded.info.is_main:
            write_results(results, json_out, csv_out, jobs)
            if len(results) > 1:
                print(results_lines(results))
            print(f"-> {json_out}, {csv_out}, per-class accuracy and reliability diagrams beside them")
            return max(all_skipped(r["num_skipped"], r["num_skipped"] + r["num_predicted"]) for r in results)
    finally:
        shutdown(loaded.info)
    return 0


def _eval_set(job, data_set: DataSetArg, files) -> dict | None:
    """Run one set with a bar, and on rank 0 print the line that tells its result -> the result."""
    from ..evaluation.imagenet import evaluate_set

    def postfix(s) -> dict:
        post = {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"}
        if s.labelled:
            post["top1"] = f"{100 * s.correct1 / s.labelled:.2f}"
        return post

    with progress(job, f"eval {data_set.name}" if data_set.name else "eval", postfix) as update:
        evaluated = evaluate_set(job, data_set.label, files, update)
    if evaluated is None:
        return None
    result, counts = evaluated
    images, seconds = counts.images, counts.elapsed
    labelled, predicted = result["num_images"], result["num_predicted"]
    scores = (f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f} on {labelled} labelled of {predicted} images"
              if labelled else f"no labelled images among {predicted}: top-1/top-5 not computed")
    if "real_top1" in result:
        scores += f"  ReaL top1 {result['real_top1']:.2f} on {result['real_num_images']}"
    if result.get("num_outside_valid_labels"):
        scores += f"  ({result['num_outside_valid_labels']} labelled outside --valid-labels, not scored)"
    if "agreement" in result:
        a = result["agreement"]
        scores += (f"  agreement with {a['with']}: kept tokens {100 * a['kept_tokens']:.2f}%, "
                   f"top1 {100 * a['top1']:.2f}%")
    rate = f", {images / seconds:.1f} img/s" if seconds > 0 and images else ""
    print(f"{data_set.name + ': ' if data_set.name else ''}{scores}  skipped {result['num_skipped']}  "
          f"keep {result['mean_keep_ratio_all_gates']:.3f}  ece {_percent(result['ece'])}  in {seconds:.1f} s{rate}"
          + (f"; {capacity_note(result['capacity'], result['capacity_reruns_this_run'])}" if "capacity" in result else ""))
    return result


def results_lines(results: list[dict]) -> str:
    """The sets side by side: top-1 / top-5, and the top-1 difference to the set ``diff_to`` names."""
    from ..evaluation.testset_figures import results_table

    table = results_table(results)
    lines = [f"{'set':<14} {'images':>7} {'top1':>7} {'top5':>7} {'top1_diff':>9} {'to':<10} {'ece %':>6}"]
    for r in table.itertuples():
        diff = f"{r.top1_diff:>+9.2f}" if r.top1_diff == r.top1_diff else f"{'':>9}"
        ece = f"{100 * r.ece:>6.2f}" if r.ece == r.ece else f"{'n/a':>6}"
        lines.append(f"{str(r.dataset)[:14]:<14} {r.num_images:>7} {r.top1:>7.2f} {r.top5:>7.2f} {diff} "
                     f"{str(r.diff_to or '')[:10]:<10} {ece}")
    return "\n".join(lines)


def _percent(value: float) -> str:
    """``1.23%``, or ``n/a`` for a figure a set without labelled images does not have."""
    return "n/a (no labelled images)" if value != value else f"{100 * value:.2f}%"



def _coco_split(args: argparse.Namespace) -> str:
    return args.split or "val2017"


def _coco_paths(args: argparse.Namespace):
    """``--data ROOT [--split S]`` or ``--ann FILE --images DIR``, never a mix of the two."""
    from ..data.coco import resolve_coco_paths

    if (args.ann or args.images) and (args.data or args.split):
        raise ValueError("give --data COCO_ROOT [--split S] or --ann FILE --images DIR, not both")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    return resolve_coco_paths(args.data, _coco_split(args), args.ann, args.images)


def cmd_eval_coco(args: argparse.Namespace) -> int:
    from ..data.coco import load_coco
    from ..detection.registry import list_detectors
    from ..distributed import shutdown
    from ..evaluation.detection import category_mapping, evaluate_coco
    from ..inference import OutputOptions, detector_job, family_of

    args = options.resolve(args, DET, args.model)
    if args.model and family_of(args.model, None) != DET:
        raise ValueError(f"unknown detector {args.model!r}; available: {', '.join(list_detectors())}")
    validate_inference_args(args)
    out = Path(args.out)
    check_suffix(out, (".json",), "eval coco (a result, and <name>.detections.json beside it)")
    ann_file, image_dir = _coco_paths(args)
    coco = load_coco(ann_file)
    names = [coco.loadCats(c)[0]["name"] for c in sorted(coco.getCatIds())]
    spec = model_spec(args, DET, categories=tuple(names))
    data = data_options(args, str(image_dir), annotations=str(ann_file), max_images=args.max_images,
                        split=_coco_split(args))
    job = detector_job(spec, data, run_options(args), OutputOptions(parts=str(out.with_name(out.name + ".parts"))),
                       "eval-coco", keep_budget(args))
    categories = category_mapping(list(job.model.class_names), coco)
    show(job.messages + ([f"note: {categories[1]}"] if categories[1] else []))
    try:
        with progress(job, "eval coco", lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}",
                                                   "dets": s.detections}) as update:
            evaluated = evaluate_coco(job, coco, categories, ann_file, image_dir, out, update)
        if evaluated is None:
            return 0
        result, counts = evaluated
        mismatched = result["size_mismatches"]
        if mismatched:
            warn(f"warning: {len(mismatched)} images decode (EXIF orientation applied, as mmdet does) to another size "
                 "than the annotation file says, so their boxes and masks are compared in another frame: "
                 + "; ".join(f"{m['id']} {m['decoded'][1]}x{m['decoded'][0]} vs {m['annotations'][1]}x"
                             f"{m['annotations'][0]}" for m in mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
        bbox, segm = result["bbox"]["AP"], result["segm"]["AP"]
        scores = "no ground truth: AP undefined" if bbox is None else f"bbox AP {bbox:.3f}  segm AP {segm:.3f}"
        images, seconds = counts.images, counts.elapsed
        rate = f", {images / seconds:.1f} img/s" if seconds > 0 and images else ""
        print(f"{scores}  images {result['num_evaluated']}  skipped {result['num_skipped']}  keep "
              f"{result['mean_keep_ratio_all_gates']:.3f}  -> {out} in {seconds:.1f} s{rate}")
        return all_skipped(result["num_skipped"], result["num_images"])
    finally:
        shutdown(job.dist)
