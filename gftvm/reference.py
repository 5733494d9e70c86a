"""Eager PyTorch reference of gradient filtering, written from the spec (docs/gradient_filter.md)
and independent of the Relax pass: block membership is built as explicit 0/1 matrices.

Used as the tests' oracle: ``filter_convs(model, {module_name: patch})`` makes the named
``nn.Conv2d`` modules compute the exact forward and the filtered backward.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def _membership(size: int, blocks: int, step: int, offset: int) -> torch.Tensor:
    """(blocks, size) 0/1 matrix: pixel i belongs to block b = floor((i - offset) / step)."""
    index = torch.div(torch.arange(size) - offset, step, rounding_mode="floor")
    return (index[None, :] == torch.arange(blocks)[:, None]).float()


def _nearest(size: int, blocks: int, step: int, offset: int) -> torch.Tensor:
    """(size, blocks) 0/1 matrix: pixel i takes the value of its block, clamped to the edge."""
    index = torch.div(torch.arange(size) - offset, step, rounding_mode="floor")
    return (index.clamp(0, blocks - 1)[:, None] == torch.arange(blocks)[None, :]).float()


def patch_mean(gy: torch.Tensor, patch: int) -> torch.Tensor:
    """Average over R×R patches from the top-left; partial patches average their valid pixels."""
    rows = _membership(gy.shape[2], math.ceil(gy.shape[2] / patch), patch, 0)
    cols = _membership(gy.shape[3], math.ceil(gy.shape[3] / patch), patch, 0)
    sums = torch.einsum("ph,nchw,qw->ncpq", rows, gy, cols)
    return sums / torch.outer(rows.sum(1), cols.sum(1))


class _FilteredConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, patch):
        y = nn.functional.conv2d(x, weight, bias, stride, padding, 1, groups)
        blocks = [math.ceil(d / patch) for d in y.shape[2:]]
        offsets = [(k - 1) // 2 - p for k, p in zip(weight.shape[2:], padding)]
        steps = [patch * s for s in stride]
        rows, cols = (_membership(x.shape[2 + a], blocks[a], steps[a], offsets[a]) for a in (0, 1))
        x_sum = torch.einsum("ph,nchw,qw->ncpq", rows, x, cols) / (stride[0] * stride[1])
        ctx.save_for_backward(x_sum, weight)
        ctx.geometry = (x.shape, stride, groups, patch, blocks, offsets, steps, bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x_sum, weight = ctx.saved_tensors
        x_shape, stride, groups, patch, blocks, offsets, steps, has_bias = ctx.geometry
        g_bar = patch_mean(gy, patch)
        co, ci_group = weight.shape[:2]
        w_sum = weight.sum((2, 3)) / (stride[0] * stride[1])                # (Co, Ci/g)
        g_grouped = g_bar.reshape(g_bar.shape[0], groups, co // groups, *blocks)
        w_grouped = w_sum.reshape(groups, co // groups, ci_group)
        gx_low = torch.einsum("ngopq,goi->ngipq", g_grouped, w_grouped).flatten(1, 2)
        up_rows, up_cols = (_nearest(x_shape[2 + a], blocks[a], steps[a], offsets[a])
                            for a in (0, 1))
        gx = torch.einsum("hp,ncpq,wq->nchw", up_rows, gx_low, up_cols)
        x_grouped = x_sum.reshape(x_sum.shape[0], groups, ci_group, *blocks)
        gw = torch.einsum("ngopq,ngipq->goi", g_grouped, x_grouped).reshape(co, ci_group)
        gw = gw[:, :, None, None].expand_as(weight).contiguous()
        gb = gy.sum((0, 2, 3)) if has_bias else None
        return gx, gw, gb, None, None, None, None


def filtered_conv2d(x: torch.Tensor, conv: nn.Conv2d, patch: int) -> torch.Tensor:
    """``conv(x)`` with the exact forward and the gradient-filtered backward with patch R."""
    if conv.dilation != (1, 1) or isinstance(conv.padding, str):
        raise ValueError("the reference filters undilated convs with numeric padding")
    return _FilteredConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                 conv.groups, patch)


def filter_convs(model: nn.Module, patches: dict[str, int]) -> nn.Module:
    """Make the named Conv2d submodules filter their gradients (parameter names unchanged)."""
    for name, patch in patches.items():
        conv = model.get_submodule(name)
        conv.forward = functools.partial(filtered_conv2d, conv=conv, patch=patch)
    return model
