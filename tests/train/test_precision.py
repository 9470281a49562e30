"""fp32 master weights (train/precision.py) and the dtype grouping of the gradient foreach ops
(train/grads.py), against plain per-parameter PyTorch written here."""
import torch
from torch import nn

from train.grads import same_dtype_groups
from train.precision import MasterWeights


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (7,), (3, 4), (2, 2, 3)]
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    return params, grads


def test_same_dtype_groups_keep_indices_and_order():
    tensors = [torch.zeros(1, dtype=d) for d in (torch.bfloat16, torch.float32, torch.bfloat16, torch.float16)]
    groups = same_dtype_groups(tensors)
    assert [indices for indices, _ in groups] == [[0, 2], [1], [3]]
    for indices, members in groups:
        assert all(tensors[i] is m for i, m in zip(indices, members))


def test_master_weight_step_equals_per_parameter_fp32_adamw():
    params, grads = _params(0)
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    optimizer = MasterWeights(torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))
    plain = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1)
    for step in range(3):
        for i, (p, r, g) in enumerate(zip(params, reference, grads)):
            skip = step == 1 and i == 2  # a parameter without a gradient in one step stays as it is
            p.grad = None if skip else g * (step + 1)
            r.grad = None if skip else (g * (step + 1)).float()
        before = params[2].detach().clone()
        optimizer.step()
        plain.step()
        if step == 1:
            assert torch.equal(params[2], before)
        for p, r in zip(params, reference):
            assert p.grad is None or p.dtype == torch.float32
            assert p.dtype in (torch.bfloat16, torch.float32, torch.float16)
            torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=0, atol=0)
            if p in optimizer.masters:
                assert torch.equal(optimizer.masters[p], r.detach())


def test_fused_adamw_fast_path_equals_fp32_adamw_and_falls_back():
    """After the first step, MasterWeights calls the fused kernel on cached lists; it must equal
    fused fp32 AdamW run on fp32 copies, through a step with a missing gradient (the general path),
    a changed learning rate, and state tensors replaced wholesale (the cache is rebuilt)."""
    params, grads = _params(1)
    params, grads = params[:3], grads[:3]  # bf16, fp32, bf16
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    optimizer = MasterWeights(torch.optim.AdamW(groups(params), lr=0.05, fused=True))
    plain = torch.optim.AdamW(groups(reference), lr=0.05, fused=True)
    paths = []
    for step in range(6):
        skip = step == 2
        for i, (p, r, g) in enumerate(zip(params, reference, grads)):
            missing = skip and i == 0
            p.grad = None if missing else g * (step + 1)
            r.grad = None if missing else (g * (step + 1)).float()
        if step == 3:
            for opt in (optimizer, plain):
                for group in opt.param_groups:
                    group["lr"] = 0.02
        if step == 4:  # replace the moment tensors (as a wholesale state load would)
            for p in params:
                optimizer.state[p]["exp_avg"] = optimizer.state[p]["exp_avg"].clone()
        paths.append(optimizer._fused_adamw_groups() is not None)
        optimizer.step()
        plain.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=0, atol=0)
            if p in optimizer.masters:
                assert torch.equal(optimizer.masters[p], r.detach())
        for p, r in zip(params, reference):
            assert torch.equal(optimizer.state[p]["exp_avg"], plain.state[r]["exp_avg"])
            assert torch.equal(optimizer.state[p]["step"], plain.state[r]["step"])
    # the first step creates the state, the one with a missing gradient takes the general path
    assert paths == [False, True, False, True, True, True]


def test_fused_path_scales_gradients_in_fp32_and_skips_on_the_device():
    """``grad_scale`` multiplies every gradient of the step in fp32: on the fused path inside the
    kernel (torch's fused AdamW on fp32 copies, told to divide by the reciprocal, as a GradScaler
    tells it), on the first (general) step through the fp32 copies and in place for the fp32
    parameter; ``found_inf = 1`` leaves weights, masters, moments and step counters bitwise as
    they were."""
    params, grads = _params(2)
    params, grads = params[:3], grads[:3]  # bf16, fp32, bf16
    reference = [p.detach().float().clone().requires_grad_() for p in params]
    optimizer = MasterWeights(torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, fused=True))
    plain = torch.optim.AdamW(reference, lr=0.05, weight_decay=0.1, fused=True)
    factor = torch.tensor(0.3)
    for step in range(4):
        for p, r, g in zip(params, reference, grads):
            p.grad = g * (step + 1)
            r.grad = (g * (step + 1)).float()
        if step == 0:  # the first step creates the state (general path): the factor multiplies
            optimizer.step(grad_scale=factor)
            for r in reference:
                r.grad = r.grad * factor
            plain.step()
            for p, r in zip(params, reference):
                torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=0, atol=0)
            continue
        assert optimizer.device_skip_ready()
        before = [(p.detach().clone(), optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["step"].clone())
                  for p in params]
        masters = {p: m.clone() for p, m in optimizer.masters.items()}
        if step == 2:  # a skipped update
            optimizer.step(grad_scale=factor, found_inf=torch.tensor(1.0))
            for p, (w, m, s) in zip(params, before):
                assert torch.equal(p, w) and torch.equal(optimizer.state[p]["exp_avg"], m)
                assert torch.equal(optimizer.state[p]["step"], s)
            assert all(torch.equal(optimizer.masters[p], m) for p, m in masters.items())
            continue
        optimizer.step(grad_scale=factor, found_inf=torch.tensor(0.0))
        plain.grad_scale = torch.reciprocal(factor)
        plain.step()
        del plain.grad_scale
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=0, atol=0)
            if p in optimizer.masters:
                assert torch.equal(optimizer.masters[p], r.detach())
            assert torch.equal(optimizer.state[p]["step"], plain.state[r]["step"])
