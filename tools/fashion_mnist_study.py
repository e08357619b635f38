"""Fashion-MNIST study: does MoCo pretraining beat raw pixels and a random encoder, and when?

One command reproduces every number, table and plot of results/fashion_mnist/ from scratch:

    python tools/fashion_mnist_study.py                  # CPU budget: about 1.5 h on 2 cores
    python tools/fashion_mnist_study.py --budget gpu     # the full recipe, one GPU

Runs (each in its own folder under --work-dir; a finished one is read back, not rerun, so an
interrupted study resumes where it stopped):

1. baselines: weighted kNN (k=20, T=0.1, cosine; the same kNN everywhere) on raw pixels, and on a
   randomly initialised ResNet-18; linear classification of the random encoder;
2. MoCo v2 (pretrain/fashion_mnist_cpu.yaml, or _full.yaml on a GPU) with kNN after every
   epoch (every 10 on a GPU), then its linear classification (lincls/fashion_mnist_demo.yaml);
3. the supervised upper bound: the same ResNet-18 trained with labels;
4. ablations at a shorter schedule: momentum m, queue size K, MoCo v1 vs v2.

Writes results.json (every figure, the machine, the command), tables.md and curves.png /
ablations.png into --output. ``KEY VALUE`` pairs after the options apply to every run, last (e.g.
``DATA.ROOT /path/to/fashion-mnist``, or a smaller ``SOLVER.EPOCHS`` for a quick look).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moco_pretrain.checkpoint import atomic_save
from moco_pretrain.config import dataset_options, setup_cfg
from moco_pretrain.data import build_dataset
from moco_pretrain.evaluation import knn_accuracy
from moco_pretrain.files import atomic_write_json
from moco_pretrain.knn_task import run_knn
from moco_pretrain.lincls import run_lincls
from moco_pretrain.models import build_backbone
from moco_pretrain.results import RESULTS_FILE, read_results
from transfer.pipeline import Pipeline, read_json

KNN = ["KNN.NEIGHBORS", "20", "KNN.TEMPERATURE", "0.1"]
# A study of the features, scored on the test split as published ones are (it chooses no setting
# from it), with all 60k training images, also as the kNN bank: the demo recipes hold 2,000 out
# for validation and keep a 10k bank.
TEST_SPLIT = ["DATA.VAL_SPLIT", "test", "DATA.HOLDOUT", "0", "KNN.BANK_SIZE", "0"]
LINCLS_RECIPE = "lincls/fashion_mnist_demo.yaml"
SUPERVISED_RECIPE = "supervised/fashion_mnist.yaml"
BUDGETS = {
    "cpu": {"recipe": "pretrain/fashion_mnist_cpu.yaml", "ablation_epochs": 1, "supervised_epochs": 3},
    "gpu": {"recipe": "pretrain/fashion_mnist_full.yaml", "ablation_epochs": 50, "supervised_epochs": 30},
}  # fmt: skip
# The paper's ablations (MoCo Sec. 4.1, Fig. 3, Table 4; v2: Chen et al. 2020) around the demo
# recipe (v2, m 0.99, K 4096), each a KEY VALUE diff; "v2 m0.99 K4096" is the reference run.
ABLATIONS = {
    "v2 m0.99 K4096": [],
    "m 0": ["MODEL.M", "0.0"],
    "m 0.9": ["MODEL.M", "0.9"],
    "m 0.999": ["MODEL.M", "0.999"],
    "K 256": ["MODEL.K", "256"],
    "K 16384": ["MODEL.K", "16384"],
    "v1 (no MLP, T 0.07, v1 aug)": ["MODEL.MLP", "False", "MODEL.T", "0.07", "DATA.AUG", "v1"],
}


def raw_pixel_knn(recipe: str, work: Path, opts: list[str]) -> float:
    """kNN top-1 on the 784 raw pixels (cosine, k=20, T=0.1), train split -> test split."""
    path = work / "raw_pixels.json"
    if not path.is_file():
        cfg = setup_cfg(recipe, [*KNN, *opts])

        def pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
            dataset = build_dataset(**dataset_options(cfg), split=split, transform=None)
            images = torch.from_numpy(dataset.images.copy()).flatten(1).float()  # N x 784
            return F.normalize(images, dim=1), dataset.targets

        bank, bank_labels = pixels(cfg.DATA.TRAIN_SPLIT)
        test, test_labels = pixels(cfg.DATA.VAL_SPLIT)
        metrics = knn_accuracy(
            bank,
            bank_labels,
            test,
            test_labels,
            num_classes=10,
            k=cfg.KNN.NEIGHBORS,
            temperature=cfg.KNN.TEMPERATURE,
        )
        done = {"task": "knn", "metrics": metrics, "features": "raw pixels", "k": cfg.KNN.NEIGHBORS}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, done)
    return read_json(path)["metrics"]["top1"]


def linear_classification(pipeline: Pipeline, checkpoint: str, run: str, opts: list[str]) -> dict:
    """Linear classification (the lincls recipe) of ``checkpoint`` into ``<run>/lincls``."""
    return pipeline.evaluate(run_lincls, LINCLS_RECIPE, f"{run}/lincls", opts,
                             pretrained=checkpoint, step=f"lincls/{run}")["metrics"]  # fmt: skip


def random_encoder(pipeline: Pipeline, recipe: str, opts: list[str]) -> dict[str, float]:
    """kNN and linear top-1 of a randomly initialised ResNet-18 (seed 0)."""
    out = pipeline.path("random_init")
    weights = out / "backbone.pth"
    if not weights.is_file():
        cfg = setup_cfg(recipe, opts)
        torch.manual_seed(cfg.SEED)
        atomic_save(build_backbone(cfg.MODEL.ARCH).state_dict(), weights)
    knn = pipeline.evaluate(run_knn, recipe, "random_init", [*KNN, *opts], pretrained=weights,
                            step="knn/random_init", done=f"knn/{RESULTS_FILE}")  # fmt: skip
    return {
        "knn_top1": knn["metrics"]["top1"],
        "linear_top1": linear_classification(pipeline, str(weights), "random_init", opts)["top1"],
    }


def crossover(summary: dict[str, Any], level: float) -> dict | None:
    """The first monitored epoch whose kNN top-1 exceeds ``level``, with the training time to it
    (the run's time per epoch, pro rata)."""
    minutes_per_epoch = summary["train_seconds"] / 60 / len(summary["epochs"])
    for point in summary["knn"]:
        if point["knn_top1"] > level:
            return {**point, "minutes": point["epoch"] * minutes_per_epoch}
    return None


def run_study(budget: str, work: Path, opts: list[str] = ()) -> dict[str, Any]:
    """Every run of the study (finished ones read back); returns the figures."""
    opts = [*TEST_SPLIT, *opts]
    plan = BUDGETS[budget]
    recipe = plan["recipe"]
    pipeline = Pipeline(work, command=shlex.join(sys.argv))
    results: dict[str, Any] = {
        "budget": budget,
        "machine": pipeline.costs["machine"],
        "command": pipeline.costs["command"],
    }
    results["raw_pixels_knn_top1"] = raw_pixel_knn(recipe, work, opts)
    results["random_init"] = random_encoder(pipeline, recipe, opts)
    main = pipeline.pretrain(recipe, "moco_v2_main", [*KNN, *opts])
    lincls = linear_classification(
        pipeline, main["checkpoint"], work / "moco_v2_main" / "lincls", opts
    )
    results["moco"] = {
        "knn_top1": main["knn"][-1]["knn_top1"],
        "linear_top1": lincls["top1"],
        "epochs": main["epochs"],
        "knn_curve": main["knn"],
        "train_minutes": main["train_seconds"] / 60,
    }
    results["crossover"] = {
        name: crossover(main, level)
        for name, level in (
            ("random_init", results["random_init"]["knn_top1"]),
            ("raw_pixels", results["raw_pixels_knn_top1"]),
        )
    }
    epochs = ["SOLVER.EPOCHS", str(plan["supervised_epochs"])]
    pipeline.supervised(SUPERVISED_RECIPE, "supervised", [*epochs, *KNN, *opts])
    results["supervised"] = read_results(pipeline.path("supervised") / RESULTS_FILE)["metrics"]
    epochs = plan["ablation_epochs"]
    results["ablations"] = {"epochs": epochs, "runs": {}}
    for i, (name, overrides) in enumerate(ABLATIONS.items()):
        schedule = ["SOLVER.EPOCHS", str(epochs), "KNN.MONITOR_PERIOD", str(max(1, epochs // 10))]
        overrides = [*overrides, *schedule, "KNN.FINAL", "False", *KNN, *opts]
        summary = pipeline.pretrain(recipe, f"ablations/run_{i}", overrides, step=f"ablation_{i}")
        results["ablations"]["runs"][name] = {
            "overrides": overrides,
            "knn_top1": summary["knn"][-1]["knn_top1"],
            "final_loss": summary["epochs"][-1]["loss"],
            "contrastive_acc1": summary["epochs"][-1]["acc1"],
            "iterations": summary["iterations"],
        }
    return results


def render_markdown(results: dict[str, Any]) -> str:
    moco, sup, rnd = results["moco"], results["supervised"], results["random_init"]
    lines = [
        "| encoder (ResNet-18, 32 px) | kNN top-1 (k=20) | linear top-1 |",
        "|---|---|---|",
        f"| raw pixels (no encoder) | {results['raw_pixels_knn_top1']:.2f} | |",
        f"| random init | {rnd['knn_top1']:.2f} | {rnd['linear_top1']:.2f} |",
        f"| MoCo v2, {len(moco['epochs'])} epochs ({moco['train_minutes']:.0f} min) | {moco['knn_top1']:.2f} | {moco['linear_top1']:.2f} |",
        f"| supervised (labels, upper bound) | {sup['knn_top1']:.2f} | {sup['top1']:.2f} (classifier) |",
        "",
        "| MoCo kNN overtakes | at epoch | training minutes |",
        "|---|---|---|",
    ]  # fmt: skip
    for name, point in results["crossover"].items():
        where = f"{point['epoch']} | {point['minutes']:.0f}" if point else "not within the run | -"
        lines.append(f"| {name.replace('_', ' ')} | {where} |")
    ablations = results["ablations"]
    lines += [
        "",
        f"| ablation ({ablations['epochs']} epoch(s) each) | kNN top-1 | final loss | contrastive top-1 |",
        "|---|---|---|---|",
    ]
    for name, run in ablations["runs"].items():
        lines.append(
            f"| {name} | {run['knn_top1']:.2f} | {run['final_loss']:.3f} | {run['contrastive_acc1']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def render_plots(results: dict[str, Any], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moco = results["moco"]
    fig, (ax_knn, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    curve = moco["knn_curve"]
    ax_knn.plot([p["epoch"] for p in curve], [p["knn_top1"] for p in curve], "o-", label="MoCo v2")
    for label, value, style in (
        ("raw pixels", results["raw_pixels_knn_top1"], ":"),
        ("random init", results["random_init"]["knn_top1"], "--"),
        ("supervised", results["supervised"]["knn_top1"], "-."),
    ):
        ax_knn.axhline(value, linestyle=style, color="gray", label=f"{label} ({value:.1f})")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%), k=20", title="Fashion-MNIST test, kNN")
    ax_knn.legend()
    epochs = moco["epochs"]
    ax_loss.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], "o-")
    ax_loss.set(xlabel="epoch", ylabel="InfoNCE loss (epoch mean)", title="MoCo v2 training loss")
    fig.tight_layout()
    fig.savefig(output / "curves.png", dpi=110)

    runs = results["ablations"]["runs"]
    fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        points = run["iterations"]
        ax_loss.plot([p["iteration"] for p in points], [p["loss"] for p in points], label=name)
    ax_loss.set(xlabel="iteration", ylabel="InfoNCE loss", title="ablations: training loss")
    ax_loss.legend(fontsize=8)
    ax_bar.barh(list(runs), [r["knn_top1"] for r in runs.values()])
    ax_bar.invert_yaxis()
    ax_bar.axvline(
        results["random_init"]["knn_top1"], linestyle="--", color="gray", label="random init"
    )
    ax_bar.set(
        xlabel="kNN top-1 (%)", title=f"ablations after {results['ablations']['epochs']} epoch(s)"
    )
    ax_bar.set_xlim(left=min(r["knn_top1"] for r in runs.values()) - 5)
    ax_bar.legend()
    fig.tight_layout()
    fig.savefig(output / "ablations.png", dpi=110)
    plt.close("all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("output/study/fashion_mnist"))
    parser.add_argument("--output", type=Path, default=Path("results/fashion_mnist"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run_study(args.budget, args.work_dir, args.opts)
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output / "results.json", results)
    tables = render_markdown(results)
    (args.output / "tables.md").write_text(tables)
    render_plots(results, args.output)
    print(tables)


if __name__ == "__main__":
    main()
