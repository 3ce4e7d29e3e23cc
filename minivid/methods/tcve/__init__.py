"""TCVE: Edit Temporal-Consistent Videos with Image Diffusion Model (Wang et al., 2023).

SD 1.4 made a video model the Tune-A-Video way (minivid.methods.tuneavideo: sparse-causal
self-attention, temporal attention), plus a temporal branch beside it:

    temporal_unet.py   the temporal UNet of 1-D convolutions over frames (§IV-B)
    stu.py             the Spatial-Temporal modeling Unit (Eq. 7) and `TemporalBranch`, which
                       fuses the temporal UNet into an SD UNet through scoped output hooks

See docs/tcve.md for the choices and the differences from the authors' code.
"""
