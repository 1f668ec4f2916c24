"""Student token layout, heads, position embeddings, and folding a normalizer into a head."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phis.adaptors import MLP2
from phis.module import DistillModule
from phis.student import MultiTeacherViT

TEACHERS = {
    "clip": {"summary_dim": 12, "feature_dim": 20},
    "sam": {"summary_dim": None, "feature_dim": 8},
    "dino": {"summary_dim": 16, "feature_dim": 24},
}
TINY = {"depth": 0, "embed_dim": 32, "num_heads": 2}


def student(**kw) -> MultiTeacherViT:
    args = {"img_size": 32, "num_registers": 3, "head_hidden_dim": 16, "trunk_kwargs": TINY} | kw
    return MultiTeacherViT(TEACHERS, **args)


def test_mlp2_matches_a_float64_reference() -> None:
    head = MLP2(6, 5, 7, num_inner=2).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    h = x @ head.fc1.weight.T + head.fc1.bias
    for block in head.blocks:
        n = F.layer_norm(h, (7,), block.norm.weight, block.norm.bias, block.norm.eps)
        h = h + F.gelu(n) @ block.linear.weight.T + block.linear.bias
    h = F.gelu(F.layer_norm(h, (7,), head.norm.weight, head.norm.bias, head.norm.eps))
    ref = h @ head.final.weight.T + head.final.bias
    torch.testing.assert_close(head(x), ref)
    assert len(head.blocks) == 2 and head.final.out_features == 5
    assert [m for m in head.modules() if isinstance(m, nn.Linear)][-1] is head.final


def test_mlp2_rejects_wrong_input_width() -> None:
    with pytest.raises(ValueError, match="last dim 6"):
        MLP2(6, 5, 7)(torch.randn(2, 9))


def test_token_layout_summaries_registers_patches() -> None:
    """With no blocks the trunk is norm([prefix | patches + pos]): every token can be recomputed by hand."""
    m = student().eval()
    with torch.no_grad():
        m.prefix.normal_()
    images = torch.rand(2, 3, 32, 48)
    tokens, grid = m.forward_trunk(images)
    t, r, (h, w) = 3, 3, grid
    assert grid == (2, 3) and tokens.shape == (2, t + r + h * w, 32)

    norm = m.trunk.norm
    x = (images - m.pixel_mean) / m.pixel_std
    patches = F.conv2d(x, m.trunk.patch_embed.proj.weight, m.trunk.patch_embed.proj.bias, stride=16)
    table = F.interpolate(m.pos_table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
    expected_patches = norm((patches + table).flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens[:, t + r :], expected_patches)
    torch.testing.assert_close(tokens[:, : t + r], norm(m.prefix).expand(2, -1, -1))

    out = m.heads(tokens, grid)
    assert set(out.summaries) == {"clip", "dino"}  # SAM has a token but no summary head
    torch.testing.assert_close(
        out.summaries["dino"], m.summary_heads["dino"](norm(m.prefix[:, 2])).expand(2, -1)
    )
    torch.testing.assert_close(out.trunk_summary, tokens[:, 0])
    for name, spec in TEACHERS.items():
        assert out.features[name].shape == (2, h * w, spec["feature_dim"])
    assert out.summaries["clip"].shape == (2, 12)


def test_trunk_blocks_see_all_tokens() -> None:
    m = MultiTeacherViT(
        TEACHERS, img_size=32, num_registers=2, head_hidden_dim=8, trunk_kwargs=TINY | {"depth": 1}
    )
    out = m(torch.rand(3, 3, 32, 32))
    assert out.trunk_features.shape == (3, 4, 32) and out.trunk_summary.shape == (3, 32)
    assert m.num_prefix == 3 + 2


def test_position_embedding_without_cpe_resamples_the_table() -> None:
    m = student()
    pos = m.position_embedding(2, 2, 2)
    torch.testing.assert_close(pos, m.pos_table.expand(2, -1, -1, -1))
    assert m.position_embedding(1, 5, 3).shape == (1, 5, 3, 32)


def test_cpe_windows_random_in_training_centred_in_eval() -> None:
    m = student(cpe=True, cpe_max_size=96)  # 6x6 table, 2x2 windows at 32 px
    table = m.pos_table[0]
    m.eval()
    torch.testing.assert_close(m.position_embedding(3, 2, 2), table[2:4, 2:4].expand(3, -1, -1, -1))
    m.train()
    a = m.position_embedding(16, 2, 2, torch.Generator().manual_seed(1))
    b = m.position_embedding(16, 2, 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    offsets = set()
    for i in range(16):  # every window is some contiguous crop of the table
        hits = [(y, x) for y in range(5) for x in range(5) if torch.equal(a[i], table[y : y + 2, x : x + 2])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 3
    with pytest.raises(ValueError, match="cpe_max_size 16"):
        student(cpe=True, cpe_max_size=16)


def test_bad_input_size_names_the_patch_size() -> None:
    with pytest.raises(ValueError, match="not a multiple of the student patch size 16"):
        student()(torch.rand(1, 3, 40, 32))
    with pytest.raises(ValueError, match="img_size 40"):
        student(img_size=40)
    with pytest.raises(ValueError, match="identifier"):
        MultiTeacherViT({"a-b": {"summary_dim": None, "feature_dim": 4}}, trunk_kwargs=TINY)


def _module(normalizer: str, grid: int, **distill_overrides) -> DistillModule:
    specs = {n: {**s, "grid": [grid, grid]} for n, s in TEACHERS.items()}
    distill = {
        "summary_weight": 1.0,
        "feature_weight": 1.0,
        "adaloss": False,
        "adaloss_momentum": 0.99,
        "normalizer_fit": "cache",
        "estimate_steps": 0,
        "refit_every": 1,
        "freeze_trunk_steps": 0,
        "resample_to": "student",
        "resample_mode": "bilinear",
    } | distill_overrides
    optim = {
        "name": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "warmup_steps": 1,
        "min_lr_ratio": 0.0,
    }
    student_cfg = {
        "img_size": 32,
        "num_registers": 1,
        "head_hidden_dim": 16,
        "trunk_kwargs": TINY | {"depth": 1},
    }
    return DistillModule(
        specs, student_cfg, {"name": normalizer}, {"name": "mse"}, distill, optim, max_steps=10
    )


@pytest.mark.parametrize("normalizer", ["phi_s", "zca_whiten", "standardize"])
def test_folding_the_normalizer_into_the_head_matches_predict(normalizer: str) -> None:
    module = _module(normalizer, grid=2).eval()
    for i, norm in enumerate(module.normalizers.values()):
        c = norm.dim
        mix = torch.randn(c, c, dtype=torch.float64) * (i + 1)
        y = torch.randn(4096, c, dtype=torch.float64) @ mix - 60.0 + 5 * torch.randn(c, dtype=torch.float64)
        norm.update(y)
        norm.fit()
    images = torch.rand(3, 3, 32, 32)
    predicted = module.predict(images)
    folded = module.fold_normalizers().eval()(images)
    for name in TEACHERS:
        feats = folded.features[name].unflatten(1, (2, 2)).permute(0, 3, 1, 2)
        torch.testing.assert_close(feats, predicted[name].features, rtol=1e-4, atol=1e-4)
        assert predicted[name].features.abs().mean() > 10  # the −60 offset came back: really teacher space
    normalized = module.predict_normalized(images)
    for name, norm in module.normalizers.items():
        back = norm.denormalize(normalized[name].features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(back, predicted[name].features, rtol=1e-4, atol=1e-4)


def test_predict_resamples_to_the_teacher_grid_and_embed_shapes() -> None:
    module = _module("identity", grid=4).eval()
    out = module.predict(torch.rand(2, 3, 32, 32))
    assert out["sam"].summary is None and out["clip"].summary.shape == (2, 12)
    assert out["dino"].features.shape == (2, 24, 4, 4)
    summary, feats = module.embed(torch.rand(2, 3, 32, 32))
    assert summary.shape == (2, 32) and feats.shape == (2, 32, 2, 2)
    assert math.isfinite(float(feats.sum()))


def test_a_loop_without_a_trainer_drives_the_estimation_schedule_by_its_own_step() -> None:
    """distill_loss(batch, step) outside Lightning: statistics for 3 steps, refits at steps 0 and 2 only."""
    module = _module("phi_s", 2, normalizer_fit="schedule", estimate_steps=3, refit_every=2)
    torch.manual_seed(0)

    def batch() -> dict:
        return {
            "images": torch.rand(4, 3, 32, 32),
            "targets": {
                n: {"features": torch.randn(4, 2, 2, s["feature_dim"]) * 5 - 20}
                | ({"summary": torch.randn(4, s["summary_dim"])} if s["summary_dim"] else {})
                for n, s in TEACHERS.items()
            },
        }

    norm = module.normalizers["dino"]
    refitted = []
    for step in range(6):
        before = norm.mu.clone()
        loss, logs = module.distill_loss(batch(), step)
        assert torch.isfinite(loss) and "dino/mse_teacher" in logs
        refitted.append(not torch.equal(before, norm.mu))
    assert int(norm.stats.count) == 3 * 4 * 4  # 3 estimation steps x 4 images x 4 tokens
    assert bool(norm._frozen) and refitted == [True, False, True, False, False, False]


def test_normalized_targets_are_kept_per_sample_until_the_transform_changes(monkeypatch) -> None:
    """_normalized_targets: computed once per training sample, read back afterwards, recomputed after
    any change of the transform; not kept over the memory budget or for diagonal transforms."""
    g = torch.Generator().manual_seed(0)
    module = _module("phi_s", 2, target_memo_mb=1)
    monkeypatch.setattr(module, "_memo_capacity", lambda stage: 8)
    norm = module.normalizers["clip"]
    norm.update(torch.randn(64, 20, generator=g) * 3 + 5)
    norm.fit()
    y, idx = torch.randn(4, 5, 20, generator=g), torch.tensor([1, 6, 3, 0])
    first = module._normalized_targets("clip", y, idx)
    torch.testing.assert_close(first, norm(y), rtol=0, atol=0)
    # the same samples again (other values on purpose): their stored targets come back, in this order
    again = module._normalized_targets("clip", torch.zeros_like(y), idx.flip(0))
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=0)
    # a sample not seen yet: the batch is normalized afresh
    fresh = torch.randn(2, 5, 20, generator=g)
    torch.testing.assert_close(module._normalized_targets("clip", fresh, torch.tensor([1, 7])), norm(fresh))
    # a refit (or any in-place change of the transform) drops what was kept
    norm.weight.mul_(2.0)
    torch.testing.assert_close(module._normalized_targets("clip", y, idx), norm(y))
    # over the budget (8 samples x 100 values x 4 bytes > 0 MB) nothing is kept
    module.distill_cfg["target_memo_mb"] = 0
    module._memo.clear()
    module._normalized_targets("clip", y, idx)
    torch.testing.assert_close(module._normalized_targets("clip", torch.zeros_like(y), idx), norm(y * 0))
    assert module._memo == {}
    # diagonal transforms are cheap: never kept
    diag = _module("standardize", 2, target_memo_mb=1)
    monkeypatch.setattr(diag, "_memo_capacity", lambda stage: 8)
    diag.normalizers["clip"].update(torch.randn(64, 20, generator=g) + 2)
    diag.normalizers["clip"].fit()
    diag._normalized_targets("clip", y, idx)
    assert diag._memo == {}
