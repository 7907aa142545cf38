"""DINOv2 + PatchCore anomaly detection as a plain library (no Ray import anywhere in this package)."""

from anomaly_core.config import ModelConfig
from anomaly_core.scoring import decode_heatmap

__all__ = ["ModelConfig", "decode_heatmap"]
