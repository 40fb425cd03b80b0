"""vlmlab: build a small vision-language model from parts and find out which choices make it see."""

from vlmlab.model import VLM

__all__ = ["VLM"]
__version__ = "0.1.0"
