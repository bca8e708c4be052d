"""The package layout of issue 21: old import paths still resolve, to the very modules that moved."""

import importlib

import pytest

import moe_infer

# old path -> where the module lives now (kept for one release; README, scripts and user code may use them)
MOVED = {
    "moe_infer.trace": "moe_infer.traces.trace",
    "moe_infer.profiler": "moe_infer.traces.profiler",
    "moe_infer.trace_stats": "moe_infer.traces.stats",
    "moe_infer.corpus": "moe_infer.traces.corpus",
    "moe_infer.parallel": "moe_infer.distributed.parallel",
    "moe_infer.parallel_cost": "moe_infer.distributed.cost",
    "moe_infer.placement": "moe_infer.distributed.placement",
    "moe_infer.batching": "moe_infer.serving.batching",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_is_the_moved_module(old):
    moved = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is moved
    assert getattr(moe_infer, old.rpartition(".")[2]) is moved  # `moe_infer.trace` as an attribute too
    public = [name for name in vars(moved) if not name.startswith("_")]
    assert public and all(getattr(importlib.import_module(old), name) is getattr(moved, name) for name in public)


def test_moved_functions_keep_their_old_module_names():
    from moe_infer import loading
    from moe_infer.experts import skeleton
    from moe_infer.traces import popularity

    assert loading.skeleton is skeleton.skeleton and loading.parameters_on_meta is skeleton.parameters_on_meta
    assert loading.build_from_config is skeleton.build_from_config
    assert moe_infer.placement.hot_set is popularity.hot_set and moe_infer.placement.affinity is popularity.affinity


def test_the_readme_layout_table_matches_the_tree():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## Layout"):].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = {}
    for row in rows:
        folder = re.match(r"\| `([^`]+)/`", row).group(1)
        assert (root / folder).is_dir(), f"README layout names {folder}/, which does not exist"
        listed[folder] = row.split("|")[3]
        for name in re.findall(r"`([\w/]+\.py)`", listed[folder]):
            assert (root / folder / name).is_file(), f"README layout: {folder}/{name} does not exist"
    packages = {str(path.parent.relative_to(root)) for path in root.glob("moe_infer/*/__init__.py")}
    packages |= {folder for folder in ("routing", "experts", "cache", "predictors", "kernels")}
    assert packages <= set(listed), f"package folders missing from the README layout: {sorted(packages - set(listed))}"
