"""The per-dtype tolerance table every kernel is held to against its fp32 reference (docs/contributing.md, "Adding a kernel")."""

from __future__ import annotations

import torch

TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


def assert_matches_reference(output: torch.Tensor, reference: torch.Tensor) -> None:
    """``output`` (any dtype) equals the fp32 ``reference`` within the table's atol/rtol for its dtype."""
    tolerance = TOLERANCE[output.dtype]
    torch.testing.assert_close(
        output.float(), reference.float(), atol=tolerance, rtol=tolerance, check_device=False
    )
