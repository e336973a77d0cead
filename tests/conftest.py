"""Shared fixtures: tiny random checkpoints in the release layout and their exported engines.

Built once per test session under pytest's temp dir; nothing is downloaded.
"""
from __future__ import annotations

import os

import pytest

TINY_PRESETS = ("tiny-plus", "tiny-v1")


def pytest_collection_modifyitems(config, items):
    has_gpu = os.path.exists("/dev/nvidia0") or os.environ.get("ILLUME_EDGE_GPU") == "1"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """preset name -> checkpoint folder (made on first use)."""
    from illume_edge.export.checkpoint import make_tiny

    made: dict[str, object] = {}

    def get(preset: str):
        if preset not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{preset}")
            make_tiny(preset, out, seed=0)
            made[preset] = out
        return made[preset]

    return get


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory, tiny_checkpoint):
    """(preset name, llm graph = the export default) -> (engine folder, loaded torch modules)."""
    from illume_edge.export.checkpoint import load_checkpoint
    from illume_edge.export.engine import export_engine
    from illume_edge.manifest import DEFAULT_LLM_GRAPH

    made: dict[tuple[str, str], tuple] = {}

    def get(preset: str, llm_graph: str = DEFAULT_LLM_GRAPH):
        key = (preset, llm_graph)
        if key not in made:
            ckpt = tiny_checkpoint(preset)
            mods = load_checkpoint(ckpt)
            out = tmp_path_factory.mktemp(f"engine-{preset}-{llm_graph}") / preset
            export_engine(mods, out, ckpt / "mllm" / "tokenizer.json", progress=lambda s: None,
                          llm_graph=llm_graph)
            made[key] = (out, mods)
        return made[key]

    return get


@pytest.fixture()
def engine_copy(tiny_engine, tmp_path):
    """(preset name, llm graph = the export default) -> a private copy of that engine folder (for tests that
    damage it)."""
    import shutil

    from illume_edge.manifest import DEFAULT_LLM_GRAPH

    def get(preset: str, llm_graph: str = DEFAULT_LLM_GRAPH):
        dst = tmp_path / f"engine-{preset}-{llm_graph}"
        shutil.copytree(tiny_engine(preset, llm_graph)[0], dst)
        return dst

    return get
