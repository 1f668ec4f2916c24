"""Image files on disk: which suffixes count as images, and listing them (training folders, shard
held-out folders and labelled evaluation folders all read images through here)."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    """True for a file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (and its subfolders if ``recursive``), sorted by path."""
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image(p))
