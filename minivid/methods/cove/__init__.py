"""COVE: consistent high-quality video editing with diffusion-feature correspondence (SD 2.1).

Wang, Ma, Guo, Xiao, Huang, Li, "COVE: Unleashing the Diffusion Feature Correspondence for
Consistent Video Editing", NeurIPS 2024, arXiv:2406.08850.

In the order of the paper (§3.2-3.3, Appendix A, C, E):
- `features`: diffusion features, one UNet pass on each frame noised to t = 261 (Eq. 4);
- `correspondence`: sliding-window top-K correspondence between consecutive frames and its
  chaining to every other frame (Eq. 5-10);
- `merge`: temporal token merging of the gathered corresponding tokens (Eq. 12);
- `attention`: correspondence-guided attention (Eq. 11-14) and dense spatio-temporal attention,
  as processors for the self-attention layers of the UNet;
- `inject`: the source features saved during inversion and injected while sampling (FLATTEN's layers);
- `pipeline`: `edit_video(sd, frames, prompt, source_prompt, COVEConfig())`, the whole method;
- `visualize`: the correspondence picture of Appendix C;
- `cli`: `minivid edit --method cove`, `minivid demo --method cove`.
"""
