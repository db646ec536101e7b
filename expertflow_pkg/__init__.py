"""ExpertFlow: compile a Hugging Face MoE model into a scheduled graph and run it with an expert cache."""

__version__ = "0.1.0"
