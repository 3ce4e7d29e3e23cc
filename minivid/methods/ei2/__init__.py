"""EI² (Zhang, Li, Nie, Han, Guo, Liu, "Towards Consistent Video Editing with Text-to-Image
Diffusion Models", NeurIPS 2023): consistent video editing by inflating SD 1.4 with a
Shift-restricted Temporal Attention Module (STAM, §4.3) and a Fine-coarse Frame Attention
Module (FFAM, §4.4), then one-shot tuning on the source video (§5). See docs/ei2.md.

- `blocks`: Instance Centering, STAM and the FFAM attention processor.
- `model`:  inflation (§4.1): `inflate(unet, EI2Config)`, the STAM block, `EI2Model` on [B, C, F, H, W].
- `tune`:   one-shot tuning on the shared engine (`tune_video`), loading a tuned model (`load_tuned`).
- `edit`:   DDIM inversion with the source prompt, sampling with the edit prompt, CFG 7.5 (`edit`).
- `cli`:    `minivid tune|edit|demo --method ei2`.
"""
from minivid.methods.ei2.blocks import STAM, FFAMProcessor, instance_centering
from minivid.methods.ei2.edit import edit
from minivid.methods.ei2.model import ORDERS, EI2Config, EI2Model, inflate, set_stam_order, trainable_patterns
from minivid.methods.ei2.tune import diffusion_loss, encode_video, load_tuned, tune_video

__all__ = [
    "STAM", "FFAMProcessor", "instance_centering", "ORDERS", "EI2Config", "EI2Model", "inflate", "set_stam_order",
    "trainable_patterns", "tune_video", "load_tuned", "diffusion_loss", "encode_video", "edit",
]
