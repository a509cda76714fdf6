"""scikit-learn's handwritten digits (1797 8x8 images, shipped with the package: no download)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Digits:
    """A stratified train/test split. ``x_*``: pixel intensities in [0, 1], flattened to 64;
    ``y_*``: class labels 0-9. ``mean``/``std``: training-set pixel statistics (one scalar each)
    that the classifier's inputs are standardised with."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float

    def to(self, device) -> "Digits":
        return Digits(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                      self.y_test.to(device), self.mean, self.std)

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]


def load_digits(test_fraction: float = 0.2, seed: int = 0, limit: int = 0) -> Digits:
    """Load and split the digits (stratified by class; ``seed`` fixes the split).

    ``limit`` > 0 keeps only that many training examples (stratified too), for smoke runs.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0   # intensities 0..16 -> [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           stratify=y.numpy(), random_state=seed)
    if limit and limit < len(idx_train):
        idx_train, _ = train_test_split(idx_train, train_size=limit,
                                        stratify=y.numpy()[idx_train], random_state=seed)
    x_train, y_train = x[idx_train], y[idx_train]
    x_test, y_test = x[idx_test], y[idx_test]
    return Digits(x_train, y_train, x_test, y_test, float(x_train.mean()), float(x_train.std()))
