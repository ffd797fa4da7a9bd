"""The cache-blocked transpose and the fused AdamW update against their NumPy references (and torch)."""
import numpy as np
import pytest
import torch

from minislm.collab.optim import AdamW
from minislm.kernels.adamw import adamw_update, adamw_update_reference
from minislm.kernels.layout import transpose, transpose_reference


@pytest.mark.parametrize("shape", [(1, 1), (1, 70), (33, 65), (257, 1031), (4096, 384)])
def test_transpose_equals_numpy(shape):
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = transpose(a)
    assert out.flags.c_contiguous and out.shape == shape[::-1]
    np.testing.assert_array_equal(out, transpose_reference(a))


def test_transpose_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="float32"):
        transpose(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="C-contiguous"):
        transpose(np.zeros((4, 3), dtype=np.float32).T)
    with pytest.raises(ValueError, match="shape"):
        transpose(np.zeros((4, 3), dtype=np.float32), out=np.zeros((4, 3), dtype=np.float32))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_fused_adamw_follows_the_reference_over_steps(wd):
    rng = np.random.default_rng(1)
    p = rng.standard_normal((37, 53)).astype(np.float32)
    ours = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    ref = [p.copy(), np.zeros_like(p), np.zeros_like(p)]
    for t in range(1, 11):
        g = (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-4, 2)).astype(np.float32)
        adamw_update(ours[0], g, ours[1], ours[2], 1e-3, 0.9, 0.999, 1e-8, wd, t)
        adamw_update_reference(ref[0], g, ref[1], ref[2], 1e-3, 0.9, 0.999, 1e-8, wd, t)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    assert not np.array_equal(ours[0], p)


def test_adamw_with_the_fused_update_matches_torch():
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    params = {"w": w.copy(), "b": b.copy()}
    opt = AdamW(params, lr=0.01, weight_decay=0.1)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}], lr=0.01)
    for _ in range(5):
        gw, gb = rng.standard_normal(w.shape).astype(np.float32), rng.standard_normal(b.shape).astype(np.float32)
        opt.step({"w": gw, "b": gb})
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        topt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)
