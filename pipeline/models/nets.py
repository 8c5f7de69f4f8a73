"""Classifiers: plain nn.Modules (input normalisation inside) and the Lightning module that trains them."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import Normalize

from pipeline.errors import CheckpointError, raise_if_stopped
from pipeline.models.adversarial import Recipe

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class CNN(nn.Sequential):
    """5×5 conv/max-pool blocks and a hidden dense layer; [0,1] images (B,1,28,28) → logits.
    `padding` 0 shrinks each conv's output by 4 pixels; 2 keeps its size (TensorFlow's 'SAME')."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        padding: int = 0,
    ) -> None:
        layers: list[nn.Module] = [Normalize(MNIST_MEAN, MNIST_STD)]
        size = image_size
        for c_in, c_out in pairwise((in_channels, *channels)):
            layers += [nn.Conv2d(c_in, c_out, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
            size = (size - 4 + 2 * padding) // 2
        layers += [
            nn.Flatten(),
            nn.Linear(channels[-1] * size * size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        ]
        super().__init__(*layers)


class MLP(nn.Sequential):
    """Fully connected ReLU net, e.g. Szegedy et al.'s FC100-100-10: [0,1] images → logits."""

    def __init__(
        self, hidden: Sequence[int] = (100, 100), num_classes: int = 10, in_features: int = 784
    ) -> None:
        layers: list[nn.Module] = [Normalize(MNIST_MEAN, MNIST_STD), nn.Flatten()]
        widths = (in_features, *hidden)
        for d_in, d_out in pairwise(widths):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*layers)


class Classifier(L.LightningModule):
    """Trains `net` (a `_target_` config dict) with Adam and a one-cycle learning rate, on the
    training images as they are or, with `adversarial` (the `train` config of train=adversarial
    or train=trades), on adversarials crafted against the current weights."""

    def __init__(
        self,
        net: dict,
        num_classes: int = 10,
        lr: float = 1e-3,
        max_lr: float = 3e-3,
        weight_decay: float = 0.0,
        adversarial: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the pipeline logs the full config itself
        self.net = instantiate(net)
        self.recipe = Recipe.from_config(adversarial) if adversarial else None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        raise_if_stopped()
        x, y = batch
        if self.recipe is None:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        else:
            eps = self.recipe.eps_at(self.current_epoch + batch_idx / self.trainer.num_training_batches)
            loss, logits = self.recipe.loss(self.net, x, y, eps)
            self.log("train_eps", eps, on_step=True, on_epoch=False)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_accuracy", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.net(x), y)
        self.log("test_accuracy", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hp.max_lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_classifier(checkpoint_path: str | Path) -> nn.Module:
    """The network in a pipeline checkpoint, in eval mode, mapping [0,1] images to logits."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass an existing .ckpt "
            "(see outputs/checkpoints/) or leave `checkpoint` unset to train one"
        )
    try:
        classifier = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).split(". ")[0].splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {reason}); "
            "pass another checkpoint=, or retrain a cached one with train.force=true"
        ) from error
    return classifier.net.eval()
