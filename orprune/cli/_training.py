"""What the training commands (``orprune spr``, ``orprune trp``) train and on what: options, data, model."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from orprune.cli._args import positive_int
from orprune.cli._io import load_model
from orprune.cli._report import warn
from orprune.examples import datasets
from orprune.examples.zoo import SmallCNN, resnet20

__all__ = ["add_training_source", "load_training_source", "starting_model"]


def add_training_source(parser: argparse.ArgumentParser, *, model: str, train_size_help: str) -> None:
    """The options saying what a training command trains and on what."""
    parser.add_argument("--model", choices=["resnet20", "small_cnn"], default=model,
                        help="architecture trained from scratch (orprune.examples.zoo)")
    parser.add_argument("--init", default=None,
                        help="start from a saved model (torch.save of the whole module, or orprune.save)")
    parser.add_argument("--model-module", metavar="MODULE", default=None,
                        help="FILE.py or module name defining the --init model's class")
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                        help="auto: Fashion-MNIST when installed, else digits (said so on stderr)")
    parser.add_argument("--data-root", default=None, help="a directory holding the Fashion-MNIST IDX files")
    parser.add_argument("--train-size", type=positive_int, default=None, help=train_size_help)


def load_training_source(args: argparse.Namespace, prog: str) -> tuple[
        nn.Module | None, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], str]:
    """``(--init model or None, (train images, labels), (test images, labels), dataset name)``; the model is
    loaded first, so that a bad ``--init`` fails before any data is read."""
    init = load_model(args.init, args.model_module)[0] if args.init is not None else None
    if args.dataset == "digits" or (args.dataset == "auto" and not datasets.fashion_mnist_available(args.data_root)):
        if args.dataset == "auto":
            warn(prog, "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or --data-root): "
                       "using scikit-learn's 8x8 digits (1437 training images) instead")
        return init, datasets.load_digits("train"), datasets.load_digits("test"), "digits"
    return (init, datasets.load_fashion_mnist(args.data_root, "train"),
            datasets.load_fashion_mnist(args.data_root, "test"), "fashion-mnist")


def starting_model(args: argparse.Namespace, init: nn.Module | None, in_channels: int) -> nn.Module:
    """The ``--init`` model, or a fresh ``--model`` for ``in_channels`` input channels."""
    return init if init is not None else (resnet20 if args.model == "resnet20" else SmallCNN)(in_channels=in_channels)
