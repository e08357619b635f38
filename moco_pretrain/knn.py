"""Weighted k-nearest-neighbour classification on frozen features.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
(https://arxiv.org/abs/1805.01978), section 3.4: a test feature ``f`` votes with its ``k`` nearest
bank features ``v_i`` (cosine similarity ``s_i = f . v_i`` of L2-normalised features), each with
weight ``exp(s_i / T)``; the score of class ``c`` is ``sum_i exp(s_i / T) * [y_i == c]`` and the
prediction is the class with the highest score. Defaults ``k=200``, ``T=0.07`` as in the paper.

Memory is bounded for ImageNet-size banks (1.28M x 2048 in fp16 is 5.2 GB): the similarity matrix is
never materialised whole, only ``[chunk_size, bank_chunk_size]`` blocks, with a running top-k over the
bank blocks. The same code backs ``moco-knn`` and the kNN monitor of pretraining.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .distributed import concat_all_gather, get_world_size

__all__ = [
    "extract_features",
    "knn_accuracy",
    "knn_evaluate",
    "knn_scores",
    "topk_accuracy",
]


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


def _validate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
    bank_chunk_size: int,
) -> None:
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
    _validate(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
    )
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
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracies (percent) of the weighted kNN classifier, see :func:`topk_accuracy`."""
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
    )  # [M, C]
    return topk_accuracy(scores, test_labels, topk=topk)


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


def knn_evaluate(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    device: torch.device | str,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    feature_dtype: torch.dtype = torch.float32,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> dict[str, float]:
    """Extract a bank from ``train_loader`` and queries from ``val_loader``; top-1/top-5 in percent.

    Both loaders must be deterministic and un-augmented (see :func:`extract_features`). Under a
    process group every rank gathers the full bank and computes the same result (the vote itself is
    cheap next to the feature extraction).
    """
    bank, bank_labels = extract_features(
        model, train_loader, device=device, normalize=True, dtype=feature_dtype
    )  # [N, D], [N]
    queries, query_labels = extract_features(
        model, val_loader, device=device, normalize=True, dtype=feature_dtype
    )  # [M, D], [M]
    return knn_accuracy(
        bank,
        bank_labels,
        queries,
        query_labels,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
    )
