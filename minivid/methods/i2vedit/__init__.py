"""I2VEdit: first-frame-guided video editing on Stable Video Diffusion.

Ouyang et al., "I2VEdit: First-Frame-Guided Video Editing via Image-to-Video Diffusion Models",
SIGGRAPH Asia 2024, arXiv:2405.16537.
"""
