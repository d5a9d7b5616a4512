"""Triton kernels. Imported lazily by the "triton" backend (fer_kernels/_backends.py), so importing
fer_kernels never needs Triton. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors, which is how
CI tests them."""
