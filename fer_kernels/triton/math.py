"""Device functions shared by the Triton kernels: the same formulas as csrc/mish.h and csrc/recalibrate.h.

mish(x) = x n / (n + 2) and mish'(x) = (n (n + 2) + 4 x e (1 + e)) / (n + 2)^2 with e = exp(x), n = e (e + 2):
one exponential per element; linear above x = 20 (where tanh(softplus(x)) is 1 in float and double);
non-finite values as torch.nn.functional.mish (see csrc/mish.h).
"""

import triton
import triton.language as tl

from fer_kernels.reference import ACTIVATIONS

@triton.jit
def load_math(ptr, offs, mask, COMPUTE_F64: tl.constexpr):
    """Load in the storage dtype and widen to the compute dtype: float64 for float64 tensors, else float32."""
    v = tl.load(ptr + offs, mask=mask, other=0)
    if COMPUTE_F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


# Activation codes: the index in fer_kernels.reference.ACTIVATIONS (csrc/recalibrate.h's enum Act has the same).
# Made with tl.constexpr(...): the compiler reads a global in a kernel only as such an instance (an annotation
# `NAME: tl.constexpr = ...` is a plain int to it, and it refuses the kernel; the interpreter did not mind).
ACT_MISH = tl.constexpr(ACTIVATIONS.index("mish"))
ACT_RELU = tl.constexpr(ACTIVATIONS.index("relu"))


@triton.jit
def mish_forward(x):
    e = tl.exp(tl.where(x < 20.0, x, 20.0))
    n = e * (e + 2.0)
    return tl.where(x > 20.0, x, x * n / (n + 2.0))


@triton.jit
def mish_derivative(x):
    e = tl.exp(tl.where(x < 20.0, x, 20.0))
    n = e * (e + 2.0)
    d = n + 2.0
    grad = (n * d + 4.0 * (x * e) * (1.0 + e)) / (d * d)  # x * e first: 4 * x overflows near -FLT_MAX
    # x - x is NaN exactly at +-inf, where PyTorch's gradient is NaN too
    return tl.where(x > 20.0, 1.0 + (x - x), grad)


@triton.jit
def act_forward(z, ACT: tl.constexpr):
    if ACT == ACT_MISH:
        return mish_forward(z)
    elif ACT == ACT_RELU:
        return tl.where(z <= 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
    else:
        return z


@triton.jit
def act_backward(dy, z, ACT: tl.constexpr):
    if ACT == ACT_MISH:
        return dy * mish_derivative(z)
    elif ACT == ACT_RELU:
        return tl.where(z <= 0.0, 0.0, dy)  # as threshold_backward: passes where z > 0 or z is NaN
    else:
        return dy
