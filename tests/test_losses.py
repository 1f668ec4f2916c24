"""Losses against per-token brute-force references, masks, make_loss and AdaLoss."""

import math

import pytest
import torch

from phis.losses import LOSSES, AdaLoss, cosine, hyb_mse, hyb_smooth_l1, make_loss, mse


def brute(x: torch.Tensor, y: torch.Tensor, mask, per_token) -> float:
    """Python loop over tokens in float64: mean of per_token(x_t, y_t) over (masked) tokens."""
    xs = x.double().reshape(-1, x.shape[-1]).tolist()
    ys = y.double().reshape(-1, y.shape[-1]).tolist()
    keep = [True] * len(xs) if mask is None else mask.reshape(-1).tolist()
    vals = [per_token(a, b) for a, b, k in zip(xs, ys, keep) if k]
    return sum(vals) / len(vals)


def tok_mse(a, b):
    return sum((p - q) ** 2 for p, q in zip(a, b)) / len(a)


def tok_cos(a, b):
    dot = sum(p * q for p, q in zip(a, b))
    return 1 - dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def tok_sl1(a, b, beta):
    d = [abs(p - q) for p, q in zip(a, b)]
    return sum(0.5 * e * e / beta if e < beta else e - 0.5 * beta for e in d) / len(d)


@pytest.fixture
def xy():
    x = torch.randn(3, 5, 6, dtype=torch.float64) * 2
    y = x * 0.5 + torch.randn(3, 5, 6, dtype=torch.float64) + 1
    mask = torch.rand(3, 5) > 0.4
    mask[0, 0] = True
    return x, y, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_losses_match_brute_force(xy, use_mask):
    x, y, m = xy
    mask = m if use_mask else None
    assert mse(x, y, mask).item() == pytest.approx(brute(x, y, mask, tok_mse), rel=1e-12)
    assert cosine(x, y, mask).item() == pytest.approx(brute(x, y, mask, tok_cos), rel=1e-12)
    hyb = brute(x, y, mask, lambda a, b: 0.7 * tok_cos(a, b) + 0.3 * tok_mse(a, b))
    assert hyb_mse(x, y, mask, beta=0.7).item() == pytest.approx(hyb, rel=1e-12)
    for sl1_beta in (1.0, 0.25):
        ref = brute(x, y, mask, lambda a, b, s=sl1_beta: 0.9 * tok_cos(a, b) + 0.1 * tok_sl1(a, b, s))
        got = hyb_smooth_l1(x, y, mask, smooth_l1_beta=sl1_beta).item()
        assert got == pytest.approx(ref, rel=1e-12)


def test_defaults_and_known_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    assert cosine(x, y).item() == pytest.approx(0.5)  # tokens: orthogonal (1) and parallel (0)
    assert mse(x, y).item() == pytest.approx((1 + 1 + 0 + 4) / 4)
    assert hyb_mse(x, y).item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    # SmoothL1 with beta 1: |d| = 1 → 0.5 each, |d| = 2 → 1.5; per-token means 0.5 and 0.75.
    assert hyb_smooth_l1(x, y).item() == pytest.approx(0.9 * 0.5 + 0.1 * 0.625)


def test_masks_empty_and_errors(xy):
    x, y, _ = xy
    x = x.clone().requires_grad_(True)
    none = torch.zeros(3, 5, dtype=torch.bool)
    for fn in LOSSES.values():
        loss = fn(x, y, none)
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0
        x.grad = None
    with pytest.raises(ValueError, match="mask shape"):
        mse(x, y, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        mse(x, y, torch.ones(3, 5))
    with pytest.raises(ValueError, match="differs"):
        cosine(x, y[:, :4])
    with pytest.raises(ValueError, match="beta"):
        hyb_mse(x, y, beta=1.5)


def test_masked_tokens_do_not_leak(xy):
    x, y, m = xy
    y_bad = y.clone()
    y_bad[~m] = 1e6
    for fn in LOSSES.values():
        assert fn(x, y_bad, m).item() == pytest.approx(fn(x[m], y[m]).item(), rel=1e-12)


def test_half_precision_inputs_computed_in_float32():
    x = torch.randn(64, 32) * 30
    y = x + torch.randn(64, 32)
    ref = mse(x.bfloat16().float(), y.bfloat16().float())
    out = mse(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_make_loss(xy):
    x, y, m = xy
    fn = make_loss("hyb_smooth_l1", beta=0.5, smooth_l1_beta=0.1)
    assert fn(x, y, m).item() == pytest.approx(hyb_smooth_l1(x, y, m, beta=0.5, smooth_l1_beta=0.1).item())
    assert make_loss("mse")(x, y).item() == mse(x, y).item()
    with pytest.raises(ValueError, match="hyb_smooth_l1"):
        make_loss("l2")
    with pytest.raises(ValueError, match="valid options are"):
        make_loss("mse", beta=0.9)
    with pytest.raises(ValueError, match="beta"):
        make_loss("hyb_mse", beta=-0.1)


def test_adaloss_bias_corrected_ema():
    ada = AdaLoss(momentum=0.9)
    values = [4.0, 2.0, 8.0, 1.0]
    ema, out = 0.0, []
    for t, v in enumerate(values, start=1):
        out.append(ada(torch.tensor(v)).item())
        ema = 0.9 * ema + 0.1 * v
        assert out[-1] == pytest.approx(v / (ema / (1 - 0.9**t)), rel=1e-6)
    assert out[0] == pytest.approx(1.0)
    assert ada.estimate.item() == pytest.approx(ema / (1 - 0.9**4), rel=1e-12)
    assert set(ada.state_dict()) == {"ema", "steps"}


def test_adaloss_constant_term_normalizes_to_one_and_gradient_is_scaled():
    ada = AdaLoss()
    for _ in range(5):
        assert ada(torch.tensor(37.5)).item() == pytest.approx(1.0, rel=1e-6)
    w = torch.tensor(3.0, requires_grad=True)
    loss = w**2  # 9, below the running 37.5
    out = ada(loss)
    out.backward()
    scale = ada.estimate.item()
    assert w.grad.item() == pytest.approx(2 * 3.0 / scale, rel=1e-6)  # the estimate is a constant


def test_adaloss_eval_and_nonfinite_do_not_update():
    ada = AdaLoss(momentum=0.5)
    ada(torch.tensor(2.0))
    state = {k: v.clone() for k, v in ada.state_dict().items()}
    ada(torch.tensor(float("inf")))
    ada.eval()
    assert ada(torch.tensor(6.0)).item() == pytest.approx(3.0)
    for k, v in ada.state_dict().items():
        assert torch.equal(v, state[k])
    restored = AdaLoss(momentum=0.5)
    restored.load_state_dict(ada.state_dict())
    assert restored.estimate.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="momentum"):
        AdaLoss(momentum=1.0)
    with pytest.raises(ValueError, match="scalar"):
        ada(torch.ones(3))


def _adaloss_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ada = AdaLoss(momentum=0.5)
        # rank 0 sees terms 1, 2, 3; rank 1 sees 3, 6, 9 (and a NaN at the last step)
        terms = [1.0, 2.0, 3.0] if rank == 0 else [3.0, 6.0, math.nan]
        scaled = [float(ada(torch.tensor(t))) for t in terms]
        torch.save({"ema": ada.ema, "steps": ada.steps, "scaled": scaled}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_adaloss_shares_one_estimate_across_ranks(tmp_path) -> None:
    """Under data parallelism the EMA follows the mean term over ranks, identically on every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_adaloss_worker, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["ema"], r1["ema"]) and int(r0["steps"]) == int(r1["steps"]) == 2  # NaN skipped
    ema = 0.5 * (0.5 * 0 + 0.5 * 2.0) + 0.5 * 4.0  # means over ranks: 2, 4 (the third is NaN)
    assert float(r0["ema"]) == pytest.approx(ema)
    # each rank divides its own term by the shared bias-corrected estimate
    assert r0["scaled"][:2] == pytest.approx([1.0 / 2.0, 2.0 / (ema / (1 - 0.5**2))])
    assert r1["scaled"][1] == pytest.approx(6.0 / (ema / (1 - 0.5**2)))
