#!/usr/bin/env python
"""The GPU device check: every CUDA claim of the package measured in one run of at most 8 minutes.

Each part is a subprocess with its own time cap, so that a hang or a CUDA crash in one part
cannot take the others down; a part over its cap is killed, recorded as "timed out", and the
next part runs. In order:

1. ``machine``: GPU, driver, CUDA, torch, Python, CPU cores; whether detectron2 imports;
2. ``gpu_tests``: the tests marked ``gpu`` (device augmentation without host syncs, fp32 and NCHW
   by default, the opt-in bf16 autocast and channels-last against fp32, fused SGD, the momentum
   update, no host sync in a step, compile);
3. ``model``: ``tools/pretrain_speed.py``, ResNet-50, 224 px, batch 256, K 65536, v2 head,
   model only: ours at the defaults (fp32, NCHW, as the official code) vs the official-behaviour
   baseline (images/s, peak memory, step split);
4. ``model_bf16``: 3 with ours opted in to bf16 autocast and channels-last
   (``TRAIN.AMP_DTYPE bf16 TRAIN.CHANNELS_LAST True``), the baseline still fp32;
5. ``profile``: a few hundred milliseconds of ``torch.profiler`` per variant of 3: kernels by
   share of the device time, the step's time in kernels, host syncs per step;
6. ``e2e``: 3 end to end, ours with the device augmentation, from a folder of synthetic JPEGs
   written here (the baseline with the CPU recipe), against 3's model-only images/s;
7. ``compile`` and 8. ``compile_profile``: 3 and 5 for ours with ``TRAIN.COMPILE True``;
9. ``fashion_mnist``: ``moco-pretrain``'s Fashion-MNIST demo recipe on the GPU (images/s, kNN
   and linear probe at the end);
10. ``scenes``: ``moco-benchmark --trials 1`` (one fine-tune per initialisation), which reads
    9's pretraining back; skipped, with the reason, where detectron2 does not import.

The output folder gets ``device_check.json``, ``README.md`` (the tables) and
``device_check.log`` (the end of each part's output), rewritten after every part. ``--dry-run``
runs every part at toy sizes on the CPU, in under a minute on 2 cores, to check this script
where there is no GPU: ``CUDA_VISIBLE_DEVICES=""``, one thread, ``TORCH_COMPILE_DISABLE=1``
(compiling takes a minute on a CPU; the GPU run compiles), tiny Fashion-MNIST files of its own.
Nothing is installed::

    python tools/device_check.py --output results/gpu
    python tools/device_check.py --dry-run --output /tmp/device_check
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import gzip
import importlib
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

# This process never imports torch: a crash or a hang on the device stays inside its part.
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RESULT_FILE, TABLES_FILE, LOG_FILE = "device_check.json", "README.md", "device_check.log"
CAPS_S = {
    "machine": 45, "gpu_tests": 90, "model": 120, "model_bf16": 120, "profile": 60, "e2e": 150,
    "compile": 180, "compile_profile": 90, "fashion_mnist": 100, "scenes": 480,
}  # fmt: skip
PARTS = tuple(CAPS_S)
MIN_PART_S = 5  # a part that would get less of the time budget is skipped
LOG_TAIL_LINES = 300  # of each part's output, in device_check.log
TOP_KERNELS = 12
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
BF16 = ("TRAIN.AMP_DTYPE", "bf16", "TRAIN.CHANNELS_LAST", "True")  # the opt-in pair
TARGETS = {  # name: (what, comparison, bound)
    "model_speedup_fp32": ("ours/baseline images/s, model only, both fp32", ">=", 1.0),
    "model_speedup": ("ours bf16 channels-last / baseline images/s, model only", ">=", 2.5),
    "model_peak_memory": ("ours bf16 channels-last / baseline peak memory, model only", "<=", 0.6),
    "e2e_of_model_only": ("ours end to end with the device augmentation / model only", ">=", 0.8),
}


class Timing(NamedTuple):
    """``pretrain_speed.py``'s timed steps per round, untimed warm-up steps and rounds."""

    steps: int
    warmup: int
    rounds: int = 1

    def args(self) -> list[str]:
        return [
            "--steps",
            str(self.steps),
            "--warmup",
            str(self.warmup),
            "--rounds",
            str(self.rounds),
        ]


class Sizes(NamedTuple):
    """What the parts run: the targets' sizes on a GPU, toy sizes in a dry run."""

    device: str
    threads: int  # torch CPU threads of the speed runs (0: torch's default)
    workers: int  # DATA.NUM_WORKERS
    arch: str
    image_size: int
    batch_size: int
    K: int
    model: Timing
    compile: Timing
    e2e: Timing
    profile: Timing
    jpeg_size: tuple[int, int]  # width, height
    jpeg_unique: int  # distinct JPEGs, hard-linked up to e2e.steps batches
    fashion_opts: tuple[str, ...]  # overrides of the pretraining and supervised recipes
    scenes_args: tuple[str, ...]
    fine_tune_opts: tuple[str, ...]

    def model_opts(self) -> list[str]:
        """MoCo v2 (MLP head, T 0.2, v2 augmentation) at these sizes."""
        return [
            "MODEL.ARCH", self.arch, "DATA.IMAGE_SIZE", str(self.image_size),
            "SOLVER.BATCH_SIZE", str(self.batch_size), "MODEL.K", str(self.K),
            "MODEL.MLP", "True", "MODEL.T", "0.2", "DATA.AUG", "v2",
        ]  # fmt: skip


def gpu_sizes(cpu_count: int) -> Sizes:
    return Sizes(
        device="cuda", threads=0, workers=max(1, cpu_count - 2),
        arch="resnet50", image_size=224, batch_size=256, K=65536,
        model=Timing(steps=20, warmup=3, rounds=3),
        compile=Timing(steps=20, warmup=3, rounds=2),  # the warm-up compiles
        # Many steps: the loader's first wave of prefetched batches must be a small part of them.
        e2e=Timing(steps=64, warmup=2, rounds=2),
        profile=Timing(steps=3, warmup=3),
        jpeg_size=(500, 375), jpeg_unique=256,  # ImageNet's typical size
        fashion_opts=(), scenes_args=(), fine_tune_opts=("MODEL.DEVICE", "cuda"),
    )  # fmt: skip


DRY_RUN_SIZES = Sizes(
    device="cpu", threads=1, workers=0, arch="resnet18", image_size=32, batch_size=8, K=64,
    model=Timing(steps=2, warmup=1), compile=Timing(steps=2, warmup=1),
    e2e=Timing(steps=2, warmup=1), profile=Timing(steps=2, warmup=1),
    jpeg_size=(64, 48), jpeg_unique=4,
    fashion_opts=(
        "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "DATA.MAX_SAMPLES", "16",
        "MODEL.BN_SPLITS", "2", "KNN.BATCH_SIZE_PER_PROCESS", "40", "KNN.NEIGHBORS", "20",
        "DATA.HOLDOUT", "8",
    ),
    # the 5 target classes' 8 training and 4 test images each
    scenes_args=("--labelled", "20", "--val-garments", "10", "--test-garments", "10"),
    fine_tune_opts=(
        "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
    ),
)  # fmt: skip


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Part(NamedTuple):
    """A subprocess, the file it leaves its result in, and how to read that file."""

    name: str
    command: list[str]
    result_path: Path
    read_result: Callable[[Path], Any] = read_json
    skip_reason: str = ""


# ----------------------------------------------------------------------------- the parts
def python(*args: Any) -> list[str]:
    return [sys.executable, *map(str, args)]


def speed_part(name: str, sizes: Sizes, work: Path, timing: Timing, *args: str) -> Part:
    """``pretrain_speed.py`` at these sizes; ``args``: its options, then config overrides."""
    result = work / f"{name}.json"
    command = python(
        ROOT / "tools" / "pretrain_speed.py", "--device", sizes.device,
        "--threads", sizes.threads, *timing.args(), "--json", result, *args,
    )  # fmt: skip
    return Part(name, command, result)


def profile_part(name: str, sizes: Sizes, work: Path, variants: list[str], *opts: str) -> Part:
    result = work / f"{name}.json"
    command = python(
        SCRIPT, "profile", "--device", sizes.device, "--threads", sizes.threads,
        "--warmup", sizes.profile.warmup, "--steps", sizes.profile.steps, "--json", result,
        *(f"--variant={variant}" for variant in variants), *sizes.model_opts(), *opts,
    )  # fmt: skip
    return Part(name, command, result)


def read_junit(path: Path) -> dict[str, Any]:
    """Outcome per test (``module::name``) and the counts, from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"  # fmt: skip
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return {"counts": dict(collections.Counter(outcomes.values())), "tests": outcomes}


def read_pretraining(path: Path) -> dict[str, Any]:
    """Images/s per epoch, the last epoch's loss and contrastive top-1, kNN and linear probe."""
    summary = read_json(path)
    last = summary["epochs"][-1]
    features = {
        key: summary[key]
        for key in ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init")
    }
    return {
        "images_per_s_per_epoch": [epoch["images_per_s"] for epoch in summary["epochs"]],
        "train_seconds": summary["train_seconds"],
        "loss": last["loss"], "acc1": last["acc1"], **features,
    }  # fmt: skip


def read_scenes(path: Path) -> dict[str, Any]:
    """Seconds per step of ``moco-benchmark`` and the mean of every metric per initialisation."""
    metrics: dict[str, dict[str, float]] = collections.defaultdict(dict)
    with (path.parent / "report" / "short" / "report.csv").open() as f:
        for row in csv.DictReader(f):
            metrics[row["row"]][row["metric"]] = float(row["mean"])
    return {"seconds": read_json(path)["seconds"], "metrics": dict(metrics)}


def write_jpeg_folder(root: Path, *, images: int, unique: int, size: tuple[int, int]) -> Path:
    """``root/train/synthetic/<n>.jpg``: ``unique`` smooth random JPEGs, hard-linked up to
    ``images`` files (each costs a full decode; the disk holds ``unique``)."""
    import numpy as np
    from PIL import Image

    folder = root / "train" / "synthetic"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    width, height = size
    for n in range(unique):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.BICUBIC).save(folder / f"{n}.jpg", quality=90)
    for n in range(unique, images):
        os.link(folder / f"{n % unique}.jpg", folder / f"{n}.jpg")
    return root


def write_tiny_fashion_mnist(root: Path) -> Path:
    """Fashion-MNIST's four IDX files with 10 classes x 8 train / 4 test images of 28x28 px;
    class c is a bright band at rows 2c..2c+6 (enough for every part to run, in seconds)."""
    import numpy as np

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 8), ("t10k", 4)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 60, (labels.size, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 6] += 180
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(f">4B{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    return root


def has_fashion_mnist(root: Path) -> bool:
    return any((root / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz"))


def plan(args: argparse.Namespace, machine: dict[str, Any], work: Path) -> list[Part]:
    """Every part after ``machine``, with a skip reason where it cannot or should not run."""
    sizes = DRY_RUN_SIZES if args.dry_run else gpu_sizes(machine["cpu_count"])
    workers = ["DATA.NUM_WORKERS", str(sizes.workers)]
    fashion = args.fashion_mnist or Path(machine["fashion_mnist_dir"])
    if args.dry_run and not args.fashion_mnist:
        fashion = write_tiny_fashion_mnist(work / "fashion_mnist")
    jpegs = work / "jpegs"
    recipe_opts = [*workers, *sizes.fashion_opts]  # of the pretraining and supervised runs
    parts = [
        Part("gpu_tests", python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                 "--junitxml", work / "gpu_tests.xml", ROOT / "tests"),
             work / "gpu_tests.xml", read_junit),
        speed_part("model", sizes, work, sizes.model, *sizes.model_opts()),
        speed_part("model_bf16", sizes, work, sizes.model, *sizes.model_opts(), *BF16),
        profile_part("profile", sizes, work, ["ours", "baseline"]),
        speed_part("e2e", sizes, work, sizes.e2e, "--mode", "e2e", "--aug", "device",
                       *sizes.model_opts(), "DATA.ROOT", str(jpegs), *workers),
        speed_part("compile", sizes, work, sizes.compile, *sizes.model_opts(),
                       "TRAIN.COMPILE", "True"),
        profile_part("compile_profile", sizes, work, ["ours"], "TRAIN.COMPILE", "True"),
        # moco-benchmark's first MoCo run (source classes, seed 0), which "scenes" reads back
        Part("fashion_mnist", python("-m", "moco_pretrain.cli.pretrain", "--config-file",
                                     "pretrain/fashion_mnist_demo.yaml", "DATA.ROOT", fashion,
                                     "DATA.CLASSES", "[0, 2, 4, 6, 8]", *recipe_opts, "SEED", "0",
                                     "OUTPUT_DIR", work / "scenes" / "moco" / "seed_0"),
             work / "scenes" / "moco" / "seed_0" / "summary.json", read_pretraining),
        Part("scenes", python("-m", "transfer.benchmark", "--work-dir", work / "scenes",
                              "--data-root", fashion, "--trials", "1", *sizes.scenes_args,
                              "--pretrain-opts", shlex.join(recipe_opts),
                              "--supervised-opts", shlex.join(recipe_opts),
                              *sizes.fine_tune_opts),
             work / "scenes" / "benchmark.json", read_scenes),
    ]  # fmt: skip
    parts = [
        part._replace(skip_reason=skip_reason(part.name, args, machine, fashion)) for part in parts
    ]
    if not skip_reason("e2e", args, machine, fashion):
        batches = sizes.e2e.steps * sizes.batch_size
        write_jpeg_folder(jpegs, images=batches, unique=sizes.jpeg_unique, size=sizes.jpeg_size)
    return parts


def skip_reason(name: str, args: argparse.Namespace, machine: dict[str, Any], fashion: Path) -> str:
    if not (args.dry_run or machine["cuda_available"]):
        return "no CUDA device (torch.cuda.is_available() is False); --dry-run runs on a CPU"
    if args.parts and name not in args.parts:
        return "not selected (--parts)"
    if name in ("fashion_mnist", "scenes") and not has_fashion_mnist(fashion):
        return (
            f"no Fashion-MNIST in {fashion}: apt-get install dataset-fashion-mnist, or pass"
            " --fashion-mnist DIR"
        )
    if name == "scenes" and machine["detectron2_error"]:
        return f"detectron2 does not import ({machine['detectron2_error']}); install it to run it"
    return ""


# ----------------------------------------------------------------------------- running
class Runner:
    """Runs parts one after the other inside the time budget; appends their output to the log."""

    def __init__(
        self, *, log: Path, env: dict[str, str], deadline: float, caps_s: dict[str, float]
    ):
        self.log, self.env, self.deadline, self.caps_s = log, env, deadline, caps_s

    def run(self, part: Part) -> dict[str, Any]:
        cap = self.caps_s[part.name]
        record: dict[str, Any] = {"status": "skipped", "cap_s": cap, "seconds": 0.0}
        left = self.deadline - time.monotonic()
        if part.skip_reason or left < MIN_PART_S:
            record["reason"] = part.skip_reason or f"the time budget is spent ({left:.0f} s left)"
            return record
        record["command"] = shlex.join(part.command)
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as out:
            process = subprocess.Popen(
                part.command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed with its workers
            )  # fmt: skip
            try:
                returncode = process.wait(timeout=min(cap, left))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
            record["seconds"] = round(time.monotonic() - start, 1)
            out.seek(0)
            tail = out.read().splitlines()[-LOG_TAIL_LINES:]
        if part.result_path.is_file():
            try:
                record["result"] = part.read_result(part.result_path)
            except (OSError, ValueError, KeyError, ET.ParseError) as err:
                record["reason"] = f"unreadable result {part.result_path.name}: {err!r}"
        if returncode is None:
            record["status"] = "timed out"
            record["reason"] = f"killed after its cap of {min(cap, left):g} s"
        elif returncode != 0 or "result" not in record:
            record["status"] = "failed"
            last_line = next((line for line in reversed(tail) if line.strip()), "no output")
            record.setdefault("reason", f"exit status {returncode}: {last_line.strip()[:300]}")
        else:
            record["status"] = "ok"
        with self.log.open("a") as f:
            f.write(f"===== {part.name}: {record['status']} after {record['seconds']} s\n")
            f.write(f"$ {record['command']}\n" + "\n".join(tail) + "\n\n")
        return record


def part_env(dry_run: bool) -> dict[str, str]:
    """The checkout first on the path (installed or not) and unbuffered output; a dry run on the
    CPU, on one thread, without ``torch.compile`` (a minute on a CPU; the GPU run compiles)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1")
    return env


def judge_targets(parts: dict[str, dict[str, Any]], *, dry_run: bool) -> dict[str, Any]:
    """Each target's measured value and whether it is met (None: not measured, or a dry run)."""
    model, bf16, e2e = (
        parts.get(name, {}).get("result") for name in ("model", "model_bf16", "e2e")
    )
    measured = dict.fromkeys(TARGETS)
    if model:
        measured["model_speedup_fp32"] = model["ratio"]["images_per_s"]
    if bf16:
        measured["model_speedup"] = bf16["ratio"]["images_per_s"]
        measured["model_peak_memory"] = bf16["ratio"]["peak_memory"]  # None: not measurable
    if model and e2e:
        measured["e2e_of_model_only"] = e2e["ours"]["images_per_s"] / model["ours"]["images_per_s"]
    targets = {}
    for name, (what, comparison, bound) in TARGETS.items():
        value, met = measured[name], None
        if value is not None and not dry_run:
            met = value >= bound if comparison == ">=" else value <= bound
        targets[name] = {"what": what, "target": f"{comparison} {bound}", "measured": value,
                         "met": met}  # fmt: skip
    return targets


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / LOG_FILE).write_text("")
    report: dict[str, Any] = {
        "format": 1, "dry_run": args.dry_run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "tools/device_check.py", *args.argv]),
        "budget_s": args.budget_s, "wall_s": 0.0, "machine": None, "parts": {}, "targets": {},
    }  # fmt: skip

    def save() -> None:
        report["wall_s"] = round(time.monotonic() - start, 1)
        report["targets"] = judge_targets(report["parts"], dry_run=args.dry_run)
        write_atomically(args.output / RESULT_FILE, json.dumps(report, indent=2) + "\n")
        write_atomically(args.output / TABLES_FILE, render_markdown(report))

    runner = Runner(
        log=args.output / LOG_FILE,
        env=part_env(args.dry_run),
        deadline=start + args.budget_s,
        caps_s={**CAPS_S, **args.cap},
    )
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        work = Path(tmp)
        probe = Part("machine", python(SCRIPT, "machine", "--json", work / "machine.json"),
                     work / "machine.json")  # fmt: skip
        report["parts"]["machine"] = runner.run(probe)
        report["machine"] = report["parts"]["machine"].get("result")
        save()
        if report["machine"] is None:
            parts = [
                Part(name, [], work, skip_reason="the machine probe failed") for name in PARTS[1:]
            ]
        else:
            parts = plan(args, report["machine"], work)
        for part in parts:
            report["parts"][part.name] = runner.run(part)
            save()
    return report


# ----------------------------------------------------------------------------- the tables
def _number(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def summarise(name: str, result: Any) -> str:
    """One line per part for the parts table."""
    if name == "machine":
        d2 = "imports" if not result["detectron2_error"] else "does not import"
        return f"{result['name']}; {result['cpu_count']} CPU cores; detectron2 {d2}"
    if name == "gpu_tests":
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(result["counts"].items()))
        failed = [test for test, outcome in result["tests"].items() if outcome == "failed"]
        return counts + (f" ({', '.join(failed)})" if failed else "")
    if name in ("model", "model_bf16", "compile", "e2e"):
        ours, base, ratio = result["ours"], result["baseline"], result["ratio"]
        return (
            f"ours {ours['images_per_s']:.0f} img/s, {_number(ours['peak_memory_mib'])} MiB;"
            f" baseline {base['images_per_s']:.0f} img/s, {_number(base['peak_memory_mib'])} MiB;"
            f" {ratio['images_per_s']:.2f}x images/s, {_number(ratio['peak_memory'], '.2f', 'x')}"
            " peak memory"
        )
    if name in ("profile", "compile_profile"):
        return "; ".join(
            f"{variant}: {p['busy']:.0%} of the step in {p['timed']}, {p['host_syncs_per_step']:g}"
            f" host syncs/step" for variant, p in result.items()
        )  # fmt: skip
    if name == "fashion_mnist":
        return (
            f"{result['images_per_s_per_epoch'][-1]:.0f} img/s (last epoch), kNN top-1"
            f" {result['knn_top1']:.2f} % (random init {result['knn_top1_random_init']:.2f} %),"
            f" linear probe {result['linear_top1']:.2f} % ({result['linear_top1_random_init']:.2f} %)"
        )
    return "; ".join(  # scenes
        f"{row}: box AP {_number(m.get('bbox/AP'), '.1f')}, mask AP {_number(m.get('segm/AP'), '.1f')}"
        for row, m in result["metrics"].items()
    )


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"] or {}
    title = "Device check" + (": dry run at toy sizes on the CPU" if report["dry_run"] else "")
    lines = [
        f"# {title}",
        "",
        "| device | driver | CUDA | torch | Python | CPU cores | date |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join(str(machine.get(k) or "n/a") for k in ("name", "driver", "cuda", "torch", "python", "cpu_count"))
        + f" | {report['date'][:10]} |",
        "",
        f"`{report['command']}`: {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
    ]  # fmt: skip
    if report["dry_run"]:
        lines.append(
            "A check of the script (one CPU thread, `torch.compile` off): the figures below are"
            " not measurements."
        )
    lines += [
        "", "## Targets (ResNet-50, 224 px, batch 256, K 65536, v2 head, one GPU)", "",
        "| target | bound | measured | met |", "|---|---|---|---|",
    ]  # fmt: skip
    for target in report["targets"].values():
        met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
        lines.append(
            f"| {target['what']} | {target['target']} | {_number(target['measured'], '.2f')} | {met} |"
        )
    lines += ["", "## Parts", "", "| part | status | seconds (cap) | result |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        outcome = summarise(name, part["result"]) if "result" in part else ""
        notes = "; ".join(filter(None, [outcome, part.get("reason")]))
        lines.append(
            f"| {name} | {part['status']} | {part['seconds']:.0f} ({part['cap_s']:g}) | {notes} |"
        )
    lines += render_splits(report["parts"]) + render_profiles(report["parts"])
    return "\n".join(lines) + "\n"


def render_splits(parts: dict[str, Any]) -> list[str]:
    """The speed runs' step split (ms per step, from their instrumented pass)."""
    rows = [
        (name, variant, result[variant])
        for name in ("model", "model_bf16", "e2e", "compile")
        if (result := parts.get(name, {}).get("result"))
        for variant in ("ours", "baseline")
    ]
    if not rows:
        return []
    columns = list(rows[0][2]["split_ms"])
    lines = [
        "", "## Step split (ms per step, synchronised pass)", "",
        "| run | variant | img/s | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]  # fmt: skip
    for name, variant, r in rows:
        split = " | ".join(f"{r['split_ms'][c]:.1f}" for c in columns)
        lines.append(f"| {name} | {variant} | {r['images_per_s']:.0f} | {split} |")
    return lines


def render_profiles(parts: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("profile", "compile_profile"):
        for variant, p in (parts.get(name, {}).get("result") or {}).items():
            lines += [
                "",
                f"## {name}, {variant}: {p['step_ms']:.1f} ms/step under the profiler,"
                f" {p['busy']:.0%} in {p['timed']}, {p['host_syncs_per_step']:g} host syncs/step",
                "",
                "| kernel or op | share | ms/step |",
                "|---|---|---|",
                *(
                    f"| `{k['name']}` | {k['share']:.1%} | {k['ms_per_step']:.2f} |"
                    for k in p["top"]
                ),
            ]
    return lines


# ----------------------------------------------------------------------------- subprocesses
def machine_worker(argv: list[str]) -> None:
    """Writes what the check runs on: ``describe_machine`` plus driver, CUDA, detectron2."""
    parser = argparse.ArgumentParser(prog="device_check.py machine")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    from moco_pretrain.data import FASHION_MNIST_DIR
    from moco_pretrain.machine import describe_machine

    info = describe_machine()
    info.update(
        cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda, driver=None,
        detectron2_error="", fashion_mnist_dir=str(FASHION_MNIST_DIR),
    )  # fmt: skip
    if info["cuda_available"]:
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            info["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=30, check=True
            ).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError) as err:
            print(f"no driver version from nvidia-smi: {err!r}")
    try:
        importlib.import_module("detectron2._C")  # the compiled part: fails on a mismatched build
    except ImportError as err:
        info["detectron2_error"] = f"{type(err).__name__}: {err}"[:200]
    print(json.dumps(info, indent=2))
    args.json.write_text(json.dumps(info, indent=2))


def profile_worker(argv: list[str]) -> None:
    """A few steps of each variant under ``torch.profiler``, after warm-up steps."""
    parser = argparse.ArgumentParser(prog="device_check.py profile")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (>= 2)")
    parser.add_argument("--variant", action="append", choices=("ours", "baseline"), required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the time between step ends is measured)")
    import pretrain_speed as speed  # tools/, this script's folder, is on sys.path
    import torch

    from moco_pretrain.config import setup_cfg

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(None, args.opts)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the speed tool
    batches = argparse.Namespace(mode="model", steps=max(args.warmup, args.steps))
    report = {}
    for variant in args.variant:
        loader = speed.build_loaders(cfg, batches, device)[0]
        trainer = speed.build_runner(
            cfg, official=variant == "baseline", loader=loader, device=device
        )
        trainer.max_iters_per_epoch = args.warmup
        speed.quiet_epoch(trainer, 0)
        trainer.max_iters_per_epoch = args.steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        clock = speed.StepClock(trainer.optimizer, device)  # no sync of its own
        with torch.profiler.profile(activities=activities) as profile:
            speed.quiet_epoch(trainer, 1)
        report[variant] = kernel_shares(
            profile.key_averages(), steps=args.steps, step_s=clock.seconds_per_step(),
            on_cuda=device.type == "cuda",
        )  # fmt: skip
        del trainer, loader
    print(json.dumps(report, indent=2))
    args.json.write_text(json.dumps(report, indent=2))


def kernel_shares(averages, *, steps: int, step_s: float, on_cuda: bool) -> dict[str, Any]:
    """The largest kernels (CUDA) or ops (CPU, by self time) and their share of the total, the
    fraction of the step (``step_s``, between step ends) spent in them, and host syncs (CUDA
    runtime synchronize calls; the engine's log point at the epoch's end is one) per step."""
    from torch.autograd import DeviceType

    device_type = DeviceType.CUDA if on_cuda else DeviceType.CPU
    times = collections.Counter()  # microseconds
    for event in averages:
        # MoCo's record_function ranges (moco/queue, ...) hold kernels: counting them counts twice
        annotation = getattr(event, "is_user_annotation", False) or event.key.startswith("moco/")
        if event.device_type == device_type and not annotation:
            times[event.key] += (
                event.self_device_time_total if on_cuda else event.self_cpu_time_total
            )
    total = sum(times.values()) or 1.0
    syncs = sum(event.count for event in averages if event.key in SYNC_CALLS)
    top = [
        {"name": short_name(name), "share": t / total, "ms_per_step": t / 1000 / steps}
        for name, t in times.most_common(TOP_KERNELS)
    ]
    rest = total - sum(t for _, t in times.most_common(TOP_KERNELS))
    top.append({"name": "(all others)", "share": rest / total, "ms_per_step": rest / 1000 / steps})
    return {
        "timed": "kernels" if on_cuda else "ops",
        "steps": steps,
        "step_ms": 1000 * step_s,
        "busy": total / 1e6 / steps / step_s,
        "host_syncs_per_step": syncs / steps,
        "top": top,
    }


def short_name(kernel: str, limit: int = 90) -> str:
    """A kernel's name without its template arguments and return type, at most ``limit`` chars."""
    depth, kept = 0, []
    for char in kernel:
        depth += char == "<"
        if depth == 0:
            kept.append(char)
        depth -= char == ">" and depth > 0
    name = "".join(kept).removeprefix("void ").strip()
    return name if len(name) <= limit else name[: limit - 3] + "..."


# ----------------------------------------------------------------------------- entry point
def cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in CAPS_S or not seconds:
        raise argparse.ArgumentTypeError(
            f"expected PART=SECONDS with PART one of {', '.join(PARTS)}"
        )
    return name, float(seconds)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "gpu")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall time of all parts")
    parser.add_argument(
        "--cap", type=cap, action="append", default=[], metavar="PART=SECONDS",
        help=f"a part's time cap (defaults: {', '.join(f'{k} {v}' for k, v in CAPS_S.items())})",
    )  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=PARTS[1:], help="run only these")
    parser.add_argument("--fashion-mnist", type=Path, help="Fashion-MNIST IDX folder")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    workers = {"machine": machine_worker, "profile": profile_worker}
    if argv[:1] and argv[0] in workers:
        return workers[argv[0]](argv[1:])
    args = get_parser().parse_args(argv)
    args.cap, args.argv = dict(args.cap), argv
    report = run_check(args)
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
