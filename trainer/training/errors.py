"""Errors that end a run."""


class TrainingCancelled(Exception):
    """Raised when the caller asked the run to stop; nothing partial is left behind."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""
