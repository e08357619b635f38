#!/usr/bin/env python
"""Pretraining throughput, step-time split and peak memory: ours vs the official recipe.

Both variants train the same model on the same batches with the project's engine
(:class:`moco_pretrain.engine.Runner` driving :func:`moco_pretrain.pretrain.contrastive_step`),
alternating in rounds so that a noisy machine slows both alike. What ``ours`` and ``baseline``
(what the official ``main_moco.py`` does) each run, the modes (``model``: one synthetic batch on
the device; ``e2e``: the config's ``DATA.TRAIN_SPLIT`` through the CPU recipe, or for ours with
``--aug device`` through :mod:`moco_pretrain.gpu_augment`; ``pipeline``: ours end to end against
its model step and its loader without per-sample seeding), how images/s, the step split, peak
memory and ``--profile`` are measured, and the measured figures: docs/performance.md.

Examples (the CPU figures in docs/performance.md)::

    python tools/pretrain_speed.py --config-file pretrain/fashion_mnist_demo.yaml \
        --device cpu --mode pipeline --steps 10 --warmup 2 --rounds 7
    python tools/pretrain_speed.py --device cpu --threads 1 --steps 4 --warmup 2 --rounds 8 \
        --json out.json MODEL.ARCH resnet18 DATA.IMAGE_SIZE 64 SOLVER.BATCH_SIZE 32 MODEL.K 4096
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch.autograd import DeviceType
from torch.utils.data import DataLoader

from moco_pretrain.builder import MoCo
from moco_pretrain.checkpoint import Checkpointer
from moco_pretrain.config import augmentation_options, setup_cfg
from moco_pretrain.engine import AMP_DTYPES, Hook, Runner, Task
from moco_pretrain.gpu_augment import GpuMocoAugment, device_augment_step
from moco_pretrain.machine import describe_machine
from moco_pretrain.pretrain import (
    build_moco,
    build_optimizer,
    build_pretrain_loader,
    build_step,
    contrastive_step,
    prepare_model,
)
from moco_pretrain.schedules import scaled_lr

PARTS = (
    "data", "augment", "query_fwd_bwd", "key_fwd", "momentum_update", "shuffle", "queue",
    "optimizer", "other",
)  # fmt: skip


class OfficialMoCo(MoCo):
    """The official momentum update: one Python iteration and two new tensors per parameter."""

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak memory (MiB) allocated inside the block on top of what existed before it.

    CUDA: the caching allocator's peak. CPU (Linux): the process's resident-set high-water mark,
    reset through ``/proc/self/clear_refs``; includes allocator caching, so it is approximate, and
    the kernel updates the mark lazily: memory freed before an update can leave it below the
    resident set at the start, which counts as no growth.
    """
    result: dict[str, float | None] = {"mib": None}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result["mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        yield result
        result["mib"] = max(_status_kib("VmHWM") - before, 0) / 1024
    else:
        yield result


class StepClock:
    """Marks the end of every optimizer step without a host sync (CUDA events on CUDA)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []
        self.handle = optimizer.register_step_post_hook(self._mark)

    def _mark(self, *_: Any) -> None:
        if self.device.type == "cuda":
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        """Mean time between consecutive step ends: the steady state, without the first step's
        wait for the loader to start (which a long run amortises)."""
        self.handle.remove()
        first, last = self.marks[0], self.marks[-1]
        if self.device.type == "cuda":
            sync(self.device)
            return first.elapsed_time(last) / 1000 / (len(self.marks) - 1)
        return (last - first) / (len(self.marks) - 1)


# The record_function ranges that MoCo.forward and the device augmentation step open, by part.
RANGES = {
    "moco/augment": "augment", "moco/momentum_update": "momentum_update",
    "moco/shuffle": "shuffle", "moco/queue": "queue",
}  # fmt: skip


class StepProfiler(Hook):
    """The split of a runner's steps into :data:`PARTS`, in ms per step.

    Synchronised wall time through public hooks: the runner's ``before_step`` (``data``: loader
    and host-to-device copy since the last step's end), forward hooks on the two encoders and the
    whole model, and the optimizer's step hooks (``query_fwd_bwd`` adds the time from the model's
    forward end to the optimizer step: the loss, backward and ``zero_grad``). The MoCo-internal
    parts come from ``torch.profiler``: the device time of their ``record_function`` ranges on
    CUDA, their CPU time on the CPU.
    """

    def __init__(self, runner: Runner, device: torch.device) -> None:
        self.runner, self.device = runner, device
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._open: dict[str, float] = {}
        model: MoCo = runner.model
        self._handles = [model.register_forward_hook(self._forward_end)]
        for part, module in {"query_fwd_bwd": model.encoder_q, "key_fwd": model.encoder_k}.items():
            self._handles.append(module.register_forward_pre_hook(self._start(part)))
            self._handles.append(module.register_forward_hook(self._stop(part)))
        self._handles.append(runner.optimizer.register_step_pre_hook(self._before_optimizer))
        self._handles.append(runner.optimizer.register_step_post_hook(self._after_optimizer))

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _start(self, part: str) -> Callable[..., None]:
        return lambda *_: self._open.__setitem__(part, self.now())

    def _stop(self, part: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.totals[part] += self.now() - self._open.pop(part)

        return hook

    def before_step(self, runner: Runner) -> None:
        self.totals["data"] += self.now() - self._step_end

    def _forward_end(self, *_: Any) -> None:
        self._forward_end_at = self.now()

    def _before_optimizer(self, *_: Any) -> None:
        self._optimizer_start = self.now()
        self.totals["query_fwd_bwd"] += self._optimizer_start - self._forward_end_at

    def _after_optimizer(self, *_: Any) -> None:
        end = self.now()
        self.totals["optimizer"] += end - self._optimizer_start
        self.totals["step"] += end - self._step_end
        self._step_end = end
        self.steps += 1

    def run(self, epoch: int) -> dict[str, float]:
        """One instrumented epoch; returns ms per step for every part, ``other`` the remainder."""
        self.runner.register_hooks(self)
        self._step_end = self.now()
        try:
            with torch.profiler.profile(activities=profiler_activities(self.device)) as profile:
                quiet_epoch(self.runner, epoch)
        finally:
            self.runner.hooks.remove(self)
            for handle in self._handles:
                handle.remove()
        on_device = self.device.type == "cuda"
        for event in profile.key_averages():
            # Under CUDA profiling a range is listed twice (its CPU and its GPU row): the CPU row's
            # device time already holds the kernels launched inside it.
            if event.key in RANGES and event.device_type == DeviceType.CPU:
                microseconds = event.device_time_total if on_device else event.cpu_time_total
                self.totals[RANGES[event.key]] += microseconds / 1e6
        per_step = {k: 1000 * v / max(self.steps, 1) for k, v in self.totals.items()}
        per_step["other"] = per_step["step"] - sum(per_step.get(p, 0.0) for p in PARTS)
        return {p: round(per_step.get(p, 0.0), 3) for p in (*PARTS, "step")}


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    cuda = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    return [torch.profiler.ProfilerActivity.CPU, *cuda]


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
TOP_KERNELS = 12


def profile_steps(runner: Runner, device: torch.device, *, steps: int, epoch: int) -> dict:
    """``steps`` steps of ``runner`` under ``torch.profiler``, summarised by ``kernel_shares``."""
    runner.max_iters_per_epoch = steps
    clock = StepClock(runner.optimizer, device)  # no sync of its own
    with torch.profiler.profile(activities=profiler_activities(device)) as profile:
        quiet_epoch(runner, epoch)
    return kernel_shares(
        profile.key_averages(), steps=steps, step_s=clock.seconds_per_step(),
        on_cuda=device.type == "cuda",
    )  # fmt: skip


def kernel_shares(averages, *, steps: int, step_s: float, on_cuda: bool) -> dict[str, Any]:
    """The largest kernels (CUDA) or ops (CPU, by self time) and their share of the total, the
    fraction of the step (``step_s``, between step ends) spent in them, and host syncs (CUDA
    runtime synchronize calls; the engine's log point at the epoch's end is one) per step."""
    device_type = DeviceType.CUDA if on_cuda else DeviceType.CPU
    times: Counter[str] = Counter()  # microseconds
    for event in averages:
        # MoCo's record_function ranges (moco/queue, ...) hold kernels: counting them counts twice
        annotation = getattr(event, "is_user_annotation", False) or event.key.startswith("moco/")
        if event.device_type == device_type and not annotation:
            times[event.key] += (
                event.self_device_time_total if on_cuda else event.self_cpu_time_total
            )
    total = sum(times.values()) or 1.0
    syncs = sum(event.count for event in averages if event.key in SYNC_CALLS)
    largest = times.most_common(TOP_KERNELS)
    rest = total - sum(t for _, t in largest)
    top = [
        {"name": short_name(name), "share": t / total, "ms_per_step": t / 1000 / steps}
        for name, t in [*largest, ("(all others)", rest)]
    ]
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


def quiet_epoch(runner: Runner, epoch: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the engine's progress bar
        runner.train_one_epoch(epoch)


def build_runner(
    cfg: CfgNode, *, official: bool, loader, device, step: Callable = contrastive_step
) -> Runner:
    """``run_pretraining``'s model/optimizer set-up (ours) or the official one (baseline),
    training with ``step``."""
    if official:
        model = build_moco(cfg, moco_class=OfficialMoCo).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(), scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE),
            momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=False,
        )  # fmt: skip
    else:
        model = prepare_model(cfg, build_moco(cfg).to(device), device)
        optimizer = build_optimizer(cfg, model)
    channels_last = device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST and not official
    return Runner(
        Task(model, optimizer, loader, step),
        device=device,
        epochs=1,
        lr_at_epoch=lambda epoch: optimizer.defaults["lr"],
        checkpointer=Checkpointer(tempfile.gettempdir()),  # never called: no train()
        amp_dtype=None if official else AMP_DTYPES[cfg.TRAIN.AMP_DTYPE],
        channels_last=channels_last,
        log_period=1 if official else cfg.TRAIN.LOG_PERIOD,
    )


def synthetic_batches(cfg: CfgNode, steps: int, device: torch.device) -> list[Any]:
    """``steps`` times one batch of two random views, already on ``device``."""
    n, size = cfg.SOLVER.BATCH_SIZE, cfg.DATA.IMAGE_SIZE
    views = [torch.randn(n, 3, size, size, device=device) for _ in range(2)]
    return [(views, torch.zeros(n, dtype=torch.long, device=device))] * steps


def most_steps(args: argparse.Namespace) -> int:
    """The most steps of any one epoch: warm-up, a timed round or the profiled steps."""
    return max(args.warmup, args.steps, args.profile)


def one_round_workers(loader: DataLoader, *, dataset=None, sampler=None) -> DataLoader:
    """``loader`` with workers that end with each round (not persistent), so that no worker of one
    variant still works while the next is timed; optionally over another dataset and sampler."""
    return DataLoader(
        loader.dataset if dataset is None else dataset,
        batch_size=loader.batch_size,
        sampler=loader.sampler if sampler is None else sampler,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        generator=loader.generator,
    )


def build_pipeline_variants(
    cfg: CfgNode, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    """``end_to_end``, ``model_only`` and ``unseeded`` (see the module docstring)."""
    loader = build_pretrain_loader(cfg)  # SeededSamples over the dataset, EpochIndexSampler
    step = build_step(cfg, device)
    unseeded = one_round_workers(
        loader, dataset=loader.dataset.dataset, sampler=loader.sampler.sampler
    )
    return {
        "end_to_end": {"loader": one_round_workers(loader), "step": step},
        "model_only": {"loader": synthetic_batches(cfg, most_steps(args), device)},
        "unseeded": {"loader": unseeded, "step": step},
    }


def build_loaders(cfg: CfgNode, args: argparse.Namespace, device: torch.device):
    """(ours' loader, the baseline's loader, ours' device augmentation or None)."""
    if args.mode == "model":
        batches = synthetic_batches(cfg, most_steps(args), device)
        return batches, batches, None
    cpu_cfg, device_cfg = cfg.clone(), cfg.clone()
    cpu_cfg.defrost()
    cpu_cfg.DATA.DEVICE_AUG = False  # the PIL recipe, whatever the config's own input path
    cpu_loader = build_pretrain_loader(cpu_cfg)
    if args.aug == "cpu":
        return cpu_loader, cpu_loader, None
    device_cfg.defrost()
    device_cfg.DATA.DEVICE_AUG = True
    device_cfg.DATA.DEVICE_AUG_PRE_SIZE = args.pre_size or cfg.DATA.DEVICE_AUG_PRE_SIZE
    loader = build_pretrain_loader(device_cfg)
    augment = GpuMocoAugment(**augmentation_options(cfg)).to(device)
    return loader, cpu_loader, augment


def loader_seconds_per_batch(loader: DataLoader, batches: int, epoch: int) -> float:
    """Mean seconds per batch of ``loader`` alone, after its first batch (worker start-up)."""
    loader.sampler.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches


def seeding_cost(
    variants: dict[str, dict[str, Any]], results: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The seeded and unseeded loaders alone (the seeding costs far less than the noise of whole
    steps on a shared machine), alternating for ``--rounds``: medians in ms per batch, and their
    difference as a share of the end-to-end step: the slowdown when loading is serial with the
    step (no workers), its upper bound when workers load in parallel."""
    seconds: dict[str, list[float]] = {"end_to_end": [], "unseeded": []}
    for round_index in range(args.rounds):
        order = list(seconds) if round_index % 2 == 0 else list(reversed(seconds))
        for name in order:
            loader = variants[name]["loader"]
            seconds[name].append(loader_seconds_per_batch(loader, args.steps, round_index))
    seeded, unseeded = (1000 * statistics.median(seconds[n]) for n in ("end_to_end", "unseeded"))
    return {
        "seeded_ms_per_batch": seeded,
        "unseeded_ms_per_batch": unseeded,
        "share_of_step": (seeded - unseeded) / results["end_to_end"]["step_ms"],
    }


def speed_ratio(variant: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """images/s of ``variant`` over ``reference``: the median of the per-round ratios (the variants
    ran in the same rounds, so slow drifts in load cancel), and the peak-memory ratio."""
    paired = [
        r / v
        for v, r in zip(
            variant["step_seconds_per_round"], reference["step_seconds_per_round"], strict=True
        )
    ]
    memory = (
        variant["peak_memory_mib"] / reference["peak_memory_mib"]
        if variant["peak_memory_mib"] and reference["peak_memory_mib"]
        else None
    )
    return {
        "images_per_s": statistics.median(paired),
        "images_per_s_per_round": paired,
        "peak_memory": memory,
    }


# The ratios each mode reports, as (numerator, denominator) variants.
RATIOS = {
    "model": (("ours", "baseline"),),
    "e2e": (("ours", "baseline"),),
    "pipeline": (("end_to_end", "model_only"), ("end_to_end", "unseeded")),
}


def build_variants(
    cfg: CfgNode, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Per variant: ``build_runner``'s keyword arguments besides the config and device."""
    if args.mode == "pipeline":
        return build_pipeline_variants(cfg, args, device)
    ours_loader, base_loader, augment = build_loaders(cfg, args, device)
    ours_step = (
        contrastive_step if augment is None else device_augment_step(contrastive_step, augment)
    )
    return {
        "ours": {"loader": ours_loader, "step": ours_step},
        "baseline": {"loader": base_loader, "official": True},
    }


def measure(cfg: CfgNode, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the official main_moco.py
    torch.manual_seed(cfg.SEED)
    trainers, results = {}, {}
    variants = build_variants(cfg, args, device)
    for name, spec in variants.items():
        spec = {"official": False, **spec}
        with peak_memory(device) as peak:  # build + warm-up steps (optimizer state included)
            trainers[name] = build_runner(cfg, device=device, **spec)
            trainers[name].max_iters_per_epoch = args.warmup
            quiet_epoch(trainers[name], 0)
        results[name] = {"peak_memory_mib": peak["mib"], "step_seconds_per_round": []}
    for round_index in range(args.rounds):  # alternate, so machine noise hits all alike
        order = list(trainers.items())
        for name, trainer in order if round_index % 2 == 0 else reversed(order):
            trainer.max_iters_per_epoch = args.steps
            clock = StepClock(trainer.optimizer, device)
            quiet_epoch(trainer, round_index + 1)
            results[name]["step_seconds_per_round"].append(clock.seconds_per_step())
    for name, trainer in trainers.items():
        seconds = statistics.median(results[name]["step_seconds_per_round"])
        results[name]["images_per_s"] = cfg.SOLVER.BATCH_SIZE / seconds
        results[name]["step_ms"] = 1000 * seconds
        profiler = StepProfiler(trainer, device)
        results[name]["split_ms"] = profiler.run(args.rounds + 1)
        if args.profile:
            results[name]["profile"] = profile_steps(
                trainer, device, steps=args.profile, epoch=args.rounds + 2
            )
    ratios = {f"{a}/{b}": speed_ratio(results[a], results[b]) for a, b in RATIOS[args.mode]}
    if args.mode == "pipeline":
        results["seeding"] = seeding_cost(variants, results, args)
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": describe_machine(device),
        "config": {
            "mode": args.mode,
            "aug": args.aug if args.mode == "e2e" else None,
            "arch": cfg.MODEL.ARCH,
            "image_size": cfg.DATA.IMAGE_SIZE,
            "batch_size": cfg.SOLVER.BATCH_SIZE,
            "K": cfg.MODEL.K,
            "mlp": cfg.MODEL.MLP,
            "bn_splits": cfg.MODEL.BN_SPLITS,
            "amp_dtype": cfg.TRAIN.AMP_DTYPE if device.type == "cuda" else "",
            "channels_last": device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST,
            "compile": cfg.TRAIN.COMPILE,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "profile": args.profile,
            "num_workers": cfg.DATA.NUM_WORKERS,
            "device_aug": cfg.DATA.DEVICE_AUG,
        },  # fmt: skip
        **results,
        **({"ratio": ratios["ours/baseline"]} if "ours/baseline" in ratios else {"ratios": ratios}),
    }


def format_table(report: dict[str, Any]) -> str:
    header = f"{'variant':<10} {'img/s':>8} {'ms/step':>8} {'peak MiB':>9}  " + " ".join(
        f"{p:>9.9}" for p in PARTS
    )
    lines = [header]
    ratios = report["ratios"] if "ratios" in report else {"ours/baseline": report["ratio"]}
    names = dict.fromkeys(name for pair in ratios for name in pair.split("/"))
    for name in names:
        r = report[name]
        peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
        split = " ".join(f"{r['split_ms'][p]:>9.2f}" for p in PARTS)
        lines.append(
            f"{name:<10} {r['images_per_s']:>8.1f} {r['step_ms']:>8.1f} {peak:>9}  {split}"
        )
    for pair, ratio in ratios.items():
        memory = f"{ratio['peak_memory']:.2f}x" if ratio["peak_memory"] is not None else "n/a"
        rounds = ", ".join(f"{r:.2f}" for r in ratio["images_per_s_per_round"])
        lines.append(
            f"{pair}: {ratio['images_per_s']:.2f}x images/s (median of rounds: {rounds}), "
            f"{memory} peak memory"
        )
    for name in names:
        if profile := report[name].get("profile"):
            lines.append(
                f"{name} under the profiler: {profile['step_ms']:.1f} ms/step,"
                f" {profile['busy']:.0%} in {profile['timed']},"
                f" {profile['host_syncs_per_step']:g} host syncs/step; share, ms/step:"
            )
            lines += [
                f"{row['share']:8.1%} {row['ms_per_step']:9.2f}  {row['name']}"
                for row in profile["top"]
            ]
    if "seeding" in report:
        seeding = report["seeding"]
        lines.append(
            f"loader alone: seeded {seeding['seeded_ms_per_batch']:.1f} ms/batch, unseeded "
            f"{seeding['unseeded_ms_per_batch']:.1f} ms/batch: seeding costs "
            f"{100 * seeding['share_of_step']:+.2f} % of the end-to-end step"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="", help="pretraining config (default: defaults)")
    parser.add_argument("--mode", choices=("model", "e2e", "pipeline"), default="model")
    parser.add_argument("--aug", choices=("cpu", "device"), default="cpu", help="e2e: ours' aug")
    parser.add_argument(
        "--pre-size", type=int, default=0, help="device aug decode size (0: the config's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (>= 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (memory measured)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; median kept")
    parser.add_argument(
        "--profile", type=int, default=0, help="then profile this many steps (0: none; >= 2)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default="", help="also write the report here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if args.steps < 2 or min(args.warmup, args.rounds) < 1 or args.profile == 1:
        raise ValueError(
            "need --steps >= 2, --profile 0 or >= 2 (step ends are timed), --warmup and"
            " --rounds >= 1"
        )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file or None, args.opts, pretraining=True)
    report = measure(cfg, args)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
