#!/usr/bin/env python
"""The GPU device check: every CUDA claim of the package measured in one run of at most 8 minutes.

Each check is an existing command (``python -m moco_pretrain.machine``, ``pytest -m gpu``,
``tools/pretrain_speed.py``, ``moco-pretrain``, ``moco-benchmark``) run as a subprocess under a
time cap: one over its cap is killed and recorded as "timed out", and the next one runs. What each
measures: docs/performance.md. Writes ``device_check.json`` and ``device_check.md`` to
``--output`` (default: the current folder) after every check. ``--dry-run`` runs every check at
toy sizes on the CPU, to test this script without a GPU. This process never imports torch::

    python tools/device_check.py --output results/gpu
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from moco_pretrain.fake_data import write_fashion_mnist, write_jpeg_folder
from moco_pretrain.files import atomic_write, atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE, SUMMARY_FILE = "device_check.json", "device_check.md"
CAPS_S = {
    "machine": 45, "gpu_tests": 90, "model": 120, "model_bf16": 120, "profile": 60, "e2e": 150,
    "compile": 180, "compile_profile": 90, "fashion_mnist": 100, "scenes": 480,
}  # fmt: skip
MIN_CHECK_S = 5  # a check that would get less of the time budget is skipped
TAIL_LINES = 40  # of each check's output, kept in both files
BF16 = ["TRAIN.AMP_DTYPE", "bf16", "TRAIN.CHANNELS_LAST", "True"]  # the opt-in pair
TARGETS = {  # name: (what, comparison, bound, its value from the checks' results)
    "model_speedup_fp32": ("ours/baseline images/s, model only, both fp32", ">=", 1.0,
                           lambda r: r["model"]["ratio"]["images_per_s"]),
    "model_speedup": ("ours bf16 channels-last / baseline images/s, model only", ">=", 2.5,
                      lambda r: r["model_bf16"]["ratio"]["images_per_s"]),
    "model_peak_memory": ("ours bf16 channels-last / baseline peak memory, model only", "<=", 0.6,
                          lambda r: r["model_bf16"]["ratio"]["peak_memory"]),  # None on a CPU
    "e2e_of_model_only": ("ours end to end with the device augmentation / model only", ">=", 0.8,
                          lambda r: r["e2e"]["ours"]["images_per_s"]
                          / r["model"]["ours"]["images_per_s"]),
}  # fmt: skip
DRY_RUN_RECIPE = [  # the pretraining and supervised recipes at toy sizes
    "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "DATA.MAX_SAMPLES", "16", "DATA.HOLDOUT", "8",
    "MODEL.BN_SPLITS", "2", "KNN.BATCH_SIZE_PER_PROCESS", "40", "KNN.NEIGHBORS", "20",
]  # fmt: skip
DRY_RUN_SCENES = [  # the 5 target classes' 8 training and 4 test images each; 2 fine-tune steps
    "--labelled", "20", "--val-garments", "10", "--test-garments", "10", "MODEL.DEVICE", "cpu",
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
]  # fmt: skip


class Check(NamedTuple):
    command: list[str]
    result: Path  # the file the command leaves its figures in
    read: Callable[[Path], Any] = lambda path: json.loads(path.read_text())
    prepare: Callable[[], Any] = lambda: None  # writes its input, just before it runs


def read_junit(path: Path) -> dict[str, Any]:
    """Outcome per test (``module::name``) and the counts, from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        failed, skipped = bool(tags & {"failure", "error"}), "skipped" in tags
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return {"counts": dict(collections.Counter(outcomes.values())), "tests": outcomes}


def read_scenes(path: Path) -> dict[str, Any]:
    """Seconds per step of ``moco-benchmark`` and the mean of every metric per initialisation."""
    metrics: dict[str, dict[str, float]] = collections.defaultdict(dict)
    with (path.parent / "report" / "short" / "report.csv").open() as f:
        for row in csv.DictReader(f):
            metrics[row["row"]][row["metric"]] = float(row["mean"])
    return {"seconds": json.loads(path.read_text())["seconds"], "metrics": dict(metrics)}


def plan(args: argparse.Namespace, work: Path) -> dict[str, Check]:
    """Every check: the targets' sizes on a GPU, toy sizes in a dry run."""
    dry, py = args.dry_run, sys.executable
    arch, size, batch, K = ("resnet18", 32, 8, 64) if dry else ("resnet50", 224, 256, 65536)
    moco = ["MODEL.ARCH", arch, "DATA.IMAGE_SIZE", str(size), "SOLVER.BATCH_SIZE", str(batch),
            "MODEL.K", str(K), "MODEL.MLP", "True", "MODEL.T", "0.2", "DATA.AUG", "v2"]  # fmt: skip
    workers = ["DATA.NUM_WORKERS", "0" if dry else str(max(1, (os.cpu_count() or 1) - 2))]
    recipe = shlex.join([*workers, *(DRY_RUN_RECIPE if dry else [])])
    fashion = args.fashion_mnist or (write_fashion_mnist(work / "fashion") if dry else None)
    seed_0 = work / "scenes" / "moco" / "seed_0"  # the benchmark's first MoCo run, read back

    def speed(name: str, steps: int, warmup: int, rounds: int, *more: str) -> Check:
        steps, warmup, rounds = (2, 1, 1) if dry else (steps, warmup, rounds)
        timing = [f"--steps={steps}", f"--warmup={warmup}", f"--rounds={rounds}"]
        tool, result = str(ROOT / "tools" / "pretrain_speed.py"), work / f"{name}.json"
        return Check([py, tool, *timing, f"--json={result}", *more], result)

    e2e_steps, profile = (2, "2") if dry else (64, "3")  # e2e: prefetching counts little in 64
    jpeg_size, unique = ((64, 48), 4) if dry else ((500, 375), 256)  # ImageNet's typical size
    data = (["--data-root", str(fashion)], ["DATA.ROOT", str(fashion)]) if fashion else ([], [])
    return {
        "machine": Check([py, "-m", "moco_pretrain.machine", str(work / "machine.json")],
                         work / "machine.json"),
        "gpu_tests": Check([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            "--junitxml", str(work / "gpu.xml"), str(ROOT / "tests")],
                           work / "gpu.xml", read_junit),
        "model": speed("model", 20, 3, 3, *moco),
        "model_bf16": speed("model_bf16", 20, 3, 3, *moco, *BF16),
        "profile": speed("profile", 2, 3, 1, "--profile", profile, *moco),
        "e2e": speed("e2e", e2e_steps, 2, 2, "--mode", "e2e", "--aug", "device", *moco,
                     "DATA.ROOT", str(work / "jpegs"), *workers)._replace(
            prepare=lambda: write_jpeg_folder(work / "jpegs", images=e2e_steps * batch,
                                              unique=unique, size=jpeg_size)),
        "compile": speed("compile", 20, 3, 2, *moco, "TRAIN.COMPILE", "True"),  # warm-up compiles
        "compile_profile": speed("compile_profile", 2, 3, 1, "--profile", profile, *moco,
                                 "TRAIN.COMPILE", "True"),
        "fashion_mnist": Check([py, "-m", "moco_pretrain.cli.pretrain", "--config-file",
                                "pretrain/fashion_mnist_demo.yaml", "DATA.CLASSES",
                                "[0, 2, 4, 6, 8]", *data[1], *shlex.split(recipe), "SEED", "0",
                                "OUTPUT_DIR", str(seed_0)], seed_0 / "summary.json"),
        "scenes": Check([py, "-m", "transfer.benchmark", "--work-dir", str(work / "scenes"),
                         *data[0], "--trials", "1", "--pretrain-opts", recipe, "--supervised-opts",
                         recipe, *(DRY_RUN_SCENES if dry else ["MODEL.DEVICE", "cuda"])],
                        work / "scenes" / "costs.json", read_scenes),
    }  # fmt: skip


def skip_reason(name: str, args: argparse.Namespace, report: dict[str, Any]) -> str:
    machine, pretraining = report["machine"], report["parts"].get("fashion_mnist", {})
    if machine is None:
        return "the machine check did not finish"
    if not (args.dry_run or machine["cuda_available"]):
        return "no CUDA device (torch.cuda.is_available() is False); --dry-run runs on a CPU"
    if args.parts and name not in args.parts:
        return "not selected (--parts)"
    if name == "scenes" and machine["detectron2_error"]:
        return f"detectron2 does not import ({machine['detectron2_error']}); install it to run it"
    if name == "scenes" and pretraining.get("status") in ("failed", "timed out"):
        return "fashion_mnist, whose pretraining it reads back, did not finish"
    return ""


def run(check: Check, *, cap: float, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Runs ``check`` for at most ``cap`` seconds, then kills its process group."""
    record: dict[str, Any] = {"status": "ok", "cap_s": cap, "command": shlex.join(check.command)}
    check.prepare()
    start = time.monotonic()
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        process = subprocess.Popen(
            check.command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its loader workers
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        record["seconds"] = round(time.monotonic() - start, 1)
        out.seek(0)
        record["tail"] = out.read().splitlines()[-TAIL_LINES:]
    if check.result.is_file():
        try:
            record["result"] = check.read(check.result)
        except (OSError, ValueError, KeyError, ET.ParseError) as err:
            record["reason"] = f"unreadable result {check.result.name}: {err!r}"
    if returncode is None:
        record.update(status="timed out", reason=f"killed after its cap of {cap:g} s")
    elif returncode != 0 or "result" not in record:
        last = next((line.strip() for line in reversed(record["tail"]) if line.strip()), "")
        record["status"] = "failed"
        record.setdefault("reason", f"exit status {returncode}: {last[:300] or 'no output'}")
    return record


def judge_targets(parts: dict[str, dict[str, Any]], *, dry_run: bool) -> dict[str, Any]:
    """Each target's measured value and whether it is met (None: not measured, or a dry run)."""
    results = {name: part["result"] for name, part in parts.items() if "result" in part}
    targets = {}
    for name, (what, op, bound, measure) in TARGETS.items():
        try:
            value = measure(results)
        except KeyError:  # a check it needs did not run
            value = None
        met = None if value is None or dry_run else value >= bound if op == ">=" else value <= bound
        targets[name] = {"what": what, "target": f"{op} {bound}", "measured": value, "met": met}
    return targets


def render_summary(report: dict[str, Any]) -> list[str]:
    """The machine, the command, the targets and the checks' outcomes."""
    machine = report["machine"] or {}
    keys = ("name", "driver", "cuda", "torch", "python", "cpu_count")
    lines = [
        "# Device check" + (": dry run at toy sizes on the CPU" if report["dry_run"] else ""), "",
        ", ".join(f"{key} {machine[key]}" for key in keys if machine.get(key) is not None)
        or "machine: n/a", "",
        f"`{report['command']}` on {report['date'][:10]}: {report['wall_s']:.0f} s of a"
        f" {report['budget_s']:.0f} s budget.",
        "", "## Targets (ResNet-50, 224 px, batch 256, K 65536, v2 head, one GPU)", "",
        "| target | bound | measured | met |", "|" + "---|" * 4,
    ]  # fmt: skip
    for t in report["targets"].values():
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['what']} | {t['target']} | {value} | {met} |")
    lines += ["", "## Checks", "", "| check | status | seconds (cap) | reason |", "|" + "---|" * 4]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.0f} ({part['cap_s']:g}) |"
                     f" {part.get('reason', '')} |")  # fmt: skip
    return lines


def write_report(report: dict[str, Any], output: Path) -> None:
    """The JSON, and the markdown: the summary, then the end of each check's output."""
    atomic_write_json(output / RESULT_FILE, report)
    tails = [line for name, part in report["parts"].items() if "tail" in part
             for line in ("", f"## {name}: the end of its output", "", f"`{part['command']}`", "",
                          "```text", *part["tail"], "```")]  # fmt: skip
    text = "\n".join([*render_summary(report), *tails, ""])
    atomic_write(output / SUMMARY_FILE, lambda f: f.write(text.encode()))


def run_checks(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    start, caps = time.monotonic(), {**CAPS_S, **dict(args.cap)}
    # The checkout first on the path; a dry run on one CPU thread, without torch.compile.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1")
    report: dict[str, Any] = {
        "format": 2, "dry_run": args.dry_run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "tools/device_check.py", *argv]),
        "budget_s": args.budget_s, "wall_s": 0.0, "machine": None, "parts": {}, "targets": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        work = Path(tmp)
        for name, check in plan(args, work).items():
            left = start + args.budget_s - time.monotonic()
            reason = "" if name == "machine" else skip_reason(name, args, report)
            if not reason and left < MIN_CHECK_S:
                reason = f"the time budget is spent ({left:.0f} s left)"
            record = (
                {"status": "skipped", "cap_s": caps[name], "seconds": 0.0, "reason": reason}
                if reason else run(check, cap=min(caps[name], round(left, 1)), env=env, cwd=work)
            )  # fmt: skip
            report["parts"][name] = record
            report["machine"] = report["parts"]["machine"].get("result")
            report["wall_s"] = round(time.monotonic() - start, 1)
            report["targets"] = judge_targets(report["parts"], dry_run=args.dry_run)
            write_report(report, args.output)
            print(f"{name}: {record['status']} after {record['seconds']:g} s", flush=True)
    return report


def cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in CAPS_S or not seconds:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS, PART one of {', '.join(CAPS_S)}")
    return name, float(seconds)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("."), help="default: this folder")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall time of all checks")
    parser.add_argument("--cap", type=cap, action="append", default=[], metavar="PART=SECONDS",
                        help=f"a check's time cap (defaults: {CAPS_S})")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=list(CAPS_S)[1:], help="run only these")
    parser.add_argument("--fashion-mnist", type=lambda text: Path(text).resolve(),
                        help="Fashion-MNIST IDX folder")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser().parse_args(argv)
    report = run_checks(args, argv)
    done = f"wrote {RESULT_FILE} and {SUMMARY_FILE} to {args.output.resolve()}"
    print("\n".join(["", *render_summary(report), "", done]))
    return report


if __name__ == "__main__":
    main()
