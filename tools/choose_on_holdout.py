"""Choose one pretraining setting on held-out training images, never on test images.

    python tools/choose_on_holdout.py moco MODEL.M 0.99 0.996 0.999
    python tools/choose_on_holdout.py supervised SOLVER.BASE_LR 0.03 0.1 0.3

One run per value of ``KEY``, as ``moco-benchmark`` trains its row (``moco``: the demo MoCo recipe,
scored by kNN top-1 with every other training image as the bank; ``supervised``: the supervised
recipe for the benchmark's 2 epochs, scored by its classifier's top-1), on the source classes
(``--classes``, default the benchmark's) and scored on the recipes' 2,000 held-out training images
(``DATA.HOLDOUT``). The highest score wins (ties: the first value). Prints one JSON line (values,
scores, the choice) and writes it to ``<work-dir>/<method>/choice.json``; finished runs are read
back. ``--opts "KEY VALUE ..."`` applies to every run (e.g. ``DATA.ROOT``).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from moco_pretrain.files import atomic_write_json
from moco_pretrain.pretrain import run_pretraining
from moco_pretrain.results import RESULTS_FILE
from moco_pretrain.supervised import run_supervised
from transfer import benchmark
from transfer.pipeline import PRETRAIN_SUMMARY, Pipeline, read_json

# Per method: the recipe and its overrides as the benchmark runs it, the run, the file it writes
# last, and its score there.
METHODS = {
    "moco": (benchmark.PRETRAIN_RECIPE, ["KNN.BANK_SIZE", "0"], run_pretraining, PRETRAIN_SUMMARY,
             lambda summary: summary["knn_top1"]),
    "supervised": (benchmark.SUPERVISED_RECIPE, benchmark.SUPERVISED_OPTS, run_supervised,
                   RESULTS_FILE, lambda result: result["metrics"]["top1"]),
}  # fmt: skip


def choose(
    method: str, key: str, values: list[str], *, classes: str, work: Path, opts: list[str] = ()
) -> dict:
    recipe, fixed, run, done, score = METHODS[method]
    source = str(benchmark.parse_classes(classes, "--classes"))
    pipeline = Pipeline(work, command=shlex.join(["choose_on_holdout.py", method, key, *values]))
    scores = []
    for value in values:
        overrides = [*fixed, "DATA.CLASSES", source, *opts, key, value, "SEED", "0"]
        done_file = pipeline.run(run, recipe, f"{key}_{value}", overrides, done=done, step=value)
        scores.append(score(read_json(done_file)))
    best = max(range(len(values)), key=scores.__getitem__)
    return {"method": method, "key": key, "classes": source, "values": values, "scores": scores,
            "choice": values[best], "machine": pipeline.costs["machine"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=list(METHODS))
    parser.add_argument("key", help="the config key to choose, e.g. MODEL.M")
    parser.add_argument("values", nargs="+")
    parser.add_argument("--classes", default=benchmark.DEFAULT_SOURCE, help="source classes")
    parser.add_argument("--work-dir", type=Path, default=Path("output/holdout_choice"))
    parser.add_argument("--opts", default="", help="KEY VALUE overrides of every run (quoted)")
    args = parser.parse_args(argv)
    work = args.work_dir / args.method
    record = choose(args.method, args.key, args.values, classes=args.classes, work=work,
                    opts=shlex.split(args.opts))  # fmt: skip
    atomic_write_json(work / "choice.json", record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
