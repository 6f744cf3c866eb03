"""int_lm: integer-only recurrent language models (EGG) trained by EGGROLL evolution strategies."""

__version__ = "0.1.0"
