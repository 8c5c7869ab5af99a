"""Pivotal-tuning LoRA training for Stable Diffusion 1.5 and SDXL."""

__version__ = "0.1.0"
