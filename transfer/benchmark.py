"""``moco-benchmark``: the class-disjoint transfer benchmark on Fashion-MNIST scenes, in one command.

    moco-benchmark                    # quick start: 1 pretraining seed, 1 trial, short schedule
    moco-benchmark --pretrain-seeds 3 --trials 3 --controls --epoch-curve 1 2 5 10
                                      # the committed study (results/fashion_scenes_disjoint)

The MoCo paper's transfer protocol done small and, as in the paper (ImageNet to VOC and COCO),
class-disjoint: the ten Fashion-MNIST classes are split into *source* classes (default: the even
class indices, T-shirt/top, Pullover, Coat, Shirt, Bag) and *target* classes (the odd ones,
Trouser, Dress, Sandal, Sneaker, Ankle boot). Both pretrained rows learn from source-class
training images only, MoCo v2 without labels and the supervised ResNet-18 with the source labels;
the detector learns the target classes on scenes built from target-class garments only (clutter
included), so no scene pixel comes from a pretraining image. Steps, each read back when its
output exists, so an interrupted run resumes where it stopped:

1. the scenes of the target classes (:mod:`transfer.datasets.scenes`), COCO format;
2. per pretraining seed, MoCo v2 on the source images (``pretrain/fashion_mnist_demo.yaml``; its
   kNN and logistic probe, MoCo vs random-init features, on held-out source training images), or
   ``--pretrained CKPT``;
3. per pretraining seed, the supervised ResNet-18 on the source labels
   (``supervised/fashion_mnist.yaml``, as many epochs as MoCo, lr 0.03 chosen on held-out images);
4. with ``--controls``, per pretraining seed: random init with BN statistics calibrated on the
   source images (:mod:`moco_pretrain.controls`), and MoCo v2 with m = 0;
5. ``moco-convert`` of every backbone;
6. ``moco-transfer``: every backbone fine-tuned with the trial seeds ``0..trials-1`` (the same
   seeds for every backbone), random init with ``pretrain-seeds x trials`` seeds;
   ``--schedules long`` fine-tunes the first pretraining seed's MoCo and supervised backbones and
   random init (``trials`` seeds) for 3x the iterations;
7. with ``--epoch-curve E ...``, one MoCo run of max(E) epochs (seed 0) whose checkpoints at those
   epochs are fine-tuned with the trial seeds;
8. ``moco-report`` per schedule, and ``ap_vs_epochs.png`` next to the short schedule's report;
   with ``--controls``, ``controls/report.md`` beside it: each control against MoCo and random
   init.

Any COCO-format dataset and any checkpoint take the same steps, trial seeds, reports and
intervals: ``--dataset DIR`` (:mod:`transfer.datasets.coco`: ``train/val/test.json``, or one
``annotations.json`` split with ``--data-seed``) compares random init with one row per ``--weights
NAME=FILE`` (a layout ``moco-convert`` detects, converted with ``--arch``, or a Detectron2
``.pkl``; a row named ``supervised`` is the supervised baseline), fine-tuned with
``detection/coco_format_R_FPN_{pretrained,random}.yaml`` (Mask R-CNN when every annotation has a
mask, else boxes only). For the embedded scenes and any dataset, ``--label-fractions F ...``
fine-tunes on nested, seeded subsets of the training images (the same for every row, the full
schedule for each) and charts each AP against the fraction, and ``--frozen`` is the
frozen-backbone probe (``FREEZE_AT`` 5, frozen BN: only FPN and heads train), run and reported
apart (``*-frozen``). ``--eval-split val`` scores the validation scenes instead of the test
scenes (for choosing settings). ``--task sem_seg`` fine-tunes the paper's FCN on the scenes' per-pixel labels instead
(``segmentation/fashion_scenes_R_18_FCN_*.yaml``, mIoU), ``--task keypoints`` Keypoint R-CNN on
each garment's extreme points (keypoint AP); runs and reports go to ``<task>/<schedule>/`` and
``report/<task>/<schedule>/``. Without detectron2 it runs step 2, prints the feature-level
comparison and how to install detectron2. ``KEY VALUE`` pairs after the options go to every
fine-tune.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from moco_pretrain.checkpoint import Checkpointer
from moco_pretrain.cli.common import exit_on_user_error
from moco_pretrain.comparison import Sample, mean_interval
from moco_pretrain.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from moco_pretrain.files import atomic_write, atomic_write_json, file_sha256
from moco_pretrain.pretrain import feature_comparison
from moco_pretrain.recipes import resolve_config_file
from moco_pretrain.results import RESULTS_FILE, read_results
from moco_pretrain.weights import converted_provenance, load_backbone_state_dict

from .convert import ARCHS, convert_to_detectron2, write_detectron2_pkl
from .datasets.coco import CocoDataset, check_fractions, prepare_coco_dataset
from .datasets.scenes import SUMMARY_FILE, build_fashion_scenes, scene_classes, scene_options
from .pipeline import Pipeline

PRETRAIN_RECIPE = "pretrain/fashion_mnist_demo.yaml"
SUPERVISED_RECIPE = "supervised/fashion_mnist.yaml"
# The supervised row as the benchmark trains it: the recipe's 3 epochs cut to the MoCo demo's 2
# (the same passes over the source images for both pretrained rows), and its lr chosen on the
# held-out source images as MoCo's m was (tools/choose_on_holdout.py: top-1 71.80 / 66.35 /
# 61.25 % at 0.03 / 0.1 / 0.3; results/fashion_scenes_disjoint/README.md).
SUPERVISED_OPTS = ["SOLVER.EPOCHS", "2", "SOLVER.BASE_LR", "0.03"]
# The fixed partition: source = even class indices, target = odd (a rule, not a choice made on
# results); the committed study also runs the swapped partition.
DEFAULT_SOURCE = "0,2,4,6,8"
DEFAULT_TARGET = "1,3,5,7,9"
# Per task: the fine-tuning recipe and the folder name of its runs and reports.
RECIPES = {
    "detection": "detection/fashion_scenes_R_18_FPN_{init}.yaml",  # box and mask AP
    "sem_seg": "segmentation/fashion_scenes_R_18_FCN_{init}.yaml",  # mIoU
    "keypoints": "detection/fashion_scenes_R_18_FPN_keypoint_{init}.yaml",  # keypoint AP
}
TASK_DIRS = {"detection": "det", "sem_seg": "sem_seg", "keypoints": "keypoints"}
ARCH = "resnet18"
# Row folder: (label, config suffix, MOCO.INIT). The controls fine-tune with the MoCo recipe.
ROWS = {
    "moco": ("MoCo v2", "moco", "moco"),
    "sup": ("supervised", "sup", "supervised"),
    "random": ("random init", "random", "random"),
}
CONTROL_ROWS = {
    "random_bn": ("random init, BN calibrated (control)", "moco", "random-bn"),
    "moco_m0": ("MoCo v2, m 0 (control)", "moco", "moco"),  # labels hold no "="
}
USER_RECIPE = "detection/coco_format_R_FPN_{init}.yaml"  # --dataset rows: pretrained, random
SUPERVISED_LABEL = ROWS["sup"][0]  # a --weights row of this name is the supervised baseline
SCHEDULES = {"short": 1, "long": 3}  # factor on the config's SOLVER.MAX_ITER and SOLVER.STEPS
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")  # where the KEY VALUE overrides start
PARTITION_FILE = "partition.json"
DETECTRON2_INSTALL = (
    "pip install 'setuptools<81' && pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'"
)


def parse_classes(text: str, option: str) -> list[int]:
    """Fashion-MNIST class indices from ``"1,3,5"`` or names (``"Trouser,Dress"``, any case)."""
    by_name = {name.lower(): i for i, name in enumerate(FASHION_MNIST_CLASSES)}
    classes: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        index = int(item) if item.isdigit() else by_name.get(item.lower())
        if index is None or not 0 <= index < len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"{option}: {item!r} is not a Fashion-MNIST class (0-9 or one of"
                f" {', '.join(FASHION_MNIST_CLASSES)})"
            )
        if index in classes:
            raise ValueError(f"{option}: class {item!r} is named twice")
        classes.append(index)
    return classes


def partition_of(args: argparse.Namespace) -> dict[str, list]:
    """The source and target classes (indices and names); disjoint, or one line why not."""
    source = parse_classes(args.source_classes, "--source-classes")
    target = parse_classes(args.target_classes, "--target-classes")
    overlap = sorted(set(source) & set(target))
    if overlap:
        names = [FASHION_MNIST_CLASSES[c] for c in overlap]
        raise ValueError(
            f"--source-classes and --target-classes share {names}: they must be disjoint"
        )
    return {
        "source": [FASHION_MNIST_CLASSES[c] for c in source], "source_ids": source,
        "target": [FASHION_MNIST_CLASSES[c] for c in target], "target_ids": target,
    }  # fmt: skip


def check_partition(work: Path, partition: dict[str, list]) -> None:
    """Record the partition of ``work``; refuse another one there (its runs would mix)."""
    path = work / PARTITION_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != partition:
            raise ValueError(
                f"{work} holds runs of the partition source {recorded['source']} / target"
                f" {recorded['target']}, not {partition['source']} / {partition['target']}:"
                " choose another --work-dir"
            )
    else:
        atomic_write_json(path, partition)


def check_source(provenance: dict[str, Any], *, checkpoint: str | Path, source: list[str]) -> None:
    """Refuse a backbone whose record does not show it pretrained on exactly ``source``: its
    trials would claim a class-disjoint transfer they did not make."""
    classes = provenance.get("classes")
    if classes != source:
        recorded = f"records the classes {classes}" if classes else "records no training classes"
        raise ValueError(
            f"{checkpoint} {recorded}, not the source classes {source}: pretrain it with"
            f" DATA.CLASSES set to them (moco-pretrain writes the record into its checkpoints)"
        )


def check_scenes(scenes: Path, counts: dict[str, int], classes: list[str]) -> None:
    """Refuse to mix runs over scenes built from other garment counts or classes."""
    built = json.loads((scenes / SUMMARY_FILE).read_text())["counts"]
    built_classes = scene_classes(scenes)
    if built != counts or built_classes != classes:
        raise ValueError(
            f"{scenes} holds scenes built with {built} of {built_classes}, not {counts}"
            f" of {classes}: choose another --work-dir"
        )


def scaled_schedule(recipe: str, factor: int, opts: list[str]) -> list[str]:
    """``SOLVER.MAX_ITER`` / ``SOLVER.STEPS`` overrides: the config's (after ``opts``) x factor."""
    cfg = recipe_cfg(recipe, opts)
    steps = tuple(s * factor for s in cfg.SOLVER.STEPS)
    return ["SOLVER.MAX_ITER", str(cfg.SOLVER.MAX_ITER * factor), "SOLVER.STEPS", str(steps)]


def recipe_cfg(recipe: str, opts: list[str]):
    """The fine-tuning config of ``recipe`` with ``opts``, its ``MOCO.*`` values checked (one line
    naming a primary metric the task does not report, or overlapping partition classes)."""
    from .train_net import build_cfg

    return build_cfg(str(resolve_config_file(recipe)), opts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("output/fashion_scenes"))
    parser.add_argument(
        "--data-root", type=Path, default=None,
        help=f"Fashion-MNIST IDX folder (default: {FASHION_MNIST_DIR})",
    )  # fmt: skip
    parser.add_argument(
        "--source-classes", default=DEFAULT_SOURCE,
        help="classes (indices or names, comma-separated) the backbones are pretrained on",
    )  # fmt: skip
    parser.add_argument(
        "--target-classes", default=DEFAULT_TARGET,
        help="classes of the scenes' garments (the detector's classes); disjoint from the source",
    )  # fmt: skip
    parser.add_argument(
        "--labelled", type=int, default=1000,
        help="labelled training garments in the train scenes (class-balanced)",
    )  # fmt: skip
    parser.add_argument("--val-garments", type=int, default=300, help="garments, val scenes")
    parser.add_argument("--test-garments", type=int, default=1000, help="garments, test scenes")
    parser.add_argument(
        "--task", choices=list(RECIPES), default="detection",
        help="detection: Mask R-CNN, box and mask AP; sem_seg: the FCN, mIoU; keypoints: "
        "Keypoint R-CNN on the garments' extreme points, keypoint AP",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=1, help="fine-tunes per backbone")
    parser.add_argument(
        "--pretrain-seeds", type=int, default=1,
        help="pretraining runs (seeds 0..N-1) per pretrained row",
    )  # fmt: skip
    parser.add_argument(
        "--controls", action="store_true",
        help="add random init with BN calibrated on the source images, and MoCo with m = 0",
    )  # fmt: skip
    parser.add_argument(
        "--epoch-curve", type=int, nargs="+", default=[], metavar="EPOCH",
        help="fine-tune one longer MoCo run's checkpoints at these epochs (short schedule)",
    )  # fmt: skip
    parser.add_argument(
        "--schedules", nargs="+", choices=list(SCHEDULES), default=["short"],
        help="short: the config's schedule; long: 3x its iterations and lr steps",
    )  # fmt: skip
    parser.add_argument(
        "--eval-split", choices=("test", "val"), default="test",
        help="val: evaluate on the validation scenes (choose settings there, never on test)",
    )  # fmt: skip
    parser.add_argument("--pretrained", default=None, help="a MoCo ResNet-18 checkpoint to reuse")
    parser.add_argument("--pretrain-opts", default="", help="KEY VALUE overrides of the MoCo run")
    parser.add_argument("--supervised-opts", default="", help="KEY VALUE overrides, supervised run")
    parser.add_argument("--name", default="", help="suffix of the fine-tune folders (sweeps)")
    parser.add_argument(
        "--dataset", type=Path, default=None,
        help="a COCO-format dataset folder (train/val/test.json, or one annotations.json) "
        "instead of the embedded scenes; rows: random init and --weights",
    )  # fmt: skip
    parser.add_argument(
        "--weights", nargs="+", type=parse_weights, default=[], metavar="NAME=FILE",
        help="with --dataset: a row per checkpoint (a layout moco-convert detects, or a Detectron2"
        " .pkl); a row named"
        f" {SUPERVISED_LABEL!r} is the supervised baseline",
    )  # fmt: skip
    parser.add_argument("--arch", choices=ARCHS, default="resnet50", help="with --dataset")
    parser.add_argument(
        "--label-fractions", type=float, nargs="+", default=[1.0], metavar="F",
        help="nested, seeded subsets of the training images (the same for every row), each"
        " fine-tuned with the full schedule; a chart of AP against the fraction",
    )  # fmt: skip
    parser.add_argument(
        "--data-seed", type=int, default=0,
        help="the seed of the label-fraction subsets and of a single annotations.json's split",
    )  # fmt: skip
    parser.add_argument(
        "--frozen", action="store_true",
        help="frozen-backbone probe: the ResNet frozen (FREEZE_AT 5, frozen BN), only FPN and "
        "heads train; its own folders and reports (*-frozen), never pooled with fine-tuning",
    )  # fmt: skip
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE, every fine-tune")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    for option, value in (("--trials", args.trials), ("--pretrain-seeds", args.pretrain_seeds)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if any(e < 1 for e in args.epoch_curve):
        raise ValueError(f"--epoch-curve epochs must be at least 1, got {args.epoch_curve}")
    if args.pretrained and (args.pretrain_seeds > 1 or args.controls or args.epoch_curve):
        raise ValueError(
            "--pretrained replaces the MoCo pretraining: it takes no --pretrain-seeds above 1,"
            " --controls or --epoch-curve"
        )
    # all labels are always a fraction: the confirmatory comparisons and the controls use them
    args.label_fractions = check_fractions([*args.label_fractions, 1.0])
    if args.task != "detection" and args.label_fractions != [1.0]:
        raise ValueError(f"--label-fractions: the {args.task} task trains on all labels")
    if args.dataset is None:
        if args.weights:
            raise ValueError(
                "--weights rows need --dataset (the embedded benchmark builds its own)"
            )
        return
    defaults = build_parser().parse_args([])
    embedded_only = ("pretrained", "controls", "epoch_curve", "pretrain_seeds", "task", "data_root",
                     "source_classes", "target_classes", "labelled", "val_garments",
                     "test_garments", "pretrain_opts", "supervised_opts")  # fmt: skip
    given = [f"--{d.replace('_', '-')}" for d in embedded_only
             if getattr(args, d) != getattr(defaults, d)]  # fmt: skip
    if given:
        raise ValueError(f"--dataset compares --weights rows with random init: {given} belong to"
                         " the embedded benchmark")  # fmt: skip
    folders = [slug(name) for name, _ in args.weights]
    labels = [name for name, _ in args.weights]
    if len(set(folders)) != len(folders) or "random" in folders or ROWS["random"][0] in labels:
        raise ValueError(
            f"--weights: row names must be distinct (as folder names), not 'random' and not"
            f" {ROWS['random'][0]!r}"
        )


def parse_weights(text: str) -> tuple[str, Path]:
    """``NAME=FILE`` of ``--weights``."""
    name, sep, file = text.partition("=")
    if not (sep and name and file):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, Path(file)


@dataclass(frozen=True)
class Row:
    """A row of the comparison: its label, fine-tuning recipe and initialisation."""

    label: str
    recipe: str
    init: str  # MOCO.INIT
    weights: dict[int, Path] | None = None  # Detectron2 weights per pretraining seed; None: random
    main: bool = True  # fine-tuned on every schedule and label fraction (a control: short, all)


def depth_options(arch: str) -> list[str]:
    """``MODEL.RESNETS`` overrides for a torchvision ``arch`` (BasicBlock depths need 64)."""
    depth = int(arch.removeprefix("resnet"))
    return ["MODEL.RESNETS.DEPTH", str(depth),
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64" if depth < 50 else "256"]  # fmt: skip


def run(args: argparse.Namespace) -> None:
    work: Path = args.work_dir
    has_detectron2 = importlib.util.find_spec("detectron2") is not None
    command = shlex.join(["moco-benchmark", *sys.argv[1:]])
    if args.dataset is not None:
        if not has_detectron2:
            raise ValueError(f"--dataset needs detectron2; install it with: {DETECTRON2_INSTALL}")
        rows, dataset, pipeline = dataset_rows(args, work, command)
        base_opts = [*device_options(), *depth_options(args.arch)]
        seeds, scene_opts = range(1), None

        def title(schedule: str) -> str:
            return f"\n# {args.dataset}, {schedule} schedule, {args.eval_split} split"

        curve: dict[int, Path] = {}
    else:
        partition = partition_of(args)
        recipe_opts = [
            "MOCO.PARTITION.SOURCE", str(partition["source"]),
            "MOCO.PARTITION.TARGET", str(partition["target"]), *args.opts,
        ]  # fmt: skip
        if has_detectron2:  # bad fine-tuning values fail now, before hours of pretraining
            for suffix in ("moco", "sup", "random"):
                recipe_cfg(RECIPES[args.task].format(init=suffix), recipe_opts)
        work.mkdir(parents=True, exist_ok=True)
        check_partition(work, partition)
        pipeline = Pipeline(work, command=command)
        built = embedded_rows(args, pipeline, partition, has_detectron2)
        if built is None:
            return
        rows, curve, scenes = built
        base_opts, seeds = recipe_opts[:4], range(args.pretrain_seeds)  # the partition
        dataset, scene_opts = None, None  # the scenes' detection files are a COCO dataset
        if args.task == "detection":
            dataset = prepare_coco_dataset(scenes, work / "fractions", tag="fashion_scenes",
                                           fractions=args.label_fractions)  # fmt: skip
        else:
            scene_opts = scene_options(args.task, scenes, args.eval_split)

        def title(schedule: str) -> str:
            return (f"\n# Fashion-MNIST scenes, {args.task}, {schedule} schedule, {args.eval_split}"
                    f" scenes; source {partition['source']}, target {partition['target']}")  # fmt: skip

        default_partition = partition == partition_of(build_parser().parse_args([]))
    task_dir = TASK_DIRS[args.task]
    fractions = args.label_fractions
    by_fraction = fractions != [1.0]

    def fine_tune(recipe: str, folder: Path, pkl: Path | None, trials: int, *, init: str,
                  schedule: str, data: list[str], step: str) -> None:  # fmt: skip
        tail = [*frozen_options(args.frozen), *args.opts]
        opts = [*data, *base_opts, "MOCO.INIT", init, *tail]
        opts += scaled_schedule(recipe, SCHEDULES[schedule], [*base_opts, *tail])
        pipeline.fine_tune(recipe, folder, weights=pkl, trials=trials, opts=opts, step=step)

    for schedule in args.schedules:
        run_name = (schedule + ("-val" if args.eval_split == "val" else "")
                    + ("-frozen" if args.frozen else "") + args.name)  # fmt: skip
        step = run_name if args.task == "detection" else f"{task_dir}/{run_name}"
        short = schedule == "short"  # the long schedule: main rows, first pretraining seed
        output = Path("report", step)
        fraction_folders: dict[float, dict[str, Path]] = {}
        for fraction in fractions:
            data = dataset.options(fraction, eval_split=args.eval_split) if dataset else scene_opts
            # all labels in the run's own folders, as without --label-fractions
            subset = [f"f{fraction:g}"] if fraction != 1 else []
            base = Path(task_dir, run_name, *subset)
            full = fraction == 1
            report_rows = []
            for key, row in rows.items():
                if not row.main and not (short and full):
                    continue
                out = base / key
                runs = [(out, None, args.trials * (len(seeds) if short else 1))]
                if row.weights is not None:
                    used = sorted(row.weights) if short else sorted(row.weights)[:1]
                    runs = [(out / f"seed_{s}", row.weights[s], args.trials) for s in used]
                for folder, pkl, trials in runs:
                    fine_tune(row.recipe, folder, pkl, trials, init=row.init, schedule=schedule,
                              data=data, step=f"fine_tune/{step}/{key}")  # fmt: skip
                report_rows.append((row.label, work / out))
            fraction_folders[fraction] = {label: folder for label, folder in report_rows}
            where = output.joinpath(*subset)
            labels = f", {fraction:g} of the training labels" if by_fraction else ""
            print(title(schedule) + labels + "\n")
            if args.dataset is None:
                # The protocol's confirmatory comparisons: MoCo against the two baselines, short
                # schedule, all labels, the default partition, test scenes, fine-tuned end to
                # end; everything else is secondary.
                primary = (short and full and args.eval_split == "test" and default_partition
                           and not args.frozen)  # fmt: skip
                pipeline.report(report_rows, where, supervised=ROWS["sup"][0],
                                random=ROWS["random"][0],
                                confirmatory=[ROWS["moco"][0]] if primary else [])  # fmt: skip
            else:
                # Declared here, before any result: every --weights row against random init on
                # the recipe's primary metric, all labels, short schedule, test split.
                primary = short and full and args.eval_split == "test" and not args.frozen
                pretrained = [r.label for r in rows.values() if r.weights is not None]
                supervised = SUPERVISED_LABEL if SUPERVISED_LABEL in pretrained else None
                confirmatory = [label for label in pretrained if label != supervised]
                pipeline.report(report_rows, where, supervised=supervised,
                                random=ROWS["random"][0],
                                confirmatory=confirmatory if primary else [])  # fmt: skip
            if args.controls and short and full:
                # What a control is for: its contrast with MoCo, the first baseline of this
                # report (its CSV's *_supervised columns), and with random init; all secondary.
                folders = dict(report_rows)
                control_rows = [(ROWS[r][0], folders[ROWS[r][0]]) for r in ("moco", "random")]
                control_rows += [(label, folders[label]) for label, *_ in CONTROL_ROWS.values()]
                pipeline.report(control_rows, where / "controls", supervised=ROWS["moco"][0],
                                random=ROWS["random"][0], confirmatory=[])  # fmt: skip
        if by_fraction:
            metrics = ["bbox/AP", "bbox/AP50", "bbox/AP75"]
            metrics += ["segm/AP"] if dataset is not None and dataset.masks else []
            for metric in metrics:
                name = metric.replace("/", "_")
                plot_curves(
                    {label: {f: folders[label] for f, folders in fraction_folders.items()}
                     for label in fraction_folders[1.0]
                     if all(label in folders for folders in fraction_folders.values())},
                    metric=metric, path=work / output / f"{name}_vs_label_fraction.png",
                    xlabel="fraction of the training labels", spread="ci95",
                )  # fmt: skip
        if curve and short:
            curve_dirs = {}
            full_data = dataset.options(1.0, eval_split=args.eval_split) if dataset else scene_opts
            for epoch, pkl in curve.items():
                curve_dirs[epoch] = Path(task_dir, run_name, "epochs", f"epoch_{epoch}")
                fine_tune(RECIPES[args.task].format(init="moco"), curve_dirs[epoch], pkl,
                          args.trials, init="moco", schedule=schedule,
                          data=full_data, step=f"fine_tune/{step}/epochs")  # fmt: skip
            metric = recipe_cfg(RECIPES[args.task].format(init="moco"), recipe_opts)
            full_folders = fraction_folders[1.0]
            plot_curves(
                {"MoCo v2, one run": {epoch: work / folder for epoch, folder in curve_dirs.items()}},
                bands={ROWS[r][0]: full_folders[ROWS[r][0]] for r in ("sup", "random")},
                metric=metric.MOCO.PRIMARY_METRIC, path=work / output / "ap_vs_epochs.png",
                xlabel="MoCo pretraining epochs", xscale="log",
            )  # fmt: skip


def frozen_options(frozen: bool) -> list[str]:
    """``--frozen``: the whole ResNet frozen (``FREEZE_AT`` 5, frozen BN); FPN and heads train."""
    return ["MODEL.BACKBONE.FREEZE_AT", "5", "MODEL.RESNETS.NORM", "FrozenBN"] if frozen else []


def embedded_rows(
    args: argparse.Namespace, pipeline: Pipeline, partition: dict[str, list], has_detectron2: bool
) -> tuple[dict[str, Row], dict[int, Path], Path] | None:
    """The scenes of the target classes and the embedded rows' weights (MoCo, supervised, the
    controls per pretraining seed) with the epoch curve's; None without detectron2 (after MoCo
    and its feature comparison)."""
    work = pipeline.work
    data = ["DATA.ROOT", str(args.data_root)] if args.data_root else []
    source = [*data, "DATA.CLASSES", str(partition["source_ids"])]
    scenes = work / "scenes"
    if has_detectron2:
        counts = {"num_labelled": args.labelled, "num_val": args.val_garments,
                  "num_test": args.test_garments}  # fmt: skip
        if not (scenes / SUMMARY_FILE).is_file():  # rebuilt whole when unfinished
            root = args.data_root or FASHION_MNIST_DIR
            pipeline.timed("scenes", build_fashion_scenes, scenes, root=root,
                           classes=partition["target_ids"], **counts)  # fmt: skip
        check_scenes(scenes, counts, partition["target"])
    seeds = range(args.pretrain_seeds)
    moco_opts = [*source, *shlex.split(args.pretrain_opts)]
    moco: dict[int, Path] = {0: Path(args.pretrained)} if args.pretrained else {}
    for seed in seeds if not args.pretrained else ():
        summary = pipeline.pretrain(PRETRAIN_RECIPE, f"moco/seed_{seed}",
                                    [*moco_opts, "SEED", str(seed)], step=f"pretrain/seed_{seed}")  # fmt: skip
        if seed == 0:
            print("\n".join(feature_comparison(summary)))
        moco[seed] = Path(summary["checkpoint"])
    if not has_detectron2:
        print(
            "moco-benchmark: detectron2 is not installed, so the detection benchmark did not run;"
            f" install it with: {DETECTRON2_INSTALL}"
        )
        return None

    def convert(row: str, checkpoints: dict[int, Path]) -> dict[int, Path]:
        """Per pretraining seed, ``weights/<row>_seedS.pkl`` (one line if a checkpoint is not a
        ResNet-18 of the source classes)."""
        return {
            s: pipeline.convert(c, f"weights/{row}_seed{s}.pkl", arch=ARCH,
                                check=partial(check_source, checkpoint=c,
                                              source=partition["source"]))
            for s, c in checkpoints.items()
        }  # fmt: skip

    def trained(train, recipe: str, folder: str, opts: list[str], step: str) -> dict[int, Any]:
        """Per pretraining seed, ``train(recipe, folder/seed_S, opts + SEED)``: a pipeline step."""
        return {
            s: train(recipe, f"{folder}/seed_{s}", [*opts, "SEED", str(s)], step=f"{step}/seed_{s}")
            for s in seeds
        }

    pkls = {"moco": convert("moco", moco)}
    supervised_opts = [*source, *SUPERVISED_OPTS, *shlex.split(args.supervised_opts)]
    pkls["sup"] = convert(
        "sup",
        trained(
            pipeline.supervised, SUPERVISED_RECIPE, "supervised", supervised_opts, "supervised"
        ),
    )
    rows = {
        key: Row(label, RECIPES[args.task].format(init=suffix), init, pkls.get(key))
        for key, (label, suffix, init) in ROWS.items()
    }
    if args.controls:
        from moco_pretrain.controls import RANDOM_BN_FILE, run_random_bn

        no_eval = ["KNN.FINAL", "False", "KNN.MONITOR_PERIOD", "0"]
        m0 = [*moco_opts, *no_eval, "MODEL.M", "0.0"]
        random_bn = partial(pipeline.run, run_random_bn, done=RANDOM_BN_FILE)  # its checkpoint
        pkls["random_bn"] = convert(
            "random_bn",
            trained(random_bn, PRETRAIN_RECIPE, "random_bn", moco_opts, "controls/random_bn"),
        )
        m0_runs = trained(pipeline.pretrain, PRETRAIN_RECIPE, "moco_m0", m0, "controls/moco_m0")
        pkls["moco_m0"] = convert(
            "moco_m0", {s: Path(summary["checkpoint"]) for s, summary in m0_runs.items()}
        )
        rows |= {
            key: Row(label, RECIPES[args.task].format(init=suffix), init, pkls[key], main=False)
            for key, (label, suffix, init) in CONTROL_ROWS.items()
        }
    curve = (
        epoch_curve_weights(pipeline, args, moco_opts, partition["source"])
        if args.epoch_curve
        else {}
    )
    return rows, curve, scenes


def dataset_rows(
    args: argparse.Namespace, work: Path, command: str
) -> tuple[dict[str, Row], CocoDataset, Pipeline]:
    """``--dataset``: random init and one row per ``--weights NAME=FILE``, each file converted
    with ``--arch`` (a ``.pkl`` that ``moco-convert`` wrote for ``--arch`` used as it is). Every
    input is checked (the weights converted in memory, a ``.pkl`` read without running anything
    in it, the dataset read) before anything is written."""
    recipe = USER_RECIPE.format(init="pretrained")
    opts = [*device_options(), *depth_options(args.arch), *frozen_options(args.frozen), *args.opts]
    for init in ("pretrained", "random"):
        recipe_cfg(USER_RECIPE.format(init=init), opts)
    pkls = {
        name: checkpoint if checkpoint.suffix == ".pkl" else work / "weights" / f"{slug(name)}.pkl"
        for name, checkpoint in args.weights
    }
    converted = {}  # written once the dataset is checked too
    for name, checkpoint in args.weights:
        if checkpoint.suffix == ".pkl":
            check_given_pkl(checkpoint, args.arch, name)
            check_finished_trials(work, slug(name), checkpoint)
        elif pkls[name].is_file():
            check_converted(pkls[name], checkpoint, args.arch)
        else:
            backbone = load_backbone_state_dict(checkpoint)
            converted[name] = convert_to_detectron2(backbone, arch=args.arch)
    dataset = prepare_coco_dataset(args.dataset, work / "data", fractions=args.label_fractions,
                                   seed=args.data_seed)  # fmt: skip
    pipeline = Pipeline(work, command=command)
    rows = {"random": Row(ROWS["random"][0], USER_RECIPE.format(init="random"), "random")}
    for name, _ in args.weights:
        if name in converted:
            write_detectron2_pkl(converted.pop(name), pkls[name])
        rows[slug(name)] = Row(name, recipe, "pretrained", {0: pkls[name]})
    return rows, dataset, pipeline


def check_given_pkl(pkl: Path, arch: str, name: str) -> None:
    """A ``.pkl`` row: one that ``moco-convert`` wrote for ``arch`` (its provenance says so)."""
    if not pkl.is_file():
        raise FileNotFoundError(f"--weights {name}={pkl}: not found")
    provenance = converted_provenance(pkl)
    if provenance is None or provenance.get("converted_as") != arch:
        recorded = (
            f"converted as {provenance.get('converted_as')}" if provenance else "no provenance"
        )
        raise ValueError(
            f"--weights {name}={pkl}: not a moco-convert .pkl of a {arch} backbone ({recorded}):"
            f" pass its source checkpoint, or convert that with moco-convert --arch {arch}"
        )


def check_finished_trials(work: Path, key: str, pkl: Path) -> None:
    """Refuse weights other than those the row's finished trials trained from (they would be
    reported under this row)."""
    sha256 = file_sha256(pkl)
    for path in work.rglob(RESULTS_FILE):
        trial_weights = read_results(path).get("weights") or {}
        if path.parents[2].name == key and trial_weights.get("checkpoint_sha256") != sha256:
            raise ValueError(
                f"{path.parent} trained from other weights than {pkl}: give the row another"
                " name or choose another --work-dir"
            )


def check_converted(pkl: Path, checkpoint: Path, arch: str) -> None:
    """Refuse a row's weights converted earlier from another file or for another ``--arch``
    (its finished trials would be reported under this row)."""
    provenance = converted_provenance(pkl) or {}
    recorded = (provenance.get("source_sha256"), provenance.get("converted_as"))
    if not provenance:
        raise ValueError(f"{pkl} has no moco-convert provenance: choose another --work-dir")
    if recorded != (file_sha256(checkpoint), arch):
        raise ValueError(
            f"{pkl} was converted from {provenance.get('source')} as {recorded[1]}, not from"
            f" {checkpoint} as {arch}: give the row another name or choose another --work-dir"
        )


def device_options() -> list[str]:
    """``MODEL.DEVICE cpu`` on a machine without CUDA (the recipe's default is cuda)."""
    import torch

    return [] if torch.cuda.is_available() else ["MODEL.DEVICE", "cpu"]


def slug(name: str) -> str:
    """A folder name for a row label."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def epoch_curve_weights(
    pipeline: Pipeline, args: argparse.Namespace, moco_opts: list[str], source: list[str]
) -> dict[int, Path]:
    """One MoCo run of max(``--epoch-curve``) epochs (seed 0, every checkpoint kept); its
    converted checkpoints at those epochs."""
    epochs = sorted(set(args.epoch_curve))
    opts = [*moco_opts, "SOLVER.EPOCHS", str(epochs[-1]), "TRAIN.KEEP_LAST", "0",
            "KNN.FINAL", "False", "SEED", "0"]  # fmt: skip
    pipeline.pretrain(PRETRAIN_RECIPE, "moco_curve", opts, step="epoch_curve/pretrain")
    checkpointer = Checkpointer(pipeline.path("moco_curve"))
    weights = {}
    for e in epochs:
        checkpoint = checkpointer.path_for(e - 1)
        weights[e] = pipeline.convert(checkpoint, f"weights/moco_curve_ep{e}.pkl", arch=ARCH,
                                      check=partial(check_source, checkpoint=checkpoint,
                                                    source=source))  # fmt: skip
    return weights


def _values(folder: Path, metric: str) -> list[float]:
    values = [read_results(p)["metrics"].get(metric) for p in sorted(folder.rglob(RESULTS_FILE))]
    return [v for v in values if v is not None and not math.isnan(v)]


def plot_curves(
    lines: dict[str, dict[float, Path]], *, metric: str, path: Path, xlabel: str,
    xscale: str = "linear", bands: dict[str, Path] | None = None, spread: str = "std",
) -> None:  # fmt: skip
    """``metric`` over the trials under each folder: per label, one line over x with the trials'
    mean and ± std (``spread="ci95"``: the 95 % t interval of the mean,
    :func:`moco_pretrain.comparison.mean_interval`); ``bands`` as horizontal mean ± std bands; a
    PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(values: list[float]) -> tuple[float, float, float]:
        sample = Sample.of(values)
        if spread == "ci95":
            low, high = mean_interval(values)
            return sample.mean, sample.mean - low, high - sample.mean
        std = 0.0 if math.isnan(sample.std) else sample.std
        return sample.mean, std, std

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, folder), colour in zip(
        (bands or {}).items(), ("tab:green", "tab:grey"), strict=False
    ):
        mean, std, _ = point(_values(folder, metric))
        ax.axhspan(mean - std, mean + std, color=colour, alpha=0.2)
        ax.axhline(mean, color=colour, label=f"{label} (mean ± std)")
    for label, folders in lines.items():
        xs = sorted(folders)
        means, below, above = zip(*(point(_values(folders[x], metric)) for x in xs), strict=True)
        ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=label)
    ax.set(xscale=xscale, xlabel=xlabel, ylabel=metric)
    xs = sorted({x for folders in lines.values() for x in folders})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None}))
    plt.close(fig)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut before its first config key (``SOLVER.MAX_ITER``, ...) that is not an
    option's value: the options, and the ``KEY VALUE`` overrides, which list options
    (``--weights``, ``--label-fractions``) would otherwise take as their values."""
    argv = list(argv)
    first = next(
        (i for i, a in enumerate(argv)
         if CONFIG_KEY.fullmatch(a) and (i == 0 or not argv[i - 1].startswith("-"))),
        len(argv),
    )  # fmt: skip
    return argv[:first], argv[first:]


def main(argv: list[str] | None = None) -> None:
    options, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(options)
    args.opts = [*args.opts, *overrides]
    with exit_on_user_error("moco-benchmark"):
        check_arguments(args)
        run(args)


if __name__ == "__main__":
    main()
