"""Paths a project names stay inside it: the one-load folder cache gives what Path.resolve gives."""
import os
from pathlib import Path

import pytest

from engine.core.errors import ValidationError
from engine.core.paths import FolderResolver, check_inside, is_inside


@pytest.fixture()
def tree(tmp_path):
    root, out = tmp_path / "proj", tmp_path / "elsewhere"
    (root / "data" / "a").mkdir(parents=True)
    out.mkdir()
    (root / "data" / "a" / "x.png").write_bytes(b"x")
    (out / "secret.png").write_bytes(b"s")
    (root / "data" / "a" / "link.png").symlink_to(out / "secret.png")  # a file link leaving the project
    (root / "data" / "out").symlink_to(out, target_is_directory=True)  # a folder link leaving it
    (root / "data" / "in").symlink_to(root / "data" / "a", target_is_directory=True)  # a folder link inside
    return root, out


CASES = ["data/a/x.png", "data/a/link.png", "data/out/secret.png", "data/in/x.png", "data/a/../a/x.png",
         "data/a/..", "data/../../elsewhere/secret.png", "data/a/missing.png"]


@pytest.mark.parametrize("rel", CASES)
def test_folder_resolver_matches_path_resolve(tree, rel):
    root, _ = tree
    r = FolderResolver()
    for _ in range(2):  # the second call answers from the cached folder
        assert Path(r.resolve(root / rel)) == (root / rel).resolve()
        by_resolve = (root / rel).resolve().is_relative_to(root.resolve())
        assert r.inside(root / rel, root) == by_resolve == is_inside(root / rel, root)


def test_relative_paths_resolve_against_the_working_folder(tree, monkeypatch):
    root, _ = tree
    monkeypatch.chdir(root)
    assert Path(FolderResolver().resolve(Path("data/a/x.png"))) == (root / "data/a/x.png").resolve()


@pytest.mark.parametrize("rel,inside", [("data/a/x.png", True), ("data/in/x.png", True), ("data/a/link.png", False),
                                        ("data/out/secret.png", False), ("data/../../elsewhere/secret.png", False)])
def test_check_inside_with_a_shared_resolver(tree, rel, inside):
    root, _ = tree
    r = FolderResolver()
    r.resolve(root / "data" / "a" / "x.png")  # the folder is cached before the link in it is checked
    if inside:
        assert check_inside(root / rel, root, allowed=False, what="image", file="train.csv", resolver=r) == root / rel
    else:
        with pytest.raises(ValidationError, match="outside the project folder"):
            check_inside(root / rel, root, allowed=False, what="image", file="train.csv", row=3, resolver=r)
        assert check_inside(root / rel, root, allowed=True, what="image", file="train.csv", resolver=r) == root / rel


def test_a_folder_swapped_for_a_link_is_seen_by_the_next_load(tree):
    root, out = tree
    first = FolderResolver()
    assert first.inside(root / "data" / "b" / "y.png", root)
    os.symlink(out, root / "data" / "b")
    assert not FolderResolver().inside(root / "data" / "b" / "y.png", root)
