"""``moco-transfer``: fine-tune and evaluate a detectron2 model (a detector, Keypoint R-CNN or the
FCN of :mod:`transfer.semantic_seg`) from a (MoCo) backbone.

    moco-transfer --config-file detection/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 \\
        --num-trials 5 MODEL.WEIGHTS moco_v2_200ep.pkl OUTPUT_DIR out/voc_moco

detectron2's ``tools/train_net.py`` with the plugin: ``--config-file`` is a path or a name under
the packaged ``configs/`` (``detection/...``, ``segmentation/...``); ``MOCO.DATASETS`` registers
VOC-, COCO-format and label-PNG data; the evaluator follows the test dataset's
``evaluator_type``; before training, the backbone weights are verified (:mod:`transfer.preflight`). Trial ``k`` runs in ``OUTPUT_DIR/trial_k`` with
``SEED = max(SEED, 0) + k`` and ends by writing ``results.json`` there; a trial that has one is
skipped, so an interrupted series is completed by rerunning the same command, and ``--trial k``
runs one trial (e.g. as its own cluster job). A trial killed before its ``results.json`` restarts
from iteration 0 when rerun: detectron2's checkpoints hold no sampler position or RNG state, so
continuing one would train another trial than its seed names, and evaluating one would report
a partial run; ``--resume`` is therefore refused (``--eval-only MODEL.WEIGHTS PATH`` evaluates
any checkpoint). At world size 1 (one GPU or ``MODEL.DEVICE cpu``)
``SyncBN`` normalises with the batch's own statistics, as plain BN.

Deviations from the official ``detection/train_net.py`` (MoCo, 78b69ca): the evaluator is chosen
by ``MetadataCatalog.get(name).evaluator_type`` instead of ``"coco" in dataset_name``; the ROI
head lives in :mod:`transfer.roi_heads` (public ``from_config``); the backbone preflight, dataset
registration, trials and ``results.json`` are additions. Training itself is detectron2's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import detectron2
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import (
    DefaultTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn

from moco_pretrain.cli.common import exit_on_user_error
from moco_pretrain.config import flatten_config
from moco_pretrain.files import file_sha256
from moco_pretrain.recipes import config_root, resolve_config_file
from moco_pretrain.results import RESULTS_FILE, write_results
from moco_pretrain.weights import converted_provenance

from .config import add_moco_config, check_moco_config
from .datasets.register import register_datasets
from .preflight import load_verified
from .semantic_seg import train_augmentations


def average_bn_statistics(bn_layers: list[nn.Module]) -> None:
    """Pool every layer's running statistics over the processes, each process one equal part:
    mean = E[mean_p], var = E[var_p + mean_p^2] - mean^2 (under SyncBN the means already agree
    and this is the average of the variances)."""
    world_size = comm.get_world_size()
    if world_size == 1 or not bn_layers:
        return
    means = [bn.running_mean for bn in bn_layers]
    second = [bn.running_var + bn.running_mean**2 for bn in bn_layers]  # E[x^2] per process
    flat = torch.cat([t.flatten() for t in means + second])  # one all-reduce for every layer
    torch.distributed.all_reduce(flat)
    flat /= world_size
    pooled = flat.split([t.numel() for t in means + second])
    for bn, mean, moment in zip(bn_layers, pooled[: len(means)], pooled[len(means) :], strict=True):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(moment - mean**2)


class AverageBNStatistics(hooks.HookBase):
    """Right after detectron2's PreciseBN (same iterations), average the BN statistics over the
    processes.

    fvcore's ``update_bn_stats`` weights each batch by the size of its input on that process, and
    the sizes differ across processes (images of other shapes), so every process ends with other
    statistics even under SyncBN (detectron2#5398) and each would evaluate another model.
    """

    def __init__(self, period: int, bn_layers: list[nn.Module]) -> None:
        self.period, self.bn_layers = period, bn_layers

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self.period > 0 and next_iter % self.period == 0):
            average_bn_statistics(self.bn_layers)


class Trainer(DefaultTrainer):
    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)  # rescales cfg to the processes when SOLVER.REFERENCE_WORLD_SIZE > 0
        solver, world_size = self.cfg.SOLVER, comm.get_world_size()
        logging.getLogger("detectron2").info(
            "effective schedule: %d processes x %d images = batch %d, lr %g, %d iterations,"
            " lr steps %s (SOLVER.REFERENCE_WORLD_SIZE %d)",
            world_size, solver.IMS_PER_BATCH // world_size, solver.IMS_PER_BATCH,
            solver.BASE_LR, solver.MAX_ITER, tuple(solver.STEPS),
            cfg.SOLVER.REFERENCE_WORLD_SIZE,
        )  # fmt: skip

    def train(self) -> dict[str, Any]:
        """Train; return the final evaluation, checked against ``TEST.EXPECTED_RESULTS`` if set
        (``DefaultTrainer.train`` would look for it where only its own evaluation hook keeps it)."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if self.cfg.TEST.EXPECTED_RESULTS and comm.is_main_process():
            verify_results(self.cfg, self.eval_results)
        return self.eval_results

    def build_hooks(self) -> list[hooks.HookBase]:
        """detectron2's hooks, with the BN statistics averaged over the processes after PreciseBN,
        and the evaluation hook keeping the newest results in ``self.eval_results``
        (``train()`` returns them only with ``TEST.EXPECTED_RESULTS``)."""
        self.eval_results: dict[str, Any] = {}

        def evaluate() -> dict[str, Any]:
            self.eval_results = self.test(self.cfg, self.model)
            return self.eval_results

        built = []
        for hook in super().build_hooks():
            if isinstance(hook, hooks.EvalHook):
                hook = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, evaluate)
            built.append(hook)
            if isinstance(hook, hooks.PreciseBN):
                bn_layers = get_bn_modules(self.model)
                built.append(AverageBNStatistics(self.cfg.TEST.EVAL_PERIOD, bn_layers))
        return built

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's loader; for semantic segmentation with the paper's augmentation
        (:func:`transfer.semantic_seg.train_augmentations`) instead of the detection resize."""
        if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
            return super().build_train_loader(cfg)
        mapper = DatasetMapper(cfg, is_train=True, augmentations=train_augmentations(cfg))
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if evaluator_type == "coco":  # box AP, and mask / keypoint AP when the model predicts them
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS
            )
        if evaluator_type == "pascal_voc":  # AP, AP50, AP75 (VOC_YEAR 2007: 11-point)
            return PascalVOCDetectionEvaluator(dataset_name)
        if evaluator_type in ("sem_seg", "cityscapes_sem_seg"):  # mIoU, fwIoU, mACC, pACC
            return SemSegEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "lvis":  # needs the lvis package (pip install lvis)
            return LVISEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "cityscapes_instance":  # needs cityscapesscripts
            return CityscapesInstanceEvaluator(dataset_name)
        raise ValueError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}")


@dataclass(frozen=True)
class FineTune:
    """What to fine-tune: a config file (a path) and its ``KEY VALUE`` overrides; with
    ``eval_only``, evaluate ``MODEL.WEIGHTS`` instead. detectron2's ``default_setup`` logs it."""

    config_file: str
    opts: list[str] = field(default_factory=list)
    eval_only: bool = False


def build_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """detectron2 defaults + ``MOCO.*`` + the YAML + ``KEY VALUE`` overrides (not frozen), its
    ``MOCO.*`` values checked."""
    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    check_moco_config(cfg)
    return cfg


def trial_dir(cfg: CfgNode, trial: int) -> Path:
    return Path(cfg.OUTPUT_DIR) / f"trial_{trial}"


def setup(job: FineTune, trial: int) -> CfgNode:
    cfg = build_cfg(job.config_file, job.opts)
    cfg.OUTPUT_DIR = str(trial_dir(cfg, trial))
    cfg.SEED = max(cfg.SEED, 0) + trial
    cfg.freeze()
    register_datasets(cfg)
    _detach_previous_trial_logs()
    default_setup(cfg, job)  # output dir, logging to OUTPUT_DIR/log.txt, config.yaml, seeds
    return cfg


def _detach_previous_trial_logs() -> None:
    """Trials run one after another in one process: without this, detectron2's ``setup_logger``
    (cached per output folder) keeps the previous trial's handlers, so each later trial logs
    into every earlier trial's ``log.txt`` and repeats each line on the console."""
    setup_logger.cache_clear()
    for name in ("detectron2", "fvcore"):
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            handler.close()


# Settings that change how a run is logged, stored or fed, not what it learns or how it is scored.
NOT_PROTOCOL = {
    "SEED": None, "OUTPUT_DIR": None, "VIS_PERIOD": None, "CUDNN_BENCHMARK": None,
    "DATALOADER": ("NUM_WORKERS",), "TEST": ("EVAL_PERIOD",), "SOLVER": ("CHECKPOINT_PERIOD",),
    # where the data lies, not its labels (class names, keypoint names and flip pairs stay); the
    # metric a study decides on, which moco-report reads
    "MOCO": ("DATASETS.VOC", "DATASETS.COCO", "DATASETS.SEM_SEG", "PRIMARY_METRIC"),
}  # fmt: skip


# What names or checks the weights, not how they are fine-tuned: blank in recipe_sha256.
WEIGHTS_KEYS = {"MODEL": ("WEIGHTS",), "MOCO": ("INIT", "CHECK_BACKBONE_WEIGHTS")}


def protocol_of(
    given: CfgNode, effective: CfgNode, *, weights_sha256: str | None
) -> dict[str, Any]:
    """What makes trials comparable: the effective schedule (after ``REFERENCE_WORLD_SIZE``
    rescaling), the processes, the software, ``config_sha256``, a hash of the effective config
    with the weights by content, without the seed, the output folder, the dataset paths and the
    logging and loading periods, and ``recipe_sha256``, the same hash without the weights (also
    without ``MOCO.INIT`` and ``MOCO.CHECK_BACKBONE_WEIGHTS``, which only name and check them).
    ``moco-report`` pools the trials of one recipe, whatever backbone each started from, and pairs
    trials of two rows by seed only where their recipes agree."""
    world_size = comm.get_world_size()
    hashed = yaml.safe_load(effective.dump())
    for key, subkeys in NOT_PROTOCOL.items():
        for subkey in subkeys or ():
            *parents, last = subkey.split(".")
            node = hashed.get(key, {})
            for parent in parents:
                node = node.get(parent, {})
            node.pop(last, None)
        if subkeys is None:
            hashed.pop(key, None)
    hashed["MODEL"]["WEIGHTS"] = weights_sha256 or effective.MODEL.WEIGHTS
    hashed["world_size"] = world_size
    config_sha256 = _sha256(hashed)
    for key, subkeys in WEIGHTS_KEYS.items():
        for subkey in subkeys:
            hashed.get(key, {})[subkey] = ""
    solver = effective.SOLVER
    return {
        "config_sha256": config_sha256,
        "recipe_sha256": _sha256(hashed),
        "world_size": world_size,
        "ims_per_batch": solver.IMS_PER_BATCH,
        "ims_per_gpu": solver.IMS_PER_BATCH // world_size,
        "base_lr": solver.BASE_LR,
        "max_iter": solver.MAX_ITER,
        "steps": list(solver.STEPS),
        "reference_world_size": given.SOLVER.REFERENCE_WORLD_SIZE,
        "detectron2": detectron2.__version__,
        "torch": torch.__version__,
    }


def _sha256(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def input_convention_note(
    provenance: dict[str, Any] | None, weights: str, pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> str | None:  # fmt: skip
    """A warning when the weights' ``provenance`` records an input convention (``moco-convert``:
    e.g. a SimCLR port's unnormalised [0, 1] RGB) that the detector's normalisation may not
    match; None for weights without one."""
    expected = (provenance or {}).get("input")
    if not expected:
        return None
    return (
        f"{weights}: the backbone takes {expected}; this run normalises pixels with "
        f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD {list(pixel_std)}"
    )


def write_trial_results(
    cfg: CfgNode, results: dict[str, Any], *, trial: int, effective: CfgNode, config_file: str,
    pretraining: dict[str, Any] | None,
) -> Path:  # fmt: skip
    """The trial's ``results.json`` (:mod:`moco_pretrain.results`), read by ``moco-report``:
    the metrics, the weights' sha256 and ``pretraining`` (the provenance ``moco-convert`` recorded in the weights, or None), ``cfg``
    as given (before any rescaling), ``config_file`` and the :func:`protocol_of` the
    ``effective`` config.

    Written atomically: a trial is either finished (its results.json exists, whole) or not.
    """
    weights = cfg.MODEL.WEIGHTS  # "" for random init, or a URL (detectron2://...): no hash
    sha256 = file_sha256(weights) if os.path.isfile(weights) else None
    semantic = cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
    # e.g. "bbox/AP50", "segm/AP", "keypoints/AP", "sem_seg/mIoU"
    metrics = {k: float(v) for k, v in flatten_config(results, sep="/").items()}
    return write_results(
        cfg.OUTPUT_DIR,
        task="sem_seg" if semantic else "detection",
        metrics=metrics,
        config=yaml.safe_load(cfg.dump()),
        weights={"checkpoint": weights, "checkpoint_sha256": sha256},
        config_file=config_file,
        protocol=protocol_of(cfg, effective, weights_sha256=sha256),
        init=cfg.MOCO.INIT,
        trial=trial,
        seed=cfg.SEED,
        **({"partition": partition} if (partition := partition_of(cfg)) else {}),
        pretraining=pretraining,
    )


def partition_of(cfg: CfgNode) -> dict[str, list[str]] | None:
    """``MOCO.PARTITION`` as ``{"source": [...], "target": [...]}``; None when unset."""
    source, target = list(cfg.MOCO.PARTITION.SOURCE), list(cfg.MOCO.PARTITION.TARGET)
    return {"source": source, "target": target} if source or target else None


def set_aside_interrupted_attempt(output_dir: Path) -> None:
    """A trial directory with a ``metrics.json`` but no ``results.json`` holds an attempt that
    stopped: the trial restarts from iteration 0, and the attempt's ``metrics.json`` (which
    detectron2 would append to) moves to ``metrics.interrupted_N.json``, N counting attempts."""
    metrics = output_dir / "metrics.json"
    if not metrics.is_file() or (output_dir / RESULTS_FILE).is_file():
        return
    attempt = 1
    while (output_dir / f"metrics.interrupted_{attempt}.json").exists():
        attempt += 1
    kept = output_dir / f"metrics.interrupted_{attempt}.json"
    metrics.replace(kept)
    marker = output_dir / "last_checkpoint"
    stopped = f" (last checkpoint {marker.read_text().strip()})" if marker.is_file() else ""
    logging.getLogger("detectron2").info(
        "an earlier attempt of this trial stopped%s: restarting from iteration 0; its metrics are"
        " in %s",
        stopped, kept.name,
    )  # fmt: skip


def run_trial(job: FineTune, trial: int) -> dict[str, Any]:
    """One trial, in every process that ``launch`` starts."""
    cfg = setup(job, trial)
    if not job.eval_only and comm.is_main_process():
        set_aside_interrupted_attempt(Path(cfg.OUTPUT_DIR))
    # the schedule the trial trains (or trained) with: rescaled to the processes
    effective = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
    if job.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        load = partial(checkpointer.resume_or_load, cfg.MODEL.WEIGHTS, resume=False)
        run = partial(Trainer.test, cfg, model)
    else:
        trainer = Trainer(cfg)
        model = getattr(trainer.model, "module", trainer.model)  # unwrap DistributedDataParallel
        load = partial(trainer.resume_or_load, resume=False)
        run = trainer.train
    if cfg.MOCO.CHECK_BACKBONE_WEIGHTS:
        load_verified(model, load, weights=cfg.MODEL.WEIGHTS)
    else:
        load()
    # read once, never unpickled: how the backbone was pretrained (None for other weights)
    provenance = converted_provenance(cfg.MODEL.WEIGHTS)
    note = input_convention_note(
        provenance, cfg.MODEL.WEIGHTS, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD
    )
    if note and comm.is_main_process():
        logging.getLogger("detectron2").warning(note)
    results = run()
    if comm.is_main_process():
        config_file = Path(job.config_file).resolve()
        if config_file.is_relative_to(config_root().resolve()):
            config_file = config_file.relative_to(config_root().resolve())
        write_trial_results(
            cfg, results, trial=trial, effective=effective, config_file=str(config_file),
            pretraining=provenance,
        )  # fmt: skip
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--num-trials", type=int, default=1, help="trials 0..N-1 (default 1)")
    parser.add_argument("--trial", type=int, default=None, help="run only this trial")
    return parser


def fine_tune(
    job: FineTune, *, trials: Sequence[int], num_gpus: int = 1, num_machines: int = 1,
    machine_rank: int = 0, dist_url: str = "auto",
) -> None:  # fmt: skip
    """Run ``job``'s ``trials`` one after another, each on ``num_gpus`` processes per machine; a
    trial with a ``results.json`` is skipped (unless evaluating)."""
    cfg = build_cfg(job.config_file, job.opts)
    for trial in trials:
        done = trial_dir(cfg, trial) / RESULTS_FILE
        if done.is_file() and not job.eval_only:
            print(f"moco-transfer: trial {trial} is finished ({done}); skipped")
            continue
        launch(
            run_trial, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
            dist_url=dist_url, args=(job, trial),
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("moco-transfer"):  # bad config, missing data or weights
        if args.resume:
            raise ValueError(
                "--resume: detectron2 cannot continue a fine-tuning trial exactly (its checkpoints"
                " hold no sampler position or RNG state), so an unfinished trial restarts from"
                " iteration 0: rerun the command without --resume (to evaluate a checkpoint:"
                " --eval-only MODEL.WEIGHTS PATH)"
            )
        job = FineTune(str(resolve_config_file(args.config_file)), args.opts, args.eval_only)
        fine_tune(
            job, trials=[args.trial] if args.trial is not None else range(args.num_trials),
            num_gpus=args.num_gpus, num_machines=args.num_machines,
            machine_rank=args.machine_rank, dist_url=args.dist_url,
        )  # fmt: skip


if __name__ == "__main__":
    main()
