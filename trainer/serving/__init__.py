"""The cog container's glue. ``train.py`` and ``predict.py`` stay thin (their signatures are the API).

- :mod:`~trainer.serving.train_job`: a training job behind ``train()``: inputs to a validated config, the run, the
  zip, the ``output_uri`` upload, clean-up on failure and cancellation;
- :mod:`~trainer.serving.cancel`: coglet's asynchronous cancellation turned into a cooperative stop;
- :mod:`~trainer.serving.common`: cog input placeholders, operator switches, the work folder;
- :mod:`~trainer.serving.cog_client`: running and calling the real cog server (smoke script, end-to-end tests);
- :mod:`~trainer.serving.smoke`: ``./cog_test_train.sh``;
- :mod:`~trainer.serving.cog_files`: the requirements files the cog images install.

Prediction lives in :mod:`trainer.inference.service` and :mod:`trainer.inference.remote`.
"""
