"""torch.hub entry point: ``torch.hub.load(<checkout>, 'phis_student', path=..., source='local')``."""

from typing import Any

from torch import nn

dependencies = ["torch", "safetensors", "huggingface_hub"]


def phis_student(path: str, **kwargs: Any) -> nn.Module:
    """A trained phis student (``phis.model.PhisModel``) from an exported directory, a run directory,
    a ``.ckpt`` or a Hugging Face hub repository id; ``kwargs`` go to ``phis.load``."""
    import phis

    return phis.load(path, **kwargs)
