"""Config-driven LLM inference pipeline: build a model as configured, time it on a question set, score it."""

__version__ = "0.1.0"
