"""The repository's top-level `kernels/` folder is `minivid.kernels`, and never a top-level `kernels`.

Run from the repository root, Python puts the root first on sys.path. transformers (>= 5.25) imports
the PyPI package `kernels`; the folder must hand that import to the installed package (issue 17).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_from_the_repo_root_kernels_is_the_installed_package_and_minivid_kernels_is_ours():
    code = (
        "import sys, os; sys.path.insert(0, os.getcwd())\n"       # as `python -m` does
        "import transformers, kernels, minivid.kernels\n"
        "from kernels import CUDAProperties\n"                    # what transformers 5.25 imports
        "print(os.path.dirname(kernels.__file__)); print(os.path.dirname(minivid.kernels.__file__))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    installed, ours = r.stdout.split()
    assert os.path.realpath(ours) == os.path.join(os.path.realpath(ROOT), "kernels")
    assert not os.path.realpath(installed).startswith(os.path.realpath(ROOT) + os.sep + "kernels")


def test_without_an_installed_kernels_package_the_import_fails_as_if_the_folder_were_absent():
    # Only the repository root on sys.path (-S: no site-packages): nothing named `kernels` is installed.
    code = (
        "import sys, os; sys.path[:] = [os.getcwd()] + [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "else:\n    print('imported', kernels.__file__)\n"
    )
    r = _run(code, "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["missing", "kernels"]


def test_python_dash_m_pytest_collects_from_the_repo_root():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_diffusers_names.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
