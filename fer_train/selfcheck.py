"""A short end-to-end check of this installation: ops against the reference, fused against unfused
model, and a few training steps of ResNet-18 + Mish + ABP. Exits non-zero on any failure."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import fer_kernels
from fer_kernels import reference
from fer_kernels.models import resnet18
from fer_kernels.optim import Ranger


def _environment(device: torch.device) -> str:
    ext = fer_kernels._dispatch._C
    ext_state = "not built" if ext is None else ("CPU + CUDA kernels" if ext.with_cuda else "CPU kernels")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    return (f"torch {torch.__version__}, triton {triton_version}, fer_kernels._C: {ext_state}, "
            f"{torch.get_num_threads()} CPU threads, GPU: {gpu}")


def _check_ops(device):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 9, 9, device=device, dtype=torch.float64) * 4
    g = torch.rand(4, 16, 1, 1, device=device, dtype=torch.float64)
    identity = torch.randn_like(x)
    worst = 0.0
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        xs, gs, ids = (t.detach().to(dtype).requires_grad_() for t in (x, g, identity))
        out = fer_kernels.recalibrate(fer_kernels.mish(xs), gs, ids)
        out.sum().backward()
        xr, gr, idr = (t.detach().requires_grad_() for t in (x, g, identity))
        want = reference.recalibrate(reference.mish(xr), gr, idr)
        want.sum().backward()
        for ours, theirs in ((out, want), (xs.grad, xr.grad), (gs.grad, gr.grad), (ids.grad, idr.grad)):
            err = ((ours.double() - theirs).abs() / (1 + theirs.abs())).max().item()
            worst = max(worst, err)
            if err > tol:
                raise AssertionError(f"{dtype} result differs from the reference by {err:.2e} (> {tol:g})")
    return ("mish + recalibrate (forward and backward, float64 and float32) match the reference "
            f"(max rel. error {worst:.1e})")


def _check_fused_vs_unfused(device):
    torch.manual_seed(0)
    fused = resnet18().to(device, torch.float64)
    plain = resnet18(fused=False).to(device, torch.float64)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 64, 64, device=device, dtype=torch.float64)
    y_fused, y_plain = fused(x), plain(x)
    y_fused.sum().backward()
    y_plain.sum().backward()
    diff = (y_fused - y_plain).abs().max().item()
    grad_diff = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1)).item()
                    for a, b in zip(fused.parameters(), plain.parameters()))
    if diff > 1e-8 or grad_diff > 1e-8:
        raise AssertionError(f"fused and unfused ResNet-18 differ: outputs by {diff:.2e}, gradients by {grad_diff:.2e}")
    return f"ResNet-18+Mish+ABP fused == unfused (outputs within {diff:.0e}, gradients within {grad_diff:.0e})"


def _check_training(device, steps):
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last)
    images = torch.randn(16, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16, device=device) % 8
    optimizer = Ranger(model.parameters(), lr=1e-2)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"\r    step {step + 1}/{steps}  loss {losses[-1]:.3f}", end="", flush=True)
    print()
    elapsed = time.perf_counter() - start
    if not losses[-1] < 0.5 * losses[0]:
        raise AssertionError(f"training did not fit 16 images: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return (f"{steps} training steps fit 16 images (loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
            f"{16 * steps / elapsed:.0f} images/s at 64x64)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_train selfcheck",
                                     description="Self-check of fer-kernels on this machine: ops against the "
                                                 "reference, fused against unfused model, a short training.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to check (default: cuda if available, else cpu)")
    parser.add_argument("--steps", type=int, default=15, help="training steps of the last check (default 15)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print("fer-kernels self-check")
    print(f"  {_environment(device)}")
    for op, where in fer_kernels.backends().items():
        print(f"  backends for {op}: " + "; ".join(f"{d}: {b}" for d, b in where.items()))
    checks = [("ops", _check_ops), ("models", _check_fused_vs_unfused),
              ("training", lambda d: _check_training(d, args.steps))]
    for i, (name, check) in enumerate(checks, 1):
        print(f"  [{i}/{len(checks)}] {name} ...", flush=True)
        try:
            print(f"    ok: {check(device)}")
        except AssertionError as err:
            print(f"    FAILED: {err}")
            return 1
    print("Self-check passed. Train with python -m fer_train (the built-in default run) or python -m fer_train train "
          "--help.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
