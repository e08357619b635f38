"""MoCo: a query encoder, a momentum key encoder and a queue of negative keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(https://arxiv.org/abs/1911.05722) and Chen et al., "Improved Baselines with Momentum Contrastive
Learning" (https://arxiv.org/abs/2003.04297). The constructor, the state-dict keys and the
numerics follow the official implementation (facebookresearch/moco, ``moco/builder.py``); the
deliberate differences are marked "Deviation" below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .distributed import broadcast_, concat_all_gather, get_rank, get_world_size, is_distributed
from .split_bn import convert_split_batchnorm


def build_projection_head(in_dim: int, out_dim: int, *, mlp: bool) -> nn.Module:
    """The projection head that sits at the encoder's ``fc``.

    MoCo v1: one linear layer (``fc.weight``/``fc.bias``). MoCo v2: ``Linear-ReLU-Linear`` whose
    keys (``fc.0.*``, ``fc.2.*``) are the official ones, so checkpoints load key for key.
    """
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class MoCo(nn.Module):
    """Momentum Contrast.

    Args:
        base_encoder: callable building the encoder from ``num_classes`` (e.g.
            ``torchvision.models.resnet50``); its ``fc`` is replaced by the projection head.
        dim: feature dimension C of queries and keys.
        K: queue size, the number of negative keys.
        m: momentum of the key-encoder update.
        T: softmax temperature.
        mlp: MoCo v2's 2-layer MLP head instead of a linear one.
        bn_splits: keyword-only. In one process, compute BN statistics over this many sub-batches
            (:class:`SplitBatchNorm`) and shuffle the key batch across them, the one-GPU emulation
            of Shuffle-BN. 1 keeps plain BN. Ignored for the shuffle under a process group, where
            the official cross-rank shuffle is used.
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        if K < 1:
            raise ValueError(f"queue size K must be positive, got {K}")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        self.K = K
        self.m = m
        self.T = T
        self.bn_splits = bn_splits

        self.encoder_q = self._build_encoder(base_encoder, dim, mlp=mlp, bn_splits=bn_splits)
        self.encoder_k = self._build_encoder(base_encoder, dim, mlp=mlp, bn_splits=bn_splits)
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.data.copy_(param_q.data)  # initialise the key encoder as a copy
            param_k.requires_grad = False  # updated by momentum, never by gradient

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # queue: CxK
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _build_encoder(
        base_encoder: Callable[..., nn.Module], dim: int, *, mlp: bool, bn_splits: int
    ) -> nn.Module:
        encoder = base_encoder(num_classes=dim)
        encoder.fc = build_projection_head(encoder.fc.in_features, dim, mlp=mlp)
        if bn_splits > 1:
            encoder = convert_split_batchnorm(encoder, num_splits=bn_splits)
        return encoder

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, over all parameters at once.

        Three foreach ops round exactly like the official per-parameter
        ``param_k * m + param_q * (1 - m)``, so the key encoder stays bit-identical.
        """
        params_k = [p.data for p in self.encoder_k.parameters()]
        scaled_q = torch._foreach_mul([p.data for p in self.encoder_q.parameters()], 1.0 - self.m)
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, scaled_q)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all ranks into the ring buffer at ``queue_ptr``.

        Deviation: the official code asserts ``K % batch_size == 0``; here the write wraps around,
        so any batch size up to K works.
        """
        keys = concat_all_gather(keys)  # keys: NxC over all ranks
        batch_size = keys.shape[0]
        if batch_size > self.K:
            raise ValueError(f"global batch of {batch_size} keys exceeds the queue size K={self.K}")
        # On the device, without reading the pointer back to the host (no sync per step).
        slots = (self.queue_ptr + torch.arange(batch_size, device=self.queue.device)) % self.K  # N
        self.queue.index_copy_(1, slots, keys.T.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + batch_size) % self.K)

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the key batch so that BN statistics differ from the query's (Shuffle-BN).

        Under a process group: the official cross-rank shuffle (gather, permutation broadcast from
        rank 0, take this rank's slice). In one process: a local permutation, meaningful with
        split BN. Returns the shuffled batch and the index that restores the original order.
        """
        if is_distributed():
            x_gather = concat_all_gather(x)  # x_gather: (world*N)x...
            idx_shuffle = broadcast_(torch.randperm(x_gather.shape[0]).to(x.device), src=0)
            idx_unshuffle = torch.argsort(idx_shuffle)
            idx_this = idx_shuffle.view(get_world_size(), -1)[get_rank()]
            return x_gather[idx_this], idx_unshuffle
        idx_shuffle = torch.randperm(x.shape[0]).to(x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`_batch_shuffle` (gathering across ranks under a process group)."""
        if is_distributed():
            x_gather = concat_all_gather(x)
            idx_this = idx_unshuffle.view(get_world_size(), -1)[get_rank()]
            return x_gather[idx_this]
        return x[idx_unshuffle]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            im_q: query images, Nx3xHxW.
            im_k: key images (another augmentation of the same images), Nx3xHxW.
        Returns:
            logits: Nx(1+K), the positive logit first, divided by T.
            labels: N zeros (the positive's index), on the logits' device.
        """
        q = F.normalize(self.encoder_q(im_q), dim=1)  # queries: NxC

        # record_function ranges name the parts for torch.profiler (tools/pretrain_speed.py).
        with torch.no_grad():  # no gradient to keys
            with record_function("moco/momentum_update"):
                self._momentum_update_key_encoder()
            shuffle = is_distributed() or self.bn_splits > 1
            if shuffle:
                with record_function("moco/shuffle"):
                    im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)  # keys: NxC
            if shuffle:
                with record_function("moco/shuffle"):
                    k = self._batch_unshuffle(k, idx_unshuffle)

        # Deviation: under autocast the logits are still computed in fp32; bf16 cannot resolve
        # logits of magnitude 1/T ~ 14 finely enough for the loss. The cost is one NxCxK matmul.
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k = q.float(), k.float()
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Nx1
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())  # negatives: NxK
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # logits: Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # N

        with record_function("moco/queue"):
            self._dequeue_and_enqueue(k)
        return logits, labels
