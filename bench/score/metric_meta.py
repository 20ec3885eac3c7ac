"""What a metric means for comparison: its better direction, its check tolerance, and
whether the leaderboard shows it as a headline column.

Each task declares the metrics it writes (``Task.metrics``), and the declarations travel
inside every result record (``metric_meta``), so the leaderboard and ``dictbench check``
read a metric's direction from the records they compare: a new task's metrics work
everywhere without editing a core file. This module imports nothing heavy (no torch),
so reading records stays fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DIRECTIONS = ("higher", "lower", "target1", "equal")


@dataclass(frozen=True)
class Metric:
    """One metric a task writes.

    ``direction``: "higher" or "lower" is better, "target1" (closer to 1 is better, e.g.
    shrinkage), or "equal" (not a quality of the SAE: any change beyond tolerance is
    flagged, none is better). A change the wrong way by more than
    ``max(abs_tol, rel_tol * |reference|)`` is a regression in ``dictbench check``.
    ``gate``: False for numbers reported but never gated on (spreads, timings).
    ``headline``: shown in the leaderboard's main table.
    """

    name: str
    direction: str
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    headline: bool = False
    gate: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"metric {self.name}: direction '{self.direction}' is not one of "
                + ", ".join(DIRECTIONS)
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
