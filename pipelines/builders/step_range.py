"""The step range a builder is asked for, as a half-open range of global batch indices."""

from __future__ import annotations

from spike_audit.pipelines.errors import UserError


def batch_range(n_batches: int, steps: tuple[int, int] | None, first_step: int, what: str) -> tuple[int, int]:
    """Half-open range of 0-based batch indices for an inclusive ``steps`` range (all batches if None)."""
    if steps is None:
        return 0, n_batches
    b0 = max(0, steps[0] - first_step)
    b1 = min(n_batches, steps[1] - first_step + 1)
    if b1 <= b0:
        raise UserError(f"{what}: steps {steps[0]}..{steps[1]} are outside the {n_batches} global batches "
                        f"(steps {first_step}..{first_step + n_batches - 1})")
    return b0, b1
