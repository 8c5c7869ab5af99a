"""Logging set-up shared by the command line and the cog container."""

from __future__ import annotations

import logging
import sys

from trainer.utils.download import redact_text

NOISY_LOGGERS = ("diffusers", "transformers", "urllib3", "botocore", "boto3", "s3transfer", "PIL", "matplotlib",
                 "httpx", "filelock")
_MARK = "_sd_lora_trainer"


class RedactSecrets(logging.Filter):
    """Redacts URL credentials and signed query strings from every record before it reaches the job log, whatever
    logger wrote it (a library logging a request URL, an error message quoting an input)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # The formatter uses exc_text when it is set: the traceback's messages are redacted as well.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def setup_logging(debug: bool = False) -> None:
    """Send log records to stderr (idempotent).

    The handler writes to ``sys.stderr`` as it is at call time: inside cog's worker that is the stream which routes
    each line to the log of the job that wrote it.
    """
    root = logging.getLogger()
    if not any(getattr(handler, _MARK, False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(RedactSecrets())
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
