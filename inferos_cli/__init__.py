"""inferos: faster, leaner local LLM inference on AI PCs, with honest numbers."""

__version__ = "0.1.0"
