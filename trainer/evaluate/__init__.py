"""Checkpoint evaluation: score every checkpoint of a run and recommend the best one (and its LoRA scale).

Each checkpoint renders a fixed, seeded prompt set (``prompts``) at one or more LoRA scales through the predictor's
generator; CLIP (``clip``) scores prompt adherence without the token, likeness to the training images and the
diversity of the outputs (``metrics``), a LAION-style MLP (``aesthetic``) the look when its weights are given. The
rule in ``recommend`` picks the checkpoint; ``settings`` says what is rendered and scored; ``runner`` writes
``RUN/evaluation/`` (``report.json``, ``summary.md``, ``scores.png``, ``grids/``). Entry points:
``python -m trainer evaluate RUN``, :func:`~trainer.evaluate.runner.evaluate_run`, and ``evaluate_checkpoints: true``
in a training config.
"""
