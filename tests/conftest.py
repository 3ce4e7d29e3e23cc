import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread for the whole suite. The tests run tiny models, which gain nothing from
# threads, and the machines they run on have 2 cores shared with other jobs: two OpenMP threads
# then spin-wait on each other whenever another process holds a core. Measured on such a machine
# (whole files, OMP_NUM_THREADS=1 vs 2): test_tcve_blocks.py 2.7 s vs 18.6 s (5.3 s vs 54 s under
# load), test_ei2_blocks.py 2.4 s vs 5.2 s, test_samplers.py 6.2 s vs 4.6 s (within the noise).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_sd():
    """Tiny random Stable Diffusion models, built once per test module and shared read-only:
    `tiny_sd(preset, seed)` with preset "tiny" (SD 1-style) or "tiny_sd2" (SD 2-style, v)."""
    from minivid.models import StableDiffusion

    cache = {}

    def get(preset: str, seed: int = 0) -> StableDiffusion:
        if (preset, seed) not in cache:
            cache[preset, seed] = StableDiffusion.from_config(preset, seed=seed)
        return cache[preset, seed]
    return get


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower end-to-end tests")
    config.addinivalue_line("markers", "distributed: starts several processes (torch.distributed, gloo on CPU); "
                                       "deselect with -m 'not distributed'")
