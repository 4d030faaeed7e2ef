"""What a fit did: one :class:`Phase` per method run (held-out error before/after, wall time, iterations).

The types live in :mod:`onlynorm.nets.records` beside the solve records, because a fitted network stores its report in
its typed metadata (``net.meta.fit``, validated when the file is loaded); this module is their home in the fit API.

>>> r = FitReport(method="auto", train_samples=10, held_out_samples=5, initial_error=1.0)
>>> r.phases.append(Phase("layerwise", error_before=1.0, error_after=0.25, seconds=0.01, iterations=2))
>>> r.final_error
0.25
"""

from __future__ import annotations

from ..nets.records import FitReport, Phase

__all__ = ["Phase", "FitReport"]
