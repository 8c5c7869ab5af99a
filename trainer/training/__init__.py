"""Training, in torchtune's recipe shape: set up, train, save.

- :mod:`~trainer.training.resolved`: what a run derives from its config (name, seed, tokens, steps, sizes), frozen;
- :mod:`~trainer.training.session`: :func:`setup`, one named builder per part (models, data, tokens, adapters,
  optimiser groups, probe and compile), and the :class:`Session` they fill;
- :mod:`~trainer.training.loop`: :func:`train` and the loop over steps, top to bottom;
- :mod:`~trainer.training.step`: one optimisation step in named pieces (batch, forward, loss terms, optimiser step);
- :mod:`~trainer.training.schedule`: which parts train at which step and Eden's learning-rate curves;
- :mod:`~trainer.training.optimizers`: parameter groups (named by :class:`GroupName`), optimisers and schedulers;
- :mod:`~trainer.training.losses`: the denoising loss and the regularisers;
- :mod:`~trainer.training.checkpoint`: checkpoint folders, writing them (exports, samples, resumable state) and
  resuming from them;
- :mod:`~trainer.training.outputs`: the exported files, the sample images and the zip;
- :mod:`~trainer.training.errors`: the errors that end a run.
"""
