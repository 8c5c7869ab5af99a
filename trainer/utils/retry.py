"""The one retry policy for outbound HTTP: which failures are retried, how often, and how long to wait in between.

It is urllib3's :class:`~urllib3.util.Retry`: clients built on urllib3 (``requests``, the GPT captioner) mount it as
they are; the guarded download client (:mod:`trainer.utils.download`), which opens its own pinned connections, asks
the same object whether to go on (:meth:`~urllib3.util.Retry.increment`) and how long to wait
(:meth:`~urllib3.util.Retry.get_backoff_time`). Connection failures, timeouts, HTTP 429 and 5xx answers are retried
with exponential backoff, or after the server's ``Retry-After`` (at most a minute: a server does not get to park a
job for an hour).
"""

from __future__ import annotations

from collections.abc import Iterable

from urllib3.util import Retry

#: Answers worth asking again: too many requests, and every server error.
RETRY_STATUSES = frozenset({429, *range(500, 600)})
#: Longest wait honoured from a server's Retry-After header, and the longest backoff.
MAX_RETRY_AFTER = 60.0


class HttpRetry(Retry):
    """urllib3's Retry with the server's ``Retry-After`` capped at :data:`MAX_RETRY_AFTER`."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), MAX_RETRY_AFTER)


def http_retry(retries: int, backoff: float, methods: Iterable[str] = ("GET",)) -> HttpRetry:
    """At most ``retries`` retries of ``methods``; waits ``backoff`` × 2^n seconds (n: failures in a row, the
    first retry going at once), or the server's ``Retry-After``."""
    return HttpRetry(
        total=retries, connect=retries, read=retries, status=retries, redirect=0, other=retries,
        backoff_factor=backoff, backoff_max=MAX_RETRY_AFTER, status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset(method.upper() for method in methods), respect_retry_after_header=True,
        raise_on_status=False, raise_on_redirect=False,
    )
