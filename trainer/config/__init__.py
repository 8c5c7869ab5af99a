"""Training configuration: the schema (:mod:`~trainer.config.schema`), loading with clear errors
(:mod:`~trainer.config.load`) and the generated parameter table (:mod:`~trainer.config.docs`)."""
