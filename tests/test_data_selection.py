"""DATA.CLASSES and DATA.HOLDOUT: the images a run trains and validates on, and their record."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moco_pretrain.config import dataset_options, setup_cfg
from moco_pretrain.controls import calibrate_bn
from moco_pretrain.data import (
    HOLDOUT_SPLIT,
    build_dataset,
    data_record,
    image_ids,
    limit_samples,
    num_classes_of,
)


def options(root, *overrides: str) -> dict:
    cfg = setup_cfg("pretrain/fashion_mnist_demo.yaml", ["DATA.ROOT", str(root), *overrides])
    return dataset_options(cfg)


def labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def test_classes_keep_their_images_labelled_in_the_given_order(tiny_fashion_mnist):
    # tiny data: 8 training images per class, class c at indices 8c..8c+7
    dataset = build_dataset(
        **options(tiny_fashion_mnist, "DATA.CLASSES", "[7, 2]", "DATA.HOLDOUT", "0", "DATA.VAL_SPLIT", "test"),
        split="train", transform=None,
    )  # fmt: skip
    assert image_ids(dataset) == [*range(16, 24), *range(56, 64)]  # stored order, not class order
    assert labels_of(dataset) == [1] * 8 + [0] * 8  # class 7 is label 0, class 2 label 1
    assert num_classes_of(dataset) == 2 and dataset.classes == ["Sneaker", "Pullover"]
    test = build_dataset(
        **options(tiny_fashion_mnist, "DATA.CLASSES", "[7, 2]", "DATA.HOLDOUT", "0", "DATA.VAL_SPLIT", "test"),
        split="test", transform=None,
    )  # fmt: skip
    assert image_ids(test) == [*range(8, 12), *range(28, 32)]  # 4 test images per class


def test_the_holdout_is_random_training_images_the_same_for_every_seed(tiny_fashion_mnist):
    held = {}
    for seed in ("0", "1"):
        opts = options(
            tiny_fashion_mnist, "DATA.CLASSES", "[0, 2]", "DATA.HOLDOUT", "3", "SEED", seed
        )
        train = build_dataset(**opts, split="train", transform=None)
        held[seed] = build_dataset(**opts, split=HOLDOUT_SPLIT, transform=None)
        assert image_ids(train) == [0, 1, 4, 5, 6, 7, 16, 17, 18, 20, 21, 22, 23]
        assert image_ids(held[seed]) == [2, 3, 19]  # of both classes, not the last three
        assert labels_of(held[seed]) == [0, 0, 1]
    test = build_dataset(**opts, split="test", transform=None)
    assert len(test) == 8  # the holdout is of the training split only


def test_the_record_digests_the_image_ids_through_every_wrapper(tiny_fashion_mnist):
    opts = options(tiny_fashion_mnist, "DATA.CLASSES", "[0, 2]", "DATA.HOLDOUT", "3")
    dataset = limit_samples(build_dataset(**opts, split="train", transform=None), 10)
    record = data_record(dataset, name="fashion_mnist", split="train")
    ids = "fashion_mnist:train:T-shirt/top,Pullover:" + ",".join(
        map(str, [0, 1, 4, 5, 6, 7, 16, 17, 18, 20])
    )
    assert record == {
        "name": "fashion_mnist", "split": "train", "classes": ["T-shirt/top", "Pullover"],
        "images": 10, "images_sha256": hashlib.sha256(ids.encode()).hexdigest(),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["DATA.CLASSES", "[10]"], "DATA.CLASSES holds 10, not a class index of this data set"),
        (["DATA.HOLDOUT", "80"], "DATA.HOLDOUT 80 leaves none of the 80 training images"),
    ],
)
def test_classes_and_holdouts_the_data_cannot_give_are_one_line(
    tiny_fashion_mnist, overrides, message
):
    opts = options(tiny_fashion_mnist, "DATA.HOLDOUT", "0", "DATA.VAL_SPLIT", "test", *overrides)
    with pytest.raises(ValueError) as error:
        build_dataset(**opts, split="train", transform=None)
    assert str(error.value).startswith(message)


def test_calibrated_bn_holds_the_exact_statistics_of_the_images():
    torch.manual_seed(0)
    images = torch.randn(12, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    loader = DataLoader(TensorDataset(images, torch.zeros(12)), batch_size=4)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.3), nn.Conv2d(3, 2, 1))
    weights = [p.clone() for p in model.parameters()]
    assert calibrate_bn(model, loader, device=torch.device("cpu")) == 12
    norm = model[0]
    per_channel = images.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(norm.running_mean, per_channel.mean(dim=1))
    # momentum None averages the batches' unbiased variances (precise BN's estimate)
    batch_vars = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1) for b in images.split(4)])
    torch.testing.assert_close(norm.running_var, batch_vars.mean(dim=0))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert norm.momentum == 0.3 and norm.num_batches_tracked == 3  # its momentum restored
    np.testing.assert_allclose(norm.weight.detach().numpy(), 1.0)
