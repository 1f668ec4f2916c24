"""Shared test set-up: offline, CPU-only, deterministic, with caches in a temporary folder."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# Teacher outputs and extracted features of the tests' tiny models go to a folder of this session
# (commands the tests start inherit it), never into the repository's or the user's cache.
_CACHE = tempfile.mkdtemp(prefix="phis-test-cache-")
os.environ["PHIS_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS thread for a module of tiny tensors.

    Small operations are latency bound: on a busy 2-core machine a second intra-op or BLAS thread only
    spin-waits (measured 20-100x slower). Modules opt in with ``pytestmark``.
    """
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)
