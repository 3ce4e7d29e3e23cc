"""TCVE: "Edit Temporal-Consistent Videos with Image Diffusion Model" (Wang, Li, Zhang, Liu, Dai,
Chan, Cui; arXiv:2308.09091, 2023).

SD 1.4 made a video model the Tune-A-Video way (minivid.methods.tuneavideo: sparse-causal
self-attention, temporal attention), plus a temporal branch beside it:

    temporal_unet.py   the temporal UNet of 1-D convolutions over frames (§IV-B)
    stu.py             the Spatial-Temporal modeling Unit (Eq. 7) and `TemporalBranch`, which
                       fuses the temporal UNet into an SD UNet through scoped output hooks
    model.py           `TCVEModel`: the inflated SD UNet and the branch as one module (what tunes, `attached`)
    tune.py            one-shot tuning on the shared engine (minivid.tuning), tuned checkpoints
    edit.py            DDIM inversion (empty prompt) and CFG-12.5 sampling with the tuned model
    cli.py             `minivid tune|edit|demo --method tcve`

See docs/tcve.md for the choices and the differences from the authors' code.
"""
