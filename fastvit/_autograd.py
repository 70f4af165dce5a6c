"""Backward for the fused custom ops of the triton and cuda backends.

Inference is the target, but an op called with ``requires_grad`` inputs must still give
correct gradients: the backward re-runs the PyTorch reference (:mod:`fastvit.reference`) at
the saved inputs and differentiates that. Pure torch; shared by both backends.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["register_reference_backward"]


def register_reference_backward(op, reference_fn: Callable, tensor_args: Sequence[int]) -> None:
    """Give the custom op ``op`` a backward that differentiates ``reference_fn`` at the saved inputs.

    ``reference_fn`` takes the op's arguments in the op's order and returns what the op
    returns (same layout); ``tensor_args`` are the positions of the (optional) tensor arguments.
    """
    tensor_args = tuple(tensor_args)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_args))
        ctx.others = [None if i in tensor_args else a for i, a in enumerate(inputs)]

    def backward(ctx, *grads):
        args = list(ctx.others)
        leaves, where = [], []
        for i, t in zip(tensor_args, ctx.saved_tensors):
            if t is not None and ctx.needs_input_grad[i]:
                t = t.detach().requires_grad_(True)
                leaves.append(t)
                where.append(i)
            args[i] = t
        result = [None] * len(args)
        if not leaves:
            return tuple(result)
        with torch.enable_grad():
            outs = reference_fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        for i, g in zip(where, got):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
