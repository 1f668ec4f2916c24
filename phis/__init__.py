"""phis: label-free multi-teacher distillation with PHI-S normalization.

``phis.load(path)`` gives a trained student as a ``phis.model.PhisModel``; importing ``phis`` itself
loads nothing else.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def load(source: str | os.PathLike, **kwargs: Any) -> Any:
    """A trained student as a ``PhisModel``, from an exported directory (``python -m phis.export``, or a
    finished run's ``student/``), a run directory or ``.ckpt`` without one (converted in memory, which
    needs the training dependencies), or a Hugging Face hub repository id. ``kwargs`` go to
    ``PhisModel.from_pretrained`` (``map_location``, ``external_preprocessing``, ``resolution_policy``)."""
    from phis.model import PhisModel, locate_model

    if not os.path.exists(source):  # a hub repository id
        return PhisModel.from_pretrained(str(source), **kwargs)
    kind, path = locate_model(source)
    if kind == "export":
        return PhisModel.from_pretrained(path, **kwargs)
    from phis.student import load_phis_source  # the training stack, to rebuild a checkpoint's student

    return load_phis_source(path, **kwargs)
