"""The student as the paper starts it: timm weights loaded into the trunk, spectral reparametrization."""

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from phis.module import DistillModule
from phis.spectral import SpectralReparam, apply_spectral_reparam, spectral_reparams
from phis.student import MultiTeacherViT, check_pretrained
from phis.teachers import WeightsUnavailableError

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = {"clip": {"summary_dim": 12, "feature_dim": 20}, "sam": {"summary_dim": None, "feature_dim": 8}}
ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def timm_vit(img_size: int = 32) -> nn.Module:
    """A tiny random timm ViT with a class token and a 2x2 position table, as ImageNet models have."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **ARCH).eval()


def save(model: nn.Module, path, kind: str) -> str:
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:  # a training checkpoint wrapping the weights, as timm writes them
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return str(path)


def student(pretrained, **kw) -> MultiTeacherViT:
    args = {"img_size": 32, "num_registers": 2, "head_hidden_dim": 16, "trunk_kwargs": ARCH} | kw
    return MultiTeacherViT(TEACHERS, pretrained=pretrained, **args)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_timm_weights_load_into_the_trunk_and_compute_what_timm_computes(tmp_path, kind) -> None:
    ref = timm_vit()
    path = save(ref, tmp_path / f"vit.{kind}", kind)
    m = student(path).eval()
    before = m.prefix.detach().clone()
    report = m.load_pretrained()
    ref_state = ref.state_dict()
    for key, value in m.trunk.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0)
    assert set(report["unused"]) == {"cls_token", "head.weight", "head.bias"}
    assert report["not_loaded"] == ["prefix"] and torch.equal(m.prefix, before)
    torch.testing.assert_close(m.pos_table[0], ref.pos_embed[0, 1:].reshape(2, 2, 32), rtol=0, atol=0)

    x = torch.rand(2, 3, 32, 32)
    xn = (x - m.pixel_mean) / m.pixel_std
    with torch.no_grad():
        ours = m.trunk.norm(m.trunk.blocks(m.trunk.patch_embed(xn).flatten(1, 2)))
        theirs = ref.norm(ref.blocks(ref.patch_embed(xn)))
        torch.testing.assert_close(ours, theirs)
        # One summary token holding timm's class token (+ its position) and no registers: the whole
        # trunk then equals timm's forward_features, token for token.
        one = MultiTeacherViT(
            {"clip": TEACHERS["clip"]},
            img_size=32,
            num_registers=0,
            head_hidden_dim=8,
            trunk_kwargs=ARCH,
            pretrained=path,
        ).eval()
        one.load_pretrained()
        one.prefix.copy_(ref.cls_token + ref.pos_embed[:, :1])
        tokens, _ = one.forward_trunk(x)
        torch.testing.assert_close(tokens, ref.forward_features(xn))


def test_the_cpe_table_is_the_imagenet_table_resampled_as_timm_does(tmp_path) -> None:
    ref = timm_vit()
    path = save(ref, tmp_path / "vit.safetensors", "safetensors")
    m = student(path, cpe=True, cpe_max_size=96)  # a 6x6 CPE table from the 2x2 one
    m.load_pretrained()
    expected = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert m.pos_table.shape == (1, 6, 6, 32)
    torch.testing.assert_close(m.pos_table.reshape(1, 36, 32), expected[:, 1:])


def test_loading_into_a_spectrally_reparametrized_trunk_keeps_the_function(tmp_path) -> None:
    ref = timm_vit()
    path = save(ref, tmp_path / "vit.safetensors", "safetensors")
    m = student(path, spectral_reparam=True).eval()
    m.load_pretrained()
    qkv = m.trunk.blocks[1].attn.qkv
    torch.testing.assert_close(qkv.weight, ref.blocks[1].attn.qkv.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qkv.parametrizations.weight.original, ref.blocks[1].attn.qkv.weight)
    x = torch.rand(2, 3, 32, 32)
    xn = (x - m.pixel_mean) / m.pixel_std
    with torch.no_grad():
        ours = m.trunk.norm(m.trunk.blocks(m.trunk.patch_embed(xn).flatten(1, 2)))
        torch.testing.assert_close(ours, ref.norm(ref.blocks(ref.patch_embed(xn))), rtol=1e-4, atol=1e-5)


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    other = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=48, depth=1, num_heads=2
    )
    path = save(other, tmp_path / "other.safetensors", "safetensors")
    with pytest.raises(ValueError, match="does not fit the trunk .*mismatched shapes"):
        student(path).load_pretrained()


def test_missing_or_unreachable_weights_fail_at_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="student.pretrained=/path/to"):
        check_pretrained("vit_base_patch16_224", True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        check_pretrained("vit_base_patch16_224", str(tmp_path / "nope.pth"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        check_pretrained("vit_base_patch16_224", str(tmp_path / "w.txt"))
    with pytest.raises(ValueError, match="student.pretrained=3"):
        student(3)
    check_pretrained("vit_base_patch16_224", False)
    assert student(False).load_pretrained() == {}


def test_spectral_norm_estimate_matches_a_float64_svd() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    s = torch.tensor([3.0, 1.5] + [1.0 / (i + 1) for i in range(22)], dtype=torch.float64)
    w = (u[:, :24] * s) @ v.T  # known singular values, top one 3.0
    layer = nn.Linear(24, 40)
    with torch.no_grad():
        layer.weight.copy_(w.float())
    reparam = SpectralReparam(layer.weight.detach())
    sigma = torch.linalg.svdvals(layer.weight.detach().double())[0]
    assert abs(float(reparam.sigma(layer.weight.detach())) - float(sigma)) < 1e-5 * float(sigma)
    torch.testing.assert_close(reparam.scale.double(), sigma, rtol=1e-5, atol=0)
    # γ W̄ / σ(W̄) with another W̄ and γ: the float64 formula, once power iteration has converged.
    with torch.no_grad():
        reparam.scale.fill_(0.7)
    reparam.train()
    w2 = layer.weight.detach() * 2 + 0.01 * torch.randn(40, 24)
    for _ in range(60):
        out = reparam(w2)
    ref = 0.7 * w2.double() / torch.linalg.svdvals(w2.double())[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)


def test_spectral_reparam_leaves_the_initial_student_unchanged_and_steps_once_per_forward() -> None:
    plain = student(False).eval()
    reparam = copy.deepcopy(plain)
    n = apply_spectral_reparam(reparam.trunk)
    assert n == 2 * 4  # qkv, proj, fc1, fc2 per block
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            reparam(x).features["clip"], plain(x).features["clip"], rtol=1e-4, atol=1e-5
        )
    sn = reparam.trunk.blocks[0].mlp.fc1.parametrizations.weight[0]
    u0 = sn.u.clone()
    reparam.eval()(x)
    assert torch.equal(sn.u, u0)  # evaluation does not move the estimate
    reparam.train()(x)
    assert not torch.equal(sn.u, u0)  # one power step per training forward
    state = reparam.state_dict()
    assert "trunk.blocks.0.mlp.fc1.parametrizations.weight.0.u" in state  # checkpointed
    assert "trunk.blocks.0.mlp.fc1.parametrizations.weight.0.scale" in state
    again = student(False, spectral_reparam=True)
    again.load_state_dict(state)
    assert torch.equal(again.trunk.blocks[0].mlp.fc1.parametrizations.weight[0].u, sn.u)


def test_the_spectral_scales_are_weight_decayed() -> None:
    specs = {n: {**s, "grid": [2, 2]} for n, s in TEACHERS.items()}
    distill = {
        "summary_weight": 1.0,
        "feature_weight": 1.0,
        "adaloss": False,
        "adaloss_momentum": 0.99,
        "normalizer_fit": "schedule",
        "estimate_steps": 1,
        "refit_every": 1,
        "freeze_trunk_steps": 0,
        "resample_to": "student",
        "resample_mode": "bilinear",
    }
    optim = {
        "name": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "warmup_steps": 1,
        "min_lr_ratio": 0.0,
    }
    cfg = {
        "img_size": 32,
        "num_registers": 1,
        "head_hidden_dim": 16,
        "trunk_kwargs": ARCH,
        "spectral_reparam": True,
    }
    module = DistillModule(specs, cfg, {"name": "phi_s"}, {"name": "mse"}, distill, optim, max_steps=4)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    scales = {id(m.scale) for m in spectral_reparams(module)}
    assert len(scales) == 8 and decay["weight_decay"] == 0.05
    assert scales <= {id(p) for p in decay["params"]}
    assert not scales & {id(p) for p in no_decay["params"]}
    norm_weight = module.student.trunk.blocks[0].norm1.weight
    assert any(p is norm_weight for p in no_decay["params"])  # other 0/1-dim parameters stay undecayed
