"""Triton kernels. Imported lazily by the ops' "triton" implementations (fer_kernels/ops/), so importing
fer_kernels never needs Triton. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors, which is how
CI tests them."""
