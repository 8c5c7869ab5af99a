"""What a run derives from its config at run time, held in one frozen :class:`ResolvedRun`.

The validated :class:`~trainer.config.schema.TrainingConfig` is never changed after validation: the name, the seed,
the run folder, the model family found in the files, the tokens an initial phrase asks for, the number of steps and
epochs and the sample size are worked out here, and ``training_args.json`` is the config with these values written
over it (as Eden writes them back into its saved config). Every function here is plain arithmetic on the config and
a few numbers, so it is tested without loading a model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trainer.config.schema import MAX_TOKENS, MAX_TRAIN_STEPS, TrainingConfig, default_token_list
from trainer.data import sizes
from trainer.export.files import safe_name

#: The largest seed drawn when the config gives none (the config admits up to 2**32 - 1).
DRAWN_SEED_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ResolvedRun:
    """The values of one run that the config does not fix by itself."""

    name: str
    """The run's name: ``name``, else Eden's (from the training URL), else the concept mode."""
    run_dir: Path
    seed: int
    start_time: float
    """When the run started (epoch seconds); ``job_time`` in the exported arguments counts from here."""
    version: str
    """The model family found in the base model's files: ``sdxl`` or ``sd15``."""
    tokens: tuple[str, ...]
    """The new token strings; empty with ``disable_ti``."""
    token_dict: Mapping[str, str]
    """The trigger → the new tokens joined (read-only)."""
    total_steps: int
    num_train_epochs: int
    steps_per_epoch: int
    """Optimisation steps per pass over the data (Eden's ``completion_f`` counts epochs in these)."""
    train_size: tuple[int, int]
    """(height, width) of the first training bucket."""
    sample_size: tuple[int, int]
    """(height, width) of the sample images."""

    @property
    def trigger(self) -> str:
        return next(iter(self.token_dict))

    @property
    def token_string(self) -> str | None:
        """What the trigger becomes in captions and prompts: the new tokens joined (None without tokens)."""
        return self.token_dict[self.trigger] if self.tokens else None

    @property
    def dropout_caption(self) -> str:
        """What a dropped caption becomes: the trigger tokens alone, as in Eden (empty without tokens)."""
        return self.token_string or ""

    def training_args(self, config: TrainingConfig, now: float | None = None) -> dict[str, Any]:
        """``training_args.json``: the config as validated, with this run's resolved values written over it, and
        Eden's bookkeeping (``start_time``, ``job_time``: the run time so far)."""
        args = config.to_json_dict()
        args.update(name=self.name, seed=self.seed, sd_model_version=self.version,
                    max_train_steps=self.total_steps, num_train_epochs=self.num_train_epochs)
        if self.tokens:
            args.update(n_tokens=len(self.tokens), inserting_list_tokens=list(self.tokens),
                        token_dict=dict(self.token_dict))
        now = self.start_time if now is None else now
        args.update(start_time=self.start_time, job_time=now - self.start_time)
        return args


# ------------------------------------------------------------------------------------------------ the parts
def choose_seed(config: TrainingConfig) -> int:
    """The config's seed, else one drawn from the system's entropy (logged and saved with the run)."""
    if config.seed is not None:
        return config.seed
    return random.SystemRandom().randrange(0, DRAWN_SEED_LIMIT)


def new_run_dir(config: TrainingConfig) -> Path:
    """``<output_dir>/<name>_<date-time>``, with ``-N`` added when that folder exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir) / f"{safe_name(config.run_name)}_{stamp}"
    path = base
    counter = 1
    while path.exists():
        path = base.with_name(f"{base.name}-{counter}")
        counter += 1
    return path


def resolve_tokens(config: TrainingConfig,
                   count_tokens: Callable[[str], int]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The new tokens and the token dict. An initial phrase sets their number (unless ``n_tokens`` or
    ``inserting_list_tokens`` was given): ``count_tokens`` tells how many tokens the tokenizer makes of a text."""
    if config.disable_ti:
        return (), dict(config.token_dict)
    tokens = list(config.inserting_list_tokens)
    if config.initial_phrase is not None:
        n = count_tokens(config.initial_phrase)
        if n != len(tokens):
            if n > MAX_TOKENS:
                raise ValueError(f"initial_phrase {config.initial_phrase[:80]!r} has {n} tokens, more than the "
                                 f"{MAX_TOKENS} new tokens a concept may have; use a shorter phrase")
            if config.explicitly_set("n_tokens") or config.explicitly_set("inserting_list_tokens"):
                raise ValueError(
                    f"initial_phrase {config.initial_phrase!r} has {n} tokens but n_tokens is {config.n_tokens}; "
                    "leave n_tokens unset to take the phrase's length, or change the phrase"
                )
            tokens = default_token_list(n)
            return tuple(tokens), {config.trigger: "".join(tokens)}
    return tuple(tokens), dict(config.token_dict)


def resolve_total_steps(config: TrainingConfig, batches_per_epoch: int) -> int:
    """Eden's rule: ``max_train_steps`` always sets the run length (main.py derives the epochs from it). Only an
    explicit ``max_train_steps: null`` trains by ``num_train_epochs``."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    steps_per_epoch = steps_per_epoch_of(config, batches_per_epoch)
    assert config.num_train_epochs is not None  # the config refuses both being null
    total = config.num_train_epochs * steps_per_epoch
    if total > MAX_TRAIN_STEPS:
        raise ValueError(
            f"num_train_epochs {config.num_train_epochs} × {steps_per_epoch} steps per epoch is {total} steps, "
            f"over the limit of {MAX_TRAIN_STEPS}; use fewer epochs or set max_train_steps"
        )
    return total


def steps_per_epoch_of(config: TrainingConfig, batches_per_epoch: int) -> int:
    return max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))


def epochs_of(config: TrainingConfig, total_steps: int, batches_per_epoch: int) -> int:
    """Eden's ``num_train_epochs = ceil(max_train_steps / len(train_dataloader))``, counting micro-batches."""
    return math.ceil(total_steps * config.gradient_accumulation_steps / batches_per_epoch)


def resolve_run(config: TrainingConfig, *, run_dir: Path, seed: int, start_time: float, version: str,
                tokens: tuple[str, ...], token_dict: Mapping[str, str], batches_per_epoch: int,
                train_size: tuple[int, int]) -> ResolvedRun:
    """The run's resolved values, from the config and what setting up found (model family, tokens, data)."""
    total = resolve_total_steps(config, batches_per_epoch)
    return ResolvedRun(
        name=config.run_name, run_dir=Path(run_dir), seed=seed, start_time=start_time, version=version,
        tokens=tuple(tokens), token_dict=MappingProxyType(dict(token_dict)), total_steps=total,
        num_train_epochs=epochs_of(config, total, batches_per_epoch),
        steps_per_epoch=steps_per_epoch_of(config, batches_per_epoch), train_size=(train_size[0], train_size[1]),
        sample_size=sizes.sample_size(config.validation_img_size, version, train_size),
    )
