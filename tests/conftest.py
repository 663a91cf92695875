"""Shared fixtures: a seeded tiny random checkpoint and model packages exported from it.

Exports are cached per test session (one package per precision), so every test file can use
real exported graphs without paying for the export more than once.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random checkpoint in the release layout (listenloop.export.tiny, seed 0)."""
    pytest.importorskip("torch")
    from listenloop.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("checkpoint") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_package_at(tiny_checkpoint, tmp_path_factory):
    """Factory: precision ("fp32", "fp16", "int8", "int4"), attention ("grouped", "gqa") and
    slots (also the slot decoder) -> path of the exported package."""
    from listenloop.export.package import export_package

    cache = {}
    root = tmp_path_factory.mktemp("packages")

    def build(precision: str = "fp32", attention: str = "grouped", slots: bool = False):
        key = (precision, attention, slots)
        if key not in cache:
            name = f"{precision}-{attention}" + ("-slots" if slots else "")
            cache[key] = export_package(tiny_checkpoint, root / name, precision=precision, attention=attention,
                                        slots=slots)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_package(tiny_package_at):
    """Path of the fp32 model package exported from `tiny_checkpoint`."""
    return tiny_package_at("fp32")
