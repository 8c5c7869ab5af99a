"""The cog container's glue. ``train.py`` and ``predict.py`` stay thin (their signatures are the API).

- :mod:`~trainer.serving.train_job`: a training job behind ``train()``: inputs to a validated config, the run, the
  zip, the ``output_uri`` upload, clean-up on failure and cancellation;
- :mod:`~trainer.serving.cancel`: coglet's asynchronous cancellation turned into a cooperative stop;
- :mod:`~trainer.serving.common`: cog input placeholders and declared defaults;
- :mod:`~trainer.serving.boundary`: what a request from the network may name.

Only what runs in the container lives here; the smoke driver, the cog HTTP client and the requirements generator are
in :mod:`trainer.tooling`.

Prediction lives in :mod:`trainer.inference.service` and :mod:`trainer.inference.remote`.
"""
