"""sftdist: supervised fine-tuning of Hugging Face causal LMs, the same math on every topology."""

__version__ = "0.1.0"
