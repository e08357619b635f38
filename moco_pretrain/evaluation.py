"""Evaluation on frozen features, shared by the tasks: pretrained backbones, eval loaders, features,
top-k accuracy, the weighted kNN, the logistic probe and a task's ``results.json``.

``moco-knn``, linear classification (``moco-lincls``), the supervised baseline, the calibrated random
init and pretraining's kNN monitor and final comparison all evaluate through this module, so no task
imports another. The math (:func:`extract_features`, :func:`topk_accuracy`, :func:`knn_scores`,
:func:`knn_accuracy`, :func:`logistic_probe`) takes plain values; the helpers below it read
``cfg``, as the tasks' shared config adapters.

Weighted kNN: Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018 (https://arxiv.org/abs/1805.01978), section 3.4: a test feature ``f``
votes with its ``k`` nearest bank features ``v_i`` (cosine similarity ``s_i = f . v_i`` of
L2-normalised features), each with weight ``exp(s_i / T)``; the score of class ``c`` is
``sum_i exp(s_i / T) * [y_i == c]`` and the prediction is the class with the highest score.
Defaults ``k=200``, ``T=0.07`` as in the paper. Memory is bounded for ImageNet-size banks (1.28M x
2048 in fp16 is 5.2 GB): the similarity matrix is never materialised whole, only ``[chunk_size,
bank_chunk_size]`` blocks, with a running top-k over the bank blocks.

The logistic probe: multinomial logistic regression on standardised pooled features (full batch,
L-BFGS), with the L2 weight chosen on a held-out part of the training features, then refitted on
all of them; a seconds-long companion of the kNN that reads the same un-augmented features, so
that a run reports both at the cost of one extraction. It is not linear classification
(:mod:`moco_pretrain.lincls`: the paper's protocol, 100 epochs of SGD with random-resized-crop
augmentation on the frozen backbone).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .config import dataset_options, eval_transform_options
from .data import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    limit_samples,
    linear_train_transform,
    num_classes_of,
)
from .distributed import concat_all_gather, get_world_size, per_process_batch_size
from .engine import logger, unwrap
from .models import build_backbone
from .results import write_results
from .weights import BackboneWeights, load_backbone_state_dict

__all__ = [
    "backbone_of",
    "build_classifier_train_loader",
    "build_eval_loader_of",
    "build_frozen_backbone",
    "classification_step",
    "evaluate_classifier",
    "extract_features",
    "knn_accuracy",
    "knn_metrics_of",
    "knn_scores",
    "load_backbone_into",
    "load_pretrained",
    "logistic_probe",
    "topk_accuracy",
    "write_task_results",
]


# ------------------------------------------------------------------ features and top-k accuracy
def _loader_indices(loader: DataLoader) -> torch.Tensor:
    """Dataset indices in the order ``loader`` yields its samples (this rank's shard)."""
    if loader.batch_sampler is None:
        raise ValueError("extract_features needs a batched DataLoader (batch_size is not None)")
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            "extract_features needs a sampler that yields the same order on every pass "
            "(SequentialSampler or DistributedSampler), got RandomSampler: use shuffle=False"
        )
    return torch.tensor([i for batch in loader.batch_sampler for i in batch], dtype=torch.long)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``loader``'s dataset, in dataset-index order.

    The model runs in eval mode under ``torch.no_grad`` (its previous mode is restored afterwards).
    Under a process group each rank extracts the shard its sampler yields and the shards are
    all-gathered, so every rank returns the same full result. The duplicates that
    ``DistributedSampler`` pads with are dropped: each dataset index counts once and rows are sorted
    by dataset index. Peak memory is about twice the full result (gather buffer and de-duplicated
    copy): 10.5 GB per device for an fp16 ImageNet bank (1.28M x 2048).

    Args:
        model: maps an image batch ``[B, 3, H, W]`` to features ``[B, D]``; pass the module itself,
            not a ``DistributedDataParallel`` wrapper.
        loader: yields ``(images, labels)``; its sampler must give the same order on every pass
            (``SequentialSampler``, ``DistributedSampler``): the indices are read from it.
        device: where the model runs and where the returned tensors live.
        normalize: L2-normalise each feature (cosine similarity becomes a dot product).
        dtype: storage dtype of the features, e.g. ``torch.float16`` to halve an ImageNet bank.
            Normalisation happens in float32 before the cast.

    Returns:
        ``features [N, D]`` of ``dtype`` and ``labels [N]`` int64, both on ``device``.

    Raises:
        ValueError: a ``RandomSampler``, or a loader that does not cover every sample of its
            dataset (``drop_last``).
    """
    device = torch.device(device)
    indices = _loader_indices(loader)  # [n_local]
    was_training = model.training
    model.eval()
    features: torch.Tensor | None = None  # [n_local, D], allocated at the first batch
    labels = torch.empty(len(indices), dtype=torch.long, device=device)  # [n_local]
    offset = 0
    try:
        for images, targets in loader:
            out = model(images.to(device, non_blocking=True))  # [B, D]
            if out.ndim != 2:
                raise ValueError(f"model must return [B, D] features, got shape {tuple(out.shape)}")
            if normalize:
                out = F.normalize(out.float(), dim=1)
            if features is None:
                features = torch.empty(len(indices), out.shape[1], dtype=dtype, device=device)
            end = offset + out.shape[0]
            if end > len(indices):
                raise ValueError("the loader yielded more samples than its sampler lists")
            features[offset:end] = out.to(dtype)
            labels[offset:end] = torch.as_tensor(targets).to(device, non_blocking=True)
            offset = end
    finally:
        model.train(was_training)
    if features is None or offset != len(indices):
        raise ValueError(
            f"the loader yielded {offset} samples but its sampler lists {len(indices)}"
        )
    features, labels = _gather_unique(features, labels, indices.to(device))
    if len(labels) != len(loader.dataset):
        raise ValueError(
            f"the loader covers {len(labels)} of the {len(loader.dataset)} samples of its dataset"
            " (drop_last?): every sample must count once"
        )
    return features, labels


def _gather_unique(
    features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's ``(features [n, D], labels [n], indices [n])``, keep each index once.

    Ranks may hold different numbers of rows: each pads to the largest count with index -1 first,
    because ``concat_all_gather`` needs equal shapes.
    """
    if get_world_size() > 1:
        counts = concat_all_gather(torch.tensor([len(indices)], device=indices.device))  # [W]
        pad = int(counts.max()) - len(indices)
        if pad:
            features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
            labels = torch.cat([labels, labels.new_zeros(pad)])
            indices = torch.cat([indices, indices.new_full((pad,), -1)])
        features = concat_all_gather(features)  # [W * n_max, D]
        labels = concat_all_gather(labels)  # [W * n_max]
        indices = concat_all_gather(indices)  # [W * n_max]
    sorted_indices, order = torch.sort(indices, stable=True)  # padding (-1) sorts first
    keep = sorted_indices >= 0
    keep[1:] &= sorted_indices[1:] != sorted_indices[:-1]  # first copy of each dataset index
    order = order[keep]  # [N]
    return features[order], labels[order]


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, *, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-n accuracies in percent, e.g. ``{"top1": 71.2, "top5": 90.3}``.

    A sample counts as correct at top-n when its label is among its n highest ``scores``; n >= C
    gives 100 %. The order of tied scores is ``torch.topk``'s.

    Args:
        scores: ``[M, C]`` class scores or logits.
        labels: ``[M]`` true classes.
        topk: the n to report.
    """
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"expected scores [M, C] and labels [M], got {tuple(scores.shape)} and"
            f" {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no samples to score")
    ranked = scores.float().topk(min(max(topk), scores.shape[1]), dim=1).indices  # [M, n]
    hits = ranked == labels.to(ranked.device).view(-1, 1)  # [M, n]
    return {f"top{n}": 100.0 * float(hits[:, :n].any(dim=1).sum()) / scores.shape[0] for n in topk}


# ------------------------------------------------------------------ weighted kNN (Wu et al. 2018)
def _topk_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, *, k: int, bank_chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k similarities ``[M, k]`` (float32, descending) and bank indices ``[M, k]``.

    The bank is scanned in blocks of ``bank_chunk_size`` rows, merging each block's top-k into a
    running top-k, so at most ``[M, bank_chunk_size]`` similarities exist at once.
    """
    # fp16 matmul is native on accelerators; on the CPU it is slow, so blocks are upcast there.
    compute_dtype = torch.float32 if bank.device.type == "cpu" else bank.dtype
    queries = queries.to(device=bank.device, dtype=compute_dtype)  # [M, D]
    top_sim = queries.new_empty(queries.shape[0], 0, dtype=torch.float32)  # [M, <=k]
    top_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=bank.device)  # [M, <=k]
    for start in range(0, bank.shape[0], bank_chunk_size):
        block = bank[start : start + bank_chunk_size].to(compute_dtype)  # [b, D]
        sim = queries @ block.T  # [M, b]
        sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)  # [M, <=k]
        top_sim = torch.cat([top_sim, sim.float()], dim=1)  # [M, <=2k]
        top_idx = torch.cat([top_idx, idx + start], dim=1)  # [M, <=2k]
        if top_sim.shape[1] > k:
            top_sim, pos = top_sim.topk(k, dim=1)  # [M, k]
            top_idx = top_idx.gather(1, pos)  # [M, k]
    return top_sim, top_idx


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> torch.Tensor:
    """Class scores of the weighted kNN vote (Wu et al. 2018).

    ``score[j, c] = sum_{i in topk(j)} exp(s_ji / T) * [y_i == c]`` with ``s_ji`` the dot product
    of test feature ``j`` and bank feature ``i`` (cosine similarity for normalised features).
    Similarities may be fp16, but the weights are always computed in float32: ``exp(1 / 0.07)`` is
    1.6e6, beyond fp16's range.

    Args:
        train_features: the bank ``[N, D]``, L2-normalised, any float dtype; computation happens on
            its device.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_features: ``[M, D]`` L2-normalised queries (moved to the bank's device chunk by chunk).
        num_classes: number of classes C.
        k: neighbours per query; ``1 <= k <= N`` or ``ValueError`` (no silent clamping: a clamped k
            would change the metric without notice).
        temperature: T of the weights ``exp(s / T)``.
        chunk_size: queries per chunk.
        bank_chunk_size: bank rows per block; peak extra memory is about
            ``chunk_size * bank_chunk_size`` similarities.

    Returns:
        ``[M, C]`` float32 scores on the bank's device.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D, got bank {tuple(train_features.shape)} and test"
            f" {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: bank D={train_features.shape[1]},"
            f" test D={test_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape [{train_features.shape[0]}], got"
            f" {tuple(train_labels.shape)}"
        )
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the bank size N={train_features.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError(
            f"chunk sizes must be positive, got chunk_size={chunk_size},"
            f" bank_chunk_size={bank_chunk_size}"
        )
    if (
        train_labels.numel()
        and not 0 <= int(train_labels.min()) <= int(train_labels.max()) < num_classes
    ):
        raise ValueError(f"train_labels must lie in [0, num_classes={num_classes})")
    bank_labels = train_labels.to(device=train_features.device, dtype=torch.long)  # [N]
    scores = torch.zeros(
        test_features.shape[0], num_classes, dtype=torch.float32, device=train_features.device
    )  # [M, C]
    for start in range(0, test_features.shape[0], chunk_size):
        queries = test_features[start : start + chunk_size]  # [m, D]
        sim, idx = _topk_neighbours(train_features, queries, k=k, bank_chunk_size=bank_chunk_size)
        weights = (sim / temperature).exp()  # [m, k]
        scores[start : start + chunk_size].scatter_add_(1, bank_labels[idx], weights)  # [m, C]
    return scores


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    topk: Sequence[int] = (1, 5),
    **knn_options: Any,
) -> dict[str, float]:
    """Top-k accuracies (percent, :func:`topk_accuracy`) of the weighted kNN classifier;
    ``knn_options`` are :func:`knn_scores`' (``num_classes``, ``k``, ``temperature``, chunk sizes)."""
    scores = knn_scores(train_features, train_labels, test_features, **knn_options)  # [M, C]
    return topk_accuracy(scores, test_labels, topk=topk)


# ------------------------------------------------------------------ the logistic probe (L-BFGS)
def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[D, C]`` and bias ``[C]`` minimising mean cross-entropy + wd/2 * ||W||^2."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _logistic_top1(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> float:
    return 100.0 * float(((x @ weight + bias).argmax(dim=1) == y).float().mean())


def logistic_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
    val_fraction: float = 1 / 6,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Test top-1 (%) of the logistic probe: multinomial logistic regression fitted by L-BFGS on
    standardised features, its L2 weight chosen on held-out training features.

    Args:
        train_features: ``[N, D]`` features of the labelled training images (not normalised).
        train_labels: ``[N]`` their classes.
        test_features: ``[M, D]`` features of the test images.
        test_labels: ``[M]`` their classes.
        num_classes: C.
        weight_decays: candidate L2 weights; the one with the best held-out top-1 is refitted on
            all training features (ties: the first).
        val_fraction: share of the training features held out to choose the weight.
        max_iter: L-BFGS iterations per fit.
        seed: seed of the held-out split.

    Returns:
        ``{"top1": test top-1, "val_top1": its held-out top-1, "weight_decay": the chosen one}``.
    """
    x = train_features.detach().float().cpu()
    y = train_labels.detach().long().cpu()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # [D]; from training features only
    x = (x - mean) / std
    test_x = (test_features.detach().float().cpu() - mean) / std
    test_y = test_labels.detach().long().cpu()

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = order[: max(1, int(len(x) * val_fraction))]
    fit = order[len(held) :]
    scores = []
    for wd in weight_decays:
        weight, bias = _fit_logistic(
            x[fit], y[fit], num_classes=num_classes, weight_decay=wd, max_iter=max_iter
        )
        scores.append(_logistic_top1(x[held], y[held], weight, bias))
    best = max(range(len(scores)), key=scores.__getitem__)
    weight, bias = _fit_logistic(
        x, y, num_classes=num_classes, weight_decay=weight_decays[best], max_iter=max_iter
    )
    return {
        "top1": _logistic_top1(test_x, test_y, weight, bias),
        "val_top1": scores[best],
        "weight_decay": weight_decays[best],
    }


# ------------------------------------------------------------------ frozen backbones (read cfg)
def load_pretrained(
    cfg: CfgNode, path: str | Path, *, prefix: str | None = None
) -> BackboneWeights:
    """The backbone of checkpoint ``path`` (any layout :mod:`moco_pretrain.weights` reads).

    Raises:
        ValueError: the checkpoint records an ``arch`` other than ``cfg.MODEL.ARCH``.
    """
    weights = load_backbone_state_dict(path, prefix=prefix)
    recorded = weights.meta.get("arch")
    if recorded and recorded != cfg.MODEL.ARCH:
        raise ValueError(
            f"{path} holds a {recorded} backbone but MODEL.ARCH is {cfg.MODEL.ARCH}:"
            f" set MODEL.ARCH {recorded}"
        )
    logger.info(
        "pretrained backbone: %s (layout %s, sha256 %s, %d tensors)",
        path, weights.layout, weights.meta["sha256"][:12], len(weights.state_dict),
    )  # fmt: skip
    return weights


def load_backbone_into(model: nn.Module, weights: BackboneWeights, *, head: set[str]) -> None:
    """Load the backbone strictly: only the ``head`` keys may be missing, nothing unexpected."""
    try:
        result = model.load_state_dict(weights.state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. SMALL_STEM or ARCH differ
        raise ValueError(
            f"{weights.meta['path']} does not fit the configured backbone (check MODEL.ARCH and"
            f" MODEL.SMALL_STEM): {err}"
        ) from None
    if set(result.missing_keys) != head or result.unexpected_keys:
        raise ValueError(
            f"{weights.meta['path']}: backbone keys do not match the model: missing"
            f" {sorted(set(result.missing_keys) - head)[:10]}, unexpected"
            f" {sorted(result.unexpected_keys)[:10]}"
        )


def build_frozen_backbone(cfg: CfgNode, weights: BackboneWeights) -> nn.Module:
    """The pretrained ResNet returning pooled features ``[B, D]``, frozen, in eval mode."""
    model = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    load_backbone_into(model, weights, head=set())
    return model.requires_grad_(False).eval()


def backbone_of(classifier: nn.Module, cfg: CfgNode) -> nn.Module:
    """A copy of a torchvision ResNet ``classifier`` (a trained one, MoCo's query encoder) without
    its ``fc``: pooled features ``[B, D]``, on the classifier's device, in eval mode."""
    backbone = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    state = {k: v for k, v in unwrap(classifier).state_dict().items() if not k.startswith("fc.")}
    backbone.load_state_dict(state)
    return backbone.to(next(classifier.parameters()).device).eval()


# ------------------------------------------------------------------ data and metrics (read cfg)
def build_eval_loader_of(
    cfg: CfgNode, *, split: str, batch_size: int, max_samples: int = 0
) -> DataLoader:
    """Un-augmented batches of ``split`` (its first ``max_samples`` images when > 0)."""
    transform = eval_transform(**eval_transform_options(cfg))
    dataset = build_dataset(**dataset_options(cfg), split=split, transform=transform)
    return build_eval_loader(
        limit_samples(dataset, max_samples), batch_size=batch_size,
        num_workers=cfg.DATA.NUM_WORKERS,
    )  # fmt: skip


def knn_metrics_of(
    backbone: nn.Module, cfg: CfgNode, device: torch.device, *, probe: bool = False
) -> tuple[dict[str, float], int]:
    """Weighted kNN top-1/top-5 (%) on ``DATA.VAL_SPLIT`` with a bank from ``DATA.TRAIN_SPLIT``.

    With ``probe``, also ``linear_top1``: the logistic probe (:func:`logistic_probe`) on the same
    features, from one extraction. Returns the metrics and the number of bank images.
    """
    bank = build_eval_loader_of(
        cfg,
        split=cfg.DATA.TRAIN_SPLIT,
        batch_size=cfg.KNN.BATCH_SIZE_PER_PROCESS,
        max_samples=cfg.KNN.BANK_SIZE,
    )
    val = build_eval_loader_of(
        cfg, split=cfg.DATA.VAL_SPLIT, batch_size=cfg.KNN.BATCH_SIZE_PER_PROCESS
    )
    knn_options = {
        "num_classes": num_classes_of(val.dataset),
        "k": cfg.KNN.NEIGHBORS,
        "temperature": cfg.KNN.TEMPERATURE,
    }
    if not probe:
        # An ImageNet bank (1.28M x 2048) is 5.2 GB in fp16; CPU banks stay fp32 (slow fp16).
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        bank_x, bank_y = extract_features(backbone, bank, device=device, dtype=dtype)  # [N, D]
        val_x, val_y = extract_features(backbone, val, device=device, dtype=dtype)  # [M, D]
        return knn_accuracy(bank_x, bank_y, val_x, val_y, **knn_options), len(bank.dataset)
    bank_x, bank_y = extract_features(backbone, bank, device=device, normalize=False)  # [N, D]
    val_x, val_y = extract_features(backbone, val, device=device, normalize=False)  # [M, D]
    metrics = knn_accuracy(
        F.normalize(bank_x, dim=1), bank_y, F.normalize(val_x, dim=1), val_y, **knn_options
    )
    probed = logistic_probe(
        bank_x, bank_y, val_x, val_y, num_classes=knn_options["num_classes"], seed=cfg.SEED
    )
    metrics["linear_top1"] = probed["top1"]  # the metric's name since the first results
    return metrics, len(bank.dataset)


def evaluate_classifier(
    model: nn.Module, loader: DataLoader, *, device: torch.device
) -> dict[str, float]:
    """Top-1/top-5 (%) over ``loader``'s dataset, each image once (logits gathered under DDP)."""
    logits, labels = extract_features(unwrap(model), loader, device=device, normalize=False)
    return topk_accuracy(logits, labels, topk=(1, 5))  # logits: NxC, labels: N


def write_task_results(
    cfg: CfgNode,
    *,
    task: str,
    metrics: dict[str, float],
    weights: BackboneWeights | None = None,
    output_dir: str | Path | None = None,
    **extra: Any,
) -> Path:
    """``results.json`` (:mod:`moco_pretrain.results`) of a classification or kNN task, with the
    provenance of the pretrained ``weights``, in ``output_dir`` (default ``OUTPUT_DIR``)."""
    provenance = None
    if weights is not None:
        provenance = {
            "checkpoint": str(Path(weights.meta["path"]).resolve()),
            "checkpoint_sha256": weights.meta["sha256"],
            "layout": weights.layout,
        }
    return write_results(
        output_dir or cfg.OUTPUT_DIR, task=task, metrics=metrics,
        config=yaml.safe_load(cfg.dump()), weights=provenance, **extra,
    )  # fmt: skip


# ------------------------------------------------------------------ classifier training (read cfg)
# Linear classification's data and loss; the supervised baseline trains its whole ResNet on them.
def build_classifier_train_loader(cfg: CfgNode) -> DataLoader:
    """``DATA.TRAIN_SPLIT`` with RandomResizedCrop + flip, shuffled per epoch."""
    transform = linear_train_transform(**eval_transform_options(cfg))
    dataset = build_dataset(**dataset_options(cfg), split=cfg.DATA.TRAIN_SPLIT, transform=transform)
    return build_train_loader(
        limit_samples(dataset, cfg.DATA.MAX_SAMPLES),
        batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE),
        seed=cfg.SEED,
        num_workers=cfg.DATA.NUM_WORKERS,
        drop_last=False,
    )


def classification_step(
    model: nn.Module, batch: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the classifier and the batch's top-1 (%)."""
    images, target = batch  # images: Bx3xHxW, target: B
    logits = model(images)  # logits: BxC
    loss = F.cross_entropy(logits, target)
    return loss, {"acc1": (logits.argmax(dim=1) == target).float().mean() * 100}
