"""Per-epoch random draws that a resumed run repeats exactly.

A dataset that draws its items at random keeps a ``seed`` and an ``epoch``; item ``i`` of epoch
``e`` comes from a generator seeded with ``(seed, e, i)``, so it depends on nothing else (not on
the worker that renders it, nor on the items drawn before it). A fixed set (valid/test) draws
item ``i`` from ``(seed, i)`` on every epoch.
"""

from __future__ import annotations

import numpy as np


class EpochSeeded:
    """Mixin for datasets drawn per epoch: :meth:`set_epoch` and :meth:`item_rng`.

    The subclass sets ``self.seed``; the training loop calls :meth:`set_epoch` at the start of
    each epoch.
    """

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def item_key(self, i: int, fixed: bool = False) -> tuple:
        """``(seed, i)`` for a fixed set, ``(seed, epoch, i)`` for one drawn per epoch."""
        return (self.seed, i) if fixed else (self.seed, self.epoch, i)

    def item_rng(self, i: int, fixed: bool = False) -> np.random.Generator:
        """The generator of item ``i`` (see :meth:`item_key`)."""
        return np.random.default_rng(self.item_key(i, fixed))
