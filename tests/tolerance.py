"""The one tolerance rule for kernels and fast paths (flash-attention's rule, see design.md).

A result in dtype D passes when, elementwise,

    |result - fp32_ref| <= 2 * |torch_D_ref - fp32_ref| + atol(D)

i.e. it may be at most twice as wrong as plain torch computing the same thing in D, plus a floor
for elements where torch happens to be exact. `fp32_ref` is the reference run on the same input
values upcast to fp32 (for fp32 inputs the two references coincide and only atol remains).

atol(D) is about one unit in the last place at magnitude 1 in D, a little more for fp32: fp32
kernels differ from torch only by summation order, which over the few-thousand-element rows
and batch sums used here stays below 1e-5 in absolute terms at unit-scale values.
"""

from __future__ import annotations

import torch

ATOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,  # fp16 ulp at 1.0 is 9.8e-4
    torch.bfloat16: 1e-2,  # bf16 ulp at 1.0 is 7.8e-3
}


def assert_within_reference_error(
    actual: torch.Tensor,
    same_dtype_ref: torch.Tensor,
    fp32_ref: torch.Tensor,
    atol: float | None = None,
    name: str = "result",
) -> None:
    """Fail unless `actual` obeys the rule above; atol defaults to ATOL[actual.dtype]."""
    assert actual.shape == fp32_ref.shape == same_dtype_ref.shape, (
        f"{name}: shapes differ: actual {tuple(actual.shape)}, same-dtype ref "
        f"{tuple(same_dtype_ref.shape)}, fp32 ref {tuple(fp32_ref.shape)}"
    )
    assert actual.dtype == same_dtype_ref.dtype, (
        f"{name}: dtype {actual.dtype} differs from the same-dtype reference's {same_dtype_ref.dtype}"
    )
    if atol is None:
        atol = ATOL[actual.dtype]
    exact = fp32_ref.detach().float().cpu()
    error = (actual.detach().float().cpu() - exact).abs()
    allowed = 2 * (same_dtype_ref.detach().float().cpu() - exact).abs() + atol
    excess = error - allowed
    if excess.numel() and excess.max() > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.numel()} elements exceed "
            f"2*|torch_{actual.dtype}-fp32| + {atol}; worst at flat index {worst}: "
            f"error {error.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g}"
        )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32: how the fast paths' fp32 results are held to PEFT's (≤ 1e-5)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
