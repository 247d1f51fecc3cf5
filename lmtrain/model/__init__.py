"""Single-device PyTorch model code: no Lightning, DeepSpeed or distributed imports."""

from lmtrain.model.decoder import Decoder, build_model

__all__ = ["Decoder", "build_model"]
