"""What preparation skipped or changed, for the log, the manifest and the user."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("trainer.data")

#: The manifest keeps this many warnings; the log has them all.
MAX_KEPT_WARNINGS = 200


@dataclass
class PrepReport:
    warnings: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def skip(self, item: str, reason: str) -> None:
        """An input that is left out; ``item`` names it (redacted URL, archive member or file name)."""
        self.warn(f"skipping {item}: {reason}")
        self.counts["skipped"] += 1

    def skip_error(self, error: Exception) -> None:
        """An input left out because of ``error``, whose message already names it."""
        self.warn(f"skipping {error}")
        self.counts["skipped"] += 1

    def warn(self, message: str) -> None:
        logger.warning(message)
        if len(self.warnings) < MAX_KEPT_WARNINGS:
            self.warnings.append(message)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
