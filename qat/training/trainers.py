"""Which trainer class a recipe's ``trainer:`` key names: one small table, so that
``qat.train()`` and ``qat train`` pick the same class.

Each trainer registers itself where it is defined (``qat.training.trainer``: ``qat``;
``qat.integrations.trl``: ``sft``, TRL's SFTTrainer with qat's quantisers). A name not
registered yet is looked up in ``PROVIDERS`` and its module imported: the layer above
(integrations) fills the table without this one importing it.
"""

from __future__ import annotations

import importlib

from qat.errors import UsageError, did_you_mean

_TRAINERS: dict[str, type] = {}
# trainer name -> the module that registers it on import
PROVIDERS = {"qat": "qat.training.trainer", "sft": "qat.integrations.trl"}


def register_trainer(name: str, cls: type) -> None:
    """Make ``cls`` the trainer of the recipe value ``trainer: name``."""
    _TRAINERS[name] = cls


def trainer_class(name: str) -> type:
    """The trainer class ``trainer: name`` runs (importing its module on first use; a missing
    extra, e.g. TRL for ``sft``, is one UsageError line).

    >>> trainer_class("qat").__name__
    'QATTrainer'
    """
    if name not in _TRAINERS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])
    if name not in _TRAINERS:
        known = sorted({*PROVIDERS, *_TRAINERS})
        raise UsageError(
            f"unknown trainer {name!r}{did_you_mean(name, known)}; trainers: {', '.join(known)}"
        )
    return _TRAINERS[name]
