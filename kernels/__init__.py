"""Hand-written Triton kernels, each beside a PyTorch reference of the same signature.

Installed as `minivid.kernels` (setup.py `package_dir`). Triton is imported lazily, only when a
kernel runs on CUDA.

This folder never stands in for another package. Run from the repository root (`python -m pytest`,
`python -m minivid`), Python puts the root first on `sys.path` and so also sees this folder as a
top-level package `kernels` — the name of an unrelated PyPI package that transformers imports. When
imported under any name but `minivid.kernels`, this file hands the import to the next package of
that name on `sys.path` (the installed one), or fails exactly as if this folder were not there.
"""

if __name__ != "minivid.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module          # the import statement returns sys.modules[name]
    _spec.loader.exec_module(_module)
else:
    def aot_specs(capability):
        """One spec per Triton launch the methods make, as chosen for a GPU of compute `capability`
        (e.g. (8, 0)), for ahead-of-time compilation: see `minivid.kernels.aot` (imported on call)."""
        from .aot import aot_specs as specs
        return specs(capability)
