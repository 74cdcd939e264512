"""genbench: benchmark the building blocks of generative models."""
__version__ = "0.1.0"
