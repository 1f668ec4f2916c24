"""Decoding images to the size they are used at: the exact path equals a full decode with one bicubic
resize and a centre crop; reduced-scale JPEG decoding picks the right DCT scale and stays within 2/255 of
it; every training and evaluation path honours the switch; broken JPEGs are skipped and counted; the
GPU decode option fails clearly where it cannot run."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from phis.data import ImageFolder
from phis.evaldata import ImageFolderSet
from phis.images import decode_crop, decode_jpegs, open_rgb, resized_size
from phis.photos import load_source
from phis.shards import HeldoutImages, ShardStream, decode_sample

# (width, height) of the test JPEGs: sides that 8 does not divide, both orientations, 384-1024 px.
SHAPES = [(1001, 755), (640, 427), (512, 512), (397, 1023), (1024, 768), (777, 600)]
PHOTOS = ["astronaut", "chelsea", "rocket", "hubble_deep_field", "grace_hopper", "brick"]


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Offline photos resized to ``SHAPES`` as JPEGs (quality 95, 4:2:0, like img2dataset's)."""
    return [
        _jpeg(Image.fromarray(load_source(name)).resize(shape, Image.Resampling.BICUBIC))
        for name, shape in zip(PHOTOS, SHAPES)
    ]


def reference(data: bytes, size: int) -> np.ndarray:
    """The exact crop, written out independently: full decode, one bicubic resize, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def levels(a: torch.Tensor | np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| per pixel in 1/255 levels."""
    return np.abs(np.asarray(a, dtype=np.float64) - b.astype(np.float64))


def write_shard(path: Path, samples: dict[str, tuple[str, bytes]]) -> str:
    """One shard of ``key -> (extension, bytes)``; its URL."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, (ext, data) in samples.items():
            sink.write({"__key__": key, ext: data})
    return str(path)


@pytest.mark.parametrize("size", [64, 224])
def test_exact_decoding_is_the_reference(jpegs: list[bytes], size: int) -> None:
    for data in jpegs:
        assert np.array_equal(decode_crop(io.BytesIO(data), size, "exact").numpy(), reference(data, size))


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_reduced_decoding_stays_within_two_levels_of_the_exact_crop(jpegs: list[bytes], size: int) -> None:
    diffs = [levels(decode_crop(io.BytesIO(d), size), reference(d, size)) for d in jpegs]
    mean = np.mean([d.mean() for d in diffs])
    assert mean <= 2.0, [round(d.mean(), 2) for d in diffs]
    assert max(d.mean() for d in diffs) <= 3.0  # no single image far off either
    if size < 384:  # the decoder scaled: the pixels differ from the exact ones, slightly
        assert mean > 0.05


@pytest.mark.parametrize(
    "shape, size, scale",
    [
        ((1000, 750), 256, 2),  # resized to 341 x 256: 1/2 gives 500 x 375, 1/4 would give 250 x 188
        ((1024, 1024), 128, 8),  # exactly 1/8
        ((1024, 1024), 129, 4),  # 1/8 would be one pixel short
        ((1001, 801), 100, 8),  # 126 x 101: sides rounded up
        ((397, 1023), 64, 4),  # portrait: 64 x 165 needed, 1/4 gives 100 x 256
        ((640, 427), 224, 1),  # 336 x 224 needed: no power of two fits
        ((600, 400), 1024, 1),  # an upscale decodes in full
    ],
)
def test_draft_decodes_at_the_smallest_scale_that_covers_the_resize(shape, size, scale) -> None:
    data = _jpeg(Image.fromarray(load_source("chelsea")).resize(shape))
    image, original, extent = open_rgb(io.BytesIO(data), size, "reduced")
    assert original == shape and image.mode == "RGB"
    assert image.size == (math.ceil(shape[0] / scale), math.ceil(shape[1] / scale))
    assert extent == (shape[0] / scale, shape[1] / scale)
    w, h = resized_size(*shape, size)
    assert image.width >= min(w, shape[0]) and image.height >= min(h, shape[1])  # never below the resize
    full, _, full_extent = open_rgb(io.BytesIO(data), size, "exact")
    assert full.size == shape and full_extent == shape
    png = io.BytesIO()
    Image.fromarray(load_source("chelsea")).resize(shape).save(png, format="PNG")
    assert open_rgb(png, size, "reduced")[0].size == shape  # only JPEGs scale in the decoder


def test_grayscale_and_png_images_decode_to_rgb_in_both_modes(jpegs: list[bytes]) -> None:
    gray = _jpeg(Image.open(io.BytesIO(jpegs[0])).convert("L"))
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[1])).save(png, format="PNG")
    for decode in ("reduced", "exact"):
        assert decode_crop(io.BytesIO(gray), 64, decode).shape == (3, 64, 64)
        crop = decode_crop(io.BytesIO(png.getvalue()), 64, decode)
        assert levels(crop, reference(png.getvalue(), 64)).mean() <= 0.5


def test_every_decoding_path_takes_the_switch(jpegs: list[bytes], tmp_path: Path) -> None:
    """Shards (training stream, held-out sets) and image folders (training, evaluation) decode exactly
    with decode=exact and within the bound by default."""
    size = 96
    refs = {f"{i:03d}": reference(d, size) for i, d in enumerate(jpegs)}
    url = write_shard(tmp_path / "s.tar", {k: ("jpg", d) for k, d in zip(refs, jpegs)})
    folder = tmp_path / "folder" / "cls"
    folder.mkdir(parents=True)
    for k, d in zip(refs, jpegs):
        (folder / f"{k}.jpg").write_bytes(d)

    def crops(decode: str) -> dict[str, list[np.ndarray]]:
        stream = ShardStream(url, size, 2, resampled=False, shuffle_buffer=0, epoch_steps=None, decode=decode)
        batches = list(stream)
        out = {"stream": [b["images"][i].numpy() for b in batches for i in range(len(b["keys"]))]}
        assert [k for b in batches for k in b["keys"]] == list(refs)
        out["sample"] = [decode_sample({"jpg": d}, size, decode).numpy() for d in jpegs]
        out["heldout shards"] = list(HeldoutImages(url, size, decode=decode).images.numpy())
        out["heldout folder"] = list(HeldoutImages(str(folder.parent), size, decode=decode).images.numpy())
        data = ImageFolder(folder.parent, size, split="all", decode=decode)
        out["image folder"] = [(data[i] * 255).round().numpy() for i in range(len(data))]
        return out

    expected = list(refs.values())
    for path, got in crops("exact").items():
        assert all(np.array_equal(g, e) for g, e in zip(got, expected)), path
    for path, got in crops("reduced").items():
        mean = np.mean([levels(g, e).mean() for g, e in zip(got, expected)])
        assert 0 < mean <= 2.0, (path, mean)
    assert (
        ImageFolder(folder.parent, size, decode="exact").fingerprint()
        != ImageFolder(folder.parent, size).fingerprint()
    )  # teacher caches of the two modes never mix


def test_evaluation_folders_take_the_switch(jpegs: list[bytes], tmp_path: Path) -> None:
    """Labelled evaluation folders: exact is the full decode with the evaluation's antialiased bilinear
    resize; reduced stays within two levels of it."""
    for i, d in enumerate(jpegs):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"c{i % 2}" / f"{i}.jpg").write_bytes(d)
    exact, reduced = (ImageFolderSet(tmp_path, 64, decode=m) for m in ("exact", "reduced"))
    diffs = []
    for i, (path, _) in enumerate(exact.samples):
        with Image.open(path) as im:
            full = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        w, h = resized_size(full.shape[2], full.shape[1], 64)
        want = torch.nn.functional.interpolate(full[None], size=(h, w), mode="bilinear", antialias=True)[0]
        top, left = (h - 64) // 2, (w - 64) // 2
        want = want[:, top : top + 64, left : left + 64].clamp(0, 1)
        assert torch.equal(exact[i][0], want)
        diffs.append(float((reduced[i][0] - want).abs().mean()) * 255)
    assert 0 < np.mean(diffs) <= 2.0, diffs


def test_a_stream_resumed_mid_epoch_decodes_the_same_pixels(jpegs: list[bytes], tmp_path: Path) -> None:
    """Reduced-scale decoding (here 1/4 and 1/8) is a function of the bytes: a resumed stream's batches
    are bitwise those of an uninterrupted one."""
    url = write_shard(tmp_path / "s.tar", {f"{i}": ("jpg", d) for i, d in enumerate(jpegs)})

    def run(start: int) -> list[dict]:
        stream = ShardStream(url, 64, 2, shuffle_buffer=4, epoch_steps=6)
        stream.place(0, 1, start)
        return list(DataLoader(stream, batch_size=None, num_workers=2))

    whole, resumed = run(0), run(3)
    assert len(whole) == 6 and len(resumed) == 3
    for a, b in zip(whole[3:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])


def _broken_shard(path: Path, jpegs: list[bytes]) -> str:
    """A good JPEG, one cut in the middle of its scan, bytes that are no image, another good JPEG."""
    return write_shard(
        path,
        {
            "ok0": ("jpg", jpegs[0]),
            "cut": ("jpg", jpegs[1][: len(jpegs[1]) // 2]),
            "junk": ("jpg", b"\xff\xd8 not a jpeg at all"),
            "ok1": ("jpg", jpegs[2]),
        },
    )


@pytest.mark.parametrize("decode", ["reduced", "exact"])
def test_truncated_and_corrupt_jpegs_are_skipped_and_counted(jpegs, tmp_path, caplog, decode) -> None:
    url = _broken_shard(tmp_path / "broken.tar", jpegs)
    stream = ShardStream(url, 64, 4, resampled=False, shuffle_buffer=0, epoch_steps=None, decode=decode)
    with caplog.at_level(logging.WARNING, logger="phis.shards"):
        (batch,) = list(stream)
    assert batch["keys"] == ["ok0", "ok1"] and batch["skipped"] == 2 and batch["images"].shape[0] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("'cut'" in m for m in messages) and any("'junk'" in m for m in messages)


def test_the_gpu_decode_path_resizes_like_the_exact_one_and_isolates_broken_files(jpegs) -> None:
    """``decode_jpegs`` on the CPU (torchvision's decoder; the same code runs nvJPEG on CUDA)."""
    crops = decode_jpegs([jpegs[0], b"\xff\xd8 junk", jpegs[3], jpegs[1][:5000]], 128, "cpu")
    assert isinstance(crops[1], Exception) and isinstance(crops[3], Exception)
    for crop, data in ((crops[0], jpegs[0]), (crops[2], jpegs[3])):
        assert crop.dtype == torch.uint8 and crop.shape == (3, 128, 128)
        assert levels(crop, reference(data, 128)).mean() <= 2.0


def test_bad_decode_settings_fail_with_the_choices(tmp_path: Path) -> None:
    url = str(tmp_path / "x.tar")
    with pytest.raises(ValueError, match="unknown decode mode 'fast'; choose one of reduced, exact"):
        ShardStream(url, 16, 2, decode="fast")
    with pytest.raises(ValueError, match="unknown decode_device 'tpu'; choose one of cpu, cuda"):
        ShardStream(url, 16, 2, decode_device="tpu")
    with pytest.raises(ValueError, match="unknown decode mode"):
        ImageFolderSet(tmp_path, 16, decode="fast")
    from phis.eval import EvalConfig

    with pytest.raises(ValueError, match="unknown eval.decode 'fast'"):
        EvalConfig.from_mapping({"decode": "fast"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA device")
def test_gpu_decoding_without_cuda_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="decode_device=cuda .* no CUDA device.*decode_device=cpu"):
        ShardStream(str(tmp_path / "x.tar"), 16, 2, decode_device="cuda")


def test_gpu_decoding_refuses_loader_workers(jpegs, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # forked workers inherit it
    url = write_shard(tmp_path / "s.tar", {"a": ("jpg", jpegs[0])})
    stream = ShardStream(url, 16, 1, resampled=False, epoch_steps=None, decode_device="cuda")
    with pytest.raises(RuntimeError, match="set data.num_workers=0"):
        next(iter(DataLoader(stream, batch_size=None, num_workers=1)))


def test_gpu_branch_decodes_a_batch_of_jpegs_together_and_skips_the_broken(jpegs, tmp_path, monkeypatch):
    """``decode_device=cuda`` with torchvision's CPU decoder standing in for nvJPEG."""
    import phis.shards

    calls = []

    def on_the_cpu(encoded, size, device):
        calls.append((len(encoded), device))
        return decode_jpegs(encoded, size, "cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(phis.shards, "decode_jpegs", on_the_cpu)
    url = _broken_shard(tmp_path / "broken.tar", jpegs)
    stream = ShardStream(
        url, 64, 4, resampled=False, shuffle_buffer=0, epoch_steps=None, decode_device="cuda"
    )
    (batch,) = list(stream)
    assert calls == [(4, "cuda")] and batch["keys"] == ["ok0", "ok1"] and batch["skipped"] == 2
    for image, data in zip(batch["images"], (jpegs[0], jpegs[2])):
        assert levels(image, reference(data, 64)).mean() <= 2.0


@pytest.mark.gpu
def test_gpu_decoding_yields_cuda_batches_within_the_bound(jpegs, tmp_path) -> None:
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[4])).save(png, format="PNG")
    samples = {f"{i}": ("jpg", d) for i, d in enumerate(jpegs[:4])}
    samples |= {"png": ("png", png.getvalue()), "junk": ("jpg", b"\xff\xd8 junk")}
    url = write_shard(tmp_path / "g.tar", samples)
    stream = ShardStream(
        url, 128, 6, resampled=False, epoch_steps=None, shuffle_buffer=0, decode_device="cuda"
    )
    (batch,) = list(stream)
    assert batch["images"].is_cuda and batch["images"].dtype == torch.uint8
    assert batch["keys"] == ["0", "1", "2", "3", "png"] and batch["skipped"] == 1
    expected = [reference(d, 128) for d in jpegs[:4]] + [reference(png.getvalue(), 128)]
    diffs = [levels(img.cpu(), e).mean() for img, e in zip(batch["images"], expected)]
    assert np.mean(diffs) <= 2.0, diffs
