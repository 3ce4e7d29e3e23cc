"""EI² (Zhang et al., NeurIPS 2023): consistent video editing by inflating SD 1.4 with a
Shift-restricted Temporal Attention Module (STAM, §4.3) and a Fine-coarse Frame Attention
Module (FFAM, §4.4), then one-shot tuning on the source video.

- `blocks`: Instance Centering, STAM and the FFAM attention processor (see docs/ei2.md).
"""
from minivid.methods.ei2.blocks import STAM, FFAMProcessor, instance_centering

__all__ = ["STAM", "FFAMProcessor", "instance_centering"]
