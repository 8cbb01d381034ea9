"""Models for the node roles, chosen from the dataset's meta.json name."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .nn_fashion import FashionCNN
from .nn_lenet import LeNet5

__all__ = ["FashionCNN", "LeNet5", "build_model", "model_name_for"]


def model_name_for(dataset_name: str) -> str:
    """'mnist*' -> 'lenet', 'fashion*' -> 'fashion'; anything else is an error."""
    n = dataset_name.lower()
    if n.startswith("fashion"):
        return "fashion"
    if n.startswith("mnist"):
        return "lenet"
    raise ValueError(f"no model for dataset {dataset_name!r}: expected a name starting "
                     "with 'mnist' or 'fashion' (dataset/meta.json 'name')")


def build_model(meta: Mapping[str, Any]) -> nn.Module:
    """A fresh model for the dataset described by meta.json."""
    shape = list(meta.get("input_shape", [1, 28, 28]))
    if len(shape) != 3 or shape[1:] != [28, 28]:
        raise ValueError(f"models here take 28x28 images, dataset input_shape is {shape}")
    num_classes = int(meta.get("num_classes", 10))
    kind = model_name_for(str(meta.get("name", "")))
    if kind == "fashion":
        return FashionCNN(num_classes=num_classes, in_channels=shape[0])
    return LeNet5(num_classes=num_classes, in_channels=shape[0])
