"""DeeBERT model core: config, early-exit model, checkpoints, data, training, evaluation.

This package never imports web code; the server's engine is its only consumer there.
"""

from model.config import DeeBertConfig, Preset
from model.modeling import DeeBert, ExitResult, LayerExits, OffRamp

__all__ = ["DeeBert", "DeeBertConfig", "ExitResult", "LayerExits", "OffRamp", "Preset"]
