"""What preparation skipped or changed, for the log, the manifest and the user."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("trainer.data")

#: The manifest keeps this many warnings.
MAX_KEPT_WARNINGS = 200
#: The log shows this many warnings one by one; the rest are counted and summarised (a hostile archive can hold tens
#: of thousands of files that each earn a warning).
MAX_LOGGED_WARNINGS = 200
#: Skips logged one by one per archive; the rest of that archive's are summarised when it is unpacked.
MAX_LOGGED_PER_GROUP = 20


@dataclass
class PrepReport:
    warnings: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    logged: int = 0
    unlogged: int = 0
    group_skips: Counter = field(default_factory=Counter)
    group_reasons: dict[str, Counter] = field(default_factory=dict)

    def skip(self, item: str, reason: str, group: str | None = None) -> None:
        """An input that is left out; ``item`` names it (redacted URL, archive member or file name).

        ``group`` (an archive's label) logs only the first skips of the group; :meth:`end_group` summarises the rest.
        """
        self.counts["skipped"] += 1
        if group is not None:
            self.group_skips[group] += 1
            if self.group_skips[group] > MAX_LOGGED_PER_GROUP:
                self.group_reasons.setdefault(group, Counter())[reason.split(" (")[0]] += 1
                self._keep(f"skipping {item}: {reason}")
                return
        self.warn(f"skipping {item}: {reason}")

    def end_group(self, group: str) -> None:
        reasons = self.group_reasons.pop(group, None)
        if reasons:
            shown = ", ".join(f"{n} × {reason}" for reason, n in reasons.most_common(5))
            logger.warning("%s: %d more members skipped (%s)", group, sum(reasons.values()), shown)

    def skip_error(self, error: Exception) -> None:
        """An input left out because of ``error``, whose message already names it."""
        self.warn(f"skipping {error}")
        self.counts["skipped"] += 1

    def warn(self, message: str) -> None:
        if self.logged < MAX_LOGGED_WARNINGS:
            logger.warning(message)
            self.logged += 1
            if self.logged == MAX_LOGGED_WARNINGS:
                logger.warning("further warnings are counted, not logged one by one")
        else:
            self.unlogged += 1
        self._keep(message)

    def _keep(self, message: str) -> None:
        if len(self.warnings) < MAX_KEPT_WARNINGS:
            self.warnings.append(message)

    def finish(self) -> None:
        """Log what was counted instead of logged."""
        if self.unlogged:
            logger.warning("%d more warnings were not logged one by one", self.unlogged)
            self.unlogged = 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
