"""phis.features: student features of a folder or shards to disk, skipping undecodable images, resumable,
and the same kNN accuracy as phis.eval from what it writes."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import tiny_module

import phis
from phis.eval import EvalConfig, evaluate_module
from phis.evaldata import ImageFolderSet, digits_set
from phis.export import export_module
from phis.features import FeatureSettings, extract, main, read_features
from phis.images import decode_crop
from phis.metrics import knn_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple:
    """A tiny random student (patch 16, trained size 32) as a DistillModule and as an export."""
    torch.manual_seed(0)
    module = tiny_module().eval()
    out = export_module(module, tmp_path_factory.mktemp("model") / "student")
    return module, out


def photo_folder(root: Path, count: int = 5) -> list[str]:
    """``count`` random RGB images of several shapes in two subfolders and one broken file; the good keys."""
    gen = np.random.default_rng(0)
    keys = []
    for i in range(count):
        key = f"{'ab'[i % 2]}/img{i}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(root / key)
        keys.append(key)
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return sorted(keys)


def expected(model, folder: Path, keys: list[str], size: int) -> dict[str, torch.Tensor]:
    """The model's outputs on the centre crops training would take of these files."""
    images = []
    for key in keys:
        images.append(decode_crop(folder / key, size))
    x = torch.stack(images).float() / 255.0
    with torch.no_grad():
        summary, spatial = model(x)
        teachers = model.forward_teachers(x)
    return {
        "summary": summary,
        "spatial": spatial.mean((2, 3)),
        "clip": teachers["clip"].features.mean((2, 3)),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_a_folder_with_a_broken_image(exported, tmp_path, fmt: str, capsys) -> None:
    _, model_dir = exported
    keys = photo_folder(tmp_path / "images")
    out = tmp_path / "features"
    argv = [str(model_dir), str(tmp_path / "images"), str(out), "--shard-size", "2", "--format", fmt]
    manifest = main([*argv, "--teachers", "all", "--batch-size", "1", "--no-progress"])
    assert (manifest["images"], manifest["written"], manifest["skipped"]) == (6, 5, 1)
    printed = capsys.readouterr().out
    assert "5 of 6 images written" in printed and "1 could not be decoded" in printed
    listed = [s["key"] for shard in manifest["shards"] for s in shard["skipped_items"]]
    assert listed == ["a/broken.jpg"]
    assert len(manifest["shards"]) == 3 and all(
        f"features-0000{i}.{fmt}" == s["file"] for i, s in enumerate(manifest["shards"])
    )
    got_keys, arrays = read_features(out)
    assert got_keys == keys  # sorted input order, the broken file left out
    assert arrays["index"].tolist() == [1, 2, 3, 4, 5]  # a/broken.jpg sorts first: input 0
    teachers = {f"teachers/{n}/{k}" for n in ("clip", "cls") for k in ("summary", "features")}
    assert set(arrays) == {"summary", "spatial", "index", "teachers/sam/features", *teachers}
    model = phis.load(model_dir)
    ref = expected(model, tmp_path / "images", keys, 32)
    np.testing.assert_allclose(arrays["summary"], ref["summary"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["spatial"], ref["spatial"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["teachers/clip/features"], ref["clip"].numpy(), rtol=1e-5, atol=1e-5)
    if fmt == "npz":  # plain numpy reads a shard without phis
        with np.load(out / "features-00001.npz") as f:
            assert f["keys"].tolist() == ["a/img2.png", "a/img4.png"] and f["summary"].shape == (2, 32)


def test_an_interrupted_extraction_continues_where_it_stopped(exported, tmp_path, monkeypatch) -> None:
    _, model_dir = exported
    photo_folder(tmp_path / "images")
    model = phis.load(model_dir)
    settings = FeatureSettings(model=str(model_dir), source=str(tmp_path / "images"), size=32, shard_size=2)
    whole = tmp_path / "whole"
    extract(model, settings, whole, progress=False)

    import phis.features as features

    real, calls = features._write_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "_write_shard", crash_on_second)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        extract(model, settings, part, progress=False)
    first = (part / "features-00000.safetensors").stat().st_mtime_ns
    assert not (part / "features-00001.safetensors").exists()
    assert not json.loads((part / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(features, "_write_shard", real)
    manifest = extract(model, settings, part, progress=False)
    assert manifest["complete"] and (part / "features-00000.safetensors").stat().st_mtime_ns == first
    (ka, a), (kb, b) = read_features(whole), read_features(part)
    assert ka == kb and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"other settings \(\{'size': \(32, 64\)\}"):
        extract(model, FeatureSettings(**{**settings.__dict__, "size": 64}), part, progress=False)
    with pytest.raises(ValueError, match="size=40 is not a multiple of the patch size 16; e.g. 48"):
        extract(
            model, FeatureSettings(**{**settings.__dict__, "size": 40}), tmp_path / "other", progress=False
        )
    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['dino'\]"):
        extract(model, FeatureSettings(**{**settings.__dict__, "teachers": ("dino",)}), tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="spatial='pooled' is not valid"):
        FeatureSettings(model="m", source="s", size=32, spatial="pooled")


def test_shards_with_an_undecodable_sample(exported, tmp_path) -> None:
    import webdataset as wds

    _, model_dir = exported
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "shard-0.tar")) as sink:
        for i in range(4):
            sample = {"__key__": f"s{i}", "png": buf.getvalue(), "txt": "caption"}
            sink.write({"__key__": "bad", "jpg": b"not an image"} if i == 2 else sample)
    manifest = main(
        [str(model_dir), str(tmp_path / "shard-{0..0}.tar"), str(tmp_path / "out"), "--no-progress"]
    )
    assert (manifest["images"], manifest["written"], manifest["skipped"]) == (4, 3, 1)
    keys, arrays = read_features(tmp_path / "out")
    assert keys == ["s0", "s1", "s3"] and arrays["summary"].shape == (3, 32)
    with pytest.raises(FileNotFoundError, match="neither an image folder nor existing shard files"):
        main([str(model_dir), str(tmp_path / "missing-{0..1}.tar"), str(tmp_path / "out2")])


def test_knn_from_the_written_features_equals_the_evaluation(exported, tmp_path) -> None:
    """The same labelled image folder: phis.eval's kNN (and spatial kNN) on the module, and kNN on the
    summaries phis.features writes with the export, give the same accuracy."""
    module, model_dir = exported
    root = tmp_path / "digits"
    for split, limit in (("train", 150), ("test", 60)):
        data = digits_set(split, 32, limit=limit)
        for i in range(len(data)):
            image, label = data[i]
            path = root / split / str(int(label)) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(path)
    cfg = EvalConfig(image_size=32, knn_sets=("image_folder",), image_folder_root=str(root), knn_spatial=True,
                     teacher_mse=False, zero_shot=False, seg_sets=(), rankme_images=0)  # fmt: skip
    metrics = evaluate_module(module, cfg)["metrics"]
    model = phis.load(model_dir)
    feats, labels = {}, {}
    for split in ("train", "test"):
        settings = FeatureSettings(model=str(model_dir), source=str(root / split), size=32)
        extract(model, settings, tmp_path / split, progress=False)
        keys, feats[split] = read_features(tmp_path / split)
        labels[split] = torch.tensor([int(k.split("/")[0]) for k in keys])
    # the written summaries are the module's own embeddings of the images the evaluation reads
    folder = ImageFolderSet(root / "test", 32)
    with torch.no_grad():
        summary, _ = module.embed(torch.stack([folder[i][0] for i in range(len(folder))]))
    np.testing.assert_allclose(feats["test"]["summary"], summary.numpy(), rtol=0, atol=1e-6)
    for metric, key in (("knn/image_folder", "summary"), ("knn_spatial/image_folder", "spatial")):
        train_x, test_x = (torch.from_numpy(feats[s][key]) for s in ("train", "test"))
        ours = knn_accuracy(train_x, labels["train"], test_x, labels["test"], k=20, temperature=0.07)
        assert ours == metrics[metric], metric
    assert 0.1 < metrics["knn/image_folder"] < 1.0  # a real score, not a degenerate one
