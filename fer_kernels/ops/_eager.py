"""The differentiable ops as plain autograd Functions for eager calls, beside their torch.library custom ops.

A custom op called from Python passes through several Python layers of torch.library each way (the op packet,
the autograd wrapper, a redispatch, the backend wrapper, and the same again for the backward op). Batch norm +
Mish on a 2 x 4 x 2 x 2 input: forward 44 us through the op against 13 us through an autograd Function over the
same kernels, forward and backward 210 against 108 us. A ResNet-18 step makes 36 such calls, and on 2 cores the
second core waits through all of it: a 48 px CPU training step at batch 32 was 1.7 ms faster with the four ops
called this way (median of 80 alternating pairs of steps in one process). The custom ops stay the ops'
definition: torch.compile, export, fake tensors, tensor subclasses, functorch transforms and Python dispatch modes
get them (`eager` says when the Function may stand in), and both paths run the same Python functions, so they
give the same bits.
"""

from __future__ import annotations

from typing import Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensors may take the autograd Function: plain tensors (or None), and nothing
    that traces or intercepts ops is active (torch.compile, TorchScript tracing, dispatch or function modes,
    functorch transforms), all of which need the registered op and its fake implementation."""
    return (not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(t is None or type(t) in _PLAIN for t in tensors))


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   registered_backward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function from a custom op's pieces: forward(*inputs) is the op's implementation,
    setup_context(ctx, inputs, output) its autograd setup, backward(ctx, *grads) its backward formula calling the
    backward implementation itself, and registered_backward the same formula through the registered backward op.

    The Function's forward takes ctx and calls setup_context itself: a Function that declares setup_context
    binds its arguments to forward's signature with inspect on every call (25 us, more than the rest of the
    call); that form exists for functorch transforms, which take the registered op anyway (`eager`). A backward
    that records a graph (create_graph=True) goes through the registered backward op, so that differentiating
    it again raises as it does there instead of leaving the second derivative out."""
    def forward_with_context(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_of_either(ctx, *grads):
        return (registered_backward if torch.is_grad_enabled() else backward)(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_with_context),
                                                   "backward": staticmethod(backward_of_either)})
