"""Training data: from ``lora_training_urls`` to a prepared dataset that the trainer reads through its manifest.

Entry point: :func:`trainer.data.prepare.prepare_dataset`. The contract with training is
:mod:`trainer.data.manifest`: images already at their training size, captions with the trigger in place, optional
L-mode masks (255 = the concept, soft towards 0 where the loss should care less; ``None`` = the whole image counts),
the true original size and the crop offset for SDXL's size conditioning. The contact sheet of the prepared set is
written to ``<work_dir>/dataset_preview.jpg``. Limits are documented in :mod:`trainer.data.limits`.
"""
