"""COVE: consistent high-quality video editing with diffusion-feature correspondence (SD 2.1).

Building blocks, in the order of the paper (§3.2-3.3):
- `correspondence`: sliding-window top-K correspondence between consecutive frames and its
  chaining to every other frame (Eq. 5-10);
- `merge`: temporal token merging of the gathered corresponding tokens (Eq. 12);
- `attention`: correspondence-guided attention (Eq. 11-14) and dense spatio-temporal attention,
  as processors for the self-attention layers of the UNet.
"""
