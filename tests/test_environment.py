"""The one pinned environment: constraints.txt covers every dependency, and the tests run on its pins."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The packages whose versions decide what the engine, the pipeline and the endpoint do (issue 13).
KEY_PACKAGES = ["torch", "torchvision", "ray", "diffusers", "transformers", "huggingface-hub", "accelerate",
                "safetensors", "pillow", "numpy", "fsspec", "s3fs", "pyarrow", "pydantic", "fastapi", "uvicorn"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonical(name)] = version
    return out


def test_constraints_pin_every_dependency_exactly_once():
    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", ln) for ln in lines), "only name==version lines"
    assert len(pins()) == len(lines)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {canonical(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in requirements}
    assert names - set(pins()) == set()
    assert set(KEY_PACKAGES) <= set(pins())


@pytest.mark.parametrize("name", KEY_PACKAGES)
def test_the_tests_run_on_the_pinned_versions(name):
    installed = metadata.version(name).split("+")[0]  # torch 2.14.1+cu130 satisfies torch==2.14.1
    assert installed == pins()[name], f"{name} {installed} installed, constraints.txt pins {pins()[name]}"


@pytest.mark.parametrize("path,flag", [("deploy/Dockerfile", "-c constraints.txt"), ("Makefile", "-c $(CONSTRAINTS)")])
def test_every_install_of_capray_or_torch_uses_the_constraints(path, flag):
    text = (REPO / path).read_text().replace("\\\n", " ")
    installs = [ln for ln in text.splitlines() if re.search(r"pip install(?! --upgrade pip)", ln)]
    assert installs and all(flag in ln for ln in installs), installs
    assert any("torch" in ln for ln in installs)
