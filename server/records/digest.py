"""One round of a large federation in a few lines: counts per status, the spread of the
sites' validation score, the worst and best sites and the ones that failed. The live table and
report.md use it past MANY sites (metrics.csv keeps every row)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from common.i18n import _

from server.records.outputs import IDLE, score_of

MANY = 20  # site rows beyond which a round is shown as a digest
SHOWN = 3  # worst and best sites named


@dataclass
class Digest:
    sites: int
    statuses: Counter
    key: str  # "auc" or "dice"
    name: str  # "AUC" or "Dice"
    scores: list[float] = field(default_factory=list)  # the validated sites' val scores
    worst: list[dict] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # refused, error, no-reply, rejected

    def quantile(self, q: float) -> float | None:
        """Linear-interpolated quantile of the sites' scores (None without any)."""
        return float(np.percentile(self.scores, 100 * q)) if self.scores else None

    def counts(self) -> str:
        """'898 not sampled, 100 ok, 2 refused (privacy budget)' (most first), in the reader's language."""
        from server.records.words import status_word

        return ", ".join(_("{count} {status}", count=n, status=status_word(status)) for status, n in self.statuses.most_common())

    def spread(self) -> str:
        if not self.scores:
            return _("no site reported a validation {score}", score=self.name)
        return _("validation {score} across {sites} sites: median {median} (10th-90th percentile {low}-{high})",
                 score=self.name, sites=len(self.scores), median=f"{self.quantile(0.5):.3f}",
                 low=f"{self.quantile(0.1):.3f}", high=f"{self.quantile(0.9):.3f}")

    def shown(self) -> list[dict]:
        """The rows worth a line: failed sites first (up to 5), then the worst and best."""
        seen, out = set(), []
        for r in self.failed[:5] + self.worst + self.best:
            if r["site"] not in seen:
                seen.add(r["site"])
                out.append(r)
        return out


def _score(row: dict, key: str) -> float | None:
    v = row.get(f"val_{key}")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def digest(rows: list[dict]) -> Digest:
    """The digest of one round's site rows (a `global` row among them is left out)."""
    sites = [r for r in rows if r["site"] != "global"]
    key, name = score_of(rows)
    scored = sorted((r for r in sites if _score(r, key) is not None), key=lambda r: (_score(r, key), r["site"]))
    return Digest(
        sites=len(sites), statuses=Counter(r.get("status") or "ok" for r in sites), key=key, name=name,
        scores=[_score(r, key) for r in scored], worst=scored[:SHOWN],
        best=list(reversed(scored[-SHOWN:])) if len(scored) > SHOWN else [],
        failed=[r for r in sites if (r.get("status") or "ok") not in IDLE],
    )
