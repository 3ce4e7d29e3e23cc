"""Official checkpoints: reading, format detection, strict loading and the diffusers rename tables.

    from minivid import weights
    sd = weights.read_state_dict("weights/sd-v1-4.ckpt")          # name -> tensor (pickles: weights_only)
    weights.detect(sd)                                             # "sd1"
    parts = weights.split_by_prefix(sd, weights.SD_PREFIXES["sd1"], source="weights/sd-v1-4.ckpt")
    weights.load_strict(unet, parts["unet"], "weights/sd-v1-4.ckpt", "unet")
    weights.compare_to_manifest(weights.read_shapes("weights/sd-v1-4.ckpt"), "sd-v1-4").ok

    folder = weights.read_diffusers_folder("stable-diffusion-2-1")  # component -> diffusers-named state dict
    unet_sd = weights.diffusers_to_original("unet", folder["unet"])  # -> input_blocks.1.1.proj_in.weight ...

Files: files.py (reading), detect.py (which model), strict.py (checks and loading, manifests),
diffusers_names.py (one rename table per component; svd_names.py adds SVD's), tiny.py (a small random SD-style file).
Every failure is a `WeightsError` (a ValueError) whose message names the file and what was expected.
"""
from .detect import (MANIFEST_OF, MODELS, describe_detection, detect, detect_folder, detect_path,
                     group_by_component, guess_prediction, stated_prediction, SD_CONFIG_METADATA_KEY)
from .diffusers_names import (TABLES, ComponentTable, Rule, TextSD2Layout, UNetLayout, VAELayout,
                              diffusers_only, diffusers_to_original, layout_of, original_only,
                              original_to_diffusers)
from .files import (PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, WEIGHT_EXTENSIONS, TensorInfo, WeightsError,
                    find_component_file, read_diffusers_folder, read_safetensors_header, read_shapes,
                    read_state_dict, shapes_of)
from .strict import (HARMLESS_EXTRAS, MANIFESTS_DIR, REST, SCHEDULE_BUFFERS, SD_PREFIXES, Manifest, Report,
                     check_finite, compare_to_manifest, is_harmless, load_manifest, load_strict, nonfinite_tensors,
                     split_by_prefix)
from .svd_names import (SVD_KNOWN_EXTRAS, SVD_PREFIXES, SVD_TABLES, check_identity_quant_conv,  # registers svd_* tables
                        conditioning_encoder_difference, identity_quant_conv)

__all__ = [
    "WeightsError", "TensorInfo", "read_state_dict", "read_shapes", "read_safetensors_header",
    "read_diffusers_folder", "find_component_file", "shapes_of",
    "SAFETENSORS_EXTENSIONS", "PICKLE_EXTENSIONS", "WEIGHT_EXTENSIONS",
    "detect", "describe_detection", "detect_path", "detect_folder", "guess_prediction", "stated_prediction",
    "SD_CONFIG_METADATA_KEY", "group_by_component",
    "MODELS", "MANIFEST_OF",
    "split_by_prefix", "load_strict", "check_finite", "nonfinite_tensors", "compare_to_manifest", "load_manifest", "Manifest", "Report",
    "HARMLESS_EXTRAS", "SCHEDULE_BUFFERS", "SD_PREFIXES", "REST", "MANIFESTS_DIR", "is_harmless",
    "original_to_diffusers", "diffusers_to_original", "original_only", "diffusers_only", "layout_of",
    "Rule", "UNetLayout", "VAELayout", "TextSD2Layout", "ComponentTable", "TABLES",
    "SVD_PREFIXES", "SVD_KNOWN_EXTRAS", "SVD_TABLES", "check_identity_quant_conv", "identity_quant_conv",
    "conditioning_encoder_difference",
]
