"""Fixtures of the training tests: four concept images and their prepared dataset, built once per module."""

from __future__ import annotations

import pytest

from tests.helpers import make_concept_images, prepared_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_concept_images(tmp_path_factory.mktemp("images") / "set", n=4)


@pytest.fixture(scope="module")
def dataset(images, tmp_path_factory):
    return prepared_dataset(images, tmp_path_factory.mktemp("prepared"))
