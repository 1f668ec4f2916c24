"""Config values as the library reads them: where the Hydra configs live, OmegaConf containers turned
into plain Python, and the check of a choice against its valid values (the error names both)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def conf_dir() -> Path:
    """The Hydra config folder: the copy an installed package ships (``phis/conf``), else the
    repository's top-level ``conf/`` (a checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "train.yaml").is_file():
            return folder
    raise FileNotFoundError(
        f"no Hydra configs (train.yaml) in {package / 'conf'} or {package.parent / 'conf'}"
    )


CONF_DIR = conf_dir()


def plain(cfg: Any) -> Any:
    """OmegaConf containers → plain dicts/lists (interpolations resolved); other values unchanged."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming ``key``, the bad ``value`` and the valid ``choices`` unless it is one."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {choices}")
