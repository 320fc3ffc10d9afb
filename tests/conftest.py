"""Shared pytest setup: one BLAS thread per process (2-core CI, bit-exact CPU comparisons) and a small
synthetic data set written once per session."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported by any test module

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """data.make_synthetic with 24 training and 4 test images (caption + choice record each)."""
    import data

    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(root, n_train=24, n_test=4)
    return root
