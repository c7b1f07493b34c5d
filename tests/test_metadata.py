"""Package metadata: the license, the authors and the changelog agree with the code."""

import pathlib
import re

import pytest

import mla_cupy

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_license_file_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "the mla_cupy authors" in text


def test_pyproject_declares_license_and_authors():
    project = pyproject()
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert project["authors"] == [{"name": "mla_cupy authors"}]


def test_changelog_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## (\S+)", text, re.M)
    assert versions and versions[0] == "Unreleased", versions
    assert mla_cupy.__version__ in versions, versions
