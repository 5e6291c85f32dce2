"""lmlab: train and compare Transformer language models with Lightning and Hydra."""

__version__ = "0.1.0"
