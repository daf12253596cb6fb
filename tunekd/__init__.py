"""tunekd: hyperparameter studies of knowledge distillation with intermediate-layer matching."""

__version__ = "0.1.0"
