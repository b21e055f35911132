"""A measured ratio against its target, as PASS / MISS (or n/a when the part that measures it did not run):
the one way the bench and the peer benchmark state their targets."""

from __future__ import annotations

from typing import Any


def target(
    name: str, value: float | None, target: float, higher_is_better: bool, unit: str, why: str
) -> dict[str, Any]:
    if value is None:
        return {"name": name, "target": target, "value": None, "status": "n/a", "detail": why}
    passed = value >= target if higher_is_better else value <= target
    short = (1 - value / target) if higher_is_better else (value / target - 1)
    cmp = ">=" if higher_is_better else "<="
    detail = f"{value:.2f}{unit} (target {cmp} {target:g}{unit})"
    if not passed:
        detail += f"; missed by {100 * short:.0f}%"
    return {"name": name, "target": target, "value": value, "status": "PASS" if passed else "MISS", "detail": detail}
