"""The 3D UNet and its checkpoints."""

from models.checkpoint import (infer_model_args, load_model, load_weights, model_from_checkpoint, read_checkpoint, read_state_dict,
                               save_checkpoint, unwrap, weights_digest)
from models.unet3d import UNet3D, UNetArgs

__all__ = ["UNet3D", "UNetArgs", "infer_model_args", "load_model", "load_weights", "model_from_checkpoint", "read_checkpoint", "read_state_dict", "save_checkpoint", "unwrap", "weights_digest"]
