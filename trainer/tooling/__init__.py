"""Developer and operator tools that never run inside the container's request path.

The runtime (``train.py``, ``predict.py`` and every other ``trainer`` package) never imports this package: a test
imports them all in a fresh interpreter and checks ``sys.modules``.

- :mod:`~trainer.tooling.smoke`: ``sh cog_test_train.sh``, a training and a prediction through the real cog server;
- :mod:`~trainer.tooling.cog_client`: running and calling the real cog server (smoke script, end-to-end tests);
- :mod:`~trainer.tooling.requirements`: the requirements files the cog images install, generated and checked;
- :mod:`~trainer.tooling.benchmark`: ``python -m trainer benchmark``, training speed and memory;
- :mod:`~trainer.tooling.architectures`: the real SD1.5/SDXL architectures with random weights, for the benchmark.
"""
