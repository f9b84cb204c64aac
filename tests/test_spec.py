"""project.toml validation as a property: any [training] values either give a recipe within its
ranges, or one ValidationError line naming the table and the key, never anything else."""
from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import ValidationError
from engine.core.project import Project
from engine.core.spec import parse_spec

TOML = Path("/p/project.toml")
BASE = {"data": {"train": "a.csv", "test": "b.csv"}, "model": {}}
KEYS = ("optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "seed", "checkpoints_per_epoch",
        "lr_schedule")
# what TOML can hold: booleans, integers, floats (incl. inf/nan), strings, lists, tables
values = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["sgd", "adam", "lbfgs", "cosine", "constant", "two", "", "0.1"]),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def in_range(r) -> bool:
    return (r.optimizer in ("sgd", "adam", "lbfgs") and r.lr > 0 and 0 <= r.momentum < 1 and r.weight_decay >= 0
            and r.epochs >= 1 and r.batch_size >= 1 and r.seed >= 0 and r.checkpoints_per_epoch >= 1
            and r.lr_schedule in ("constant", "cosine", "linear", "step")
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (r.epochs, r.batch_size, r.seed)))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=4))
def test_recipe_values_are_valid_or_one_line_naming_the_key(training):
    try:
        spec = parse_spec({**BASE, "training": training}, TOML)
    except ValidationError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(TOML))
        assert "[training]" in msg and any(k in msg for k in training), msg
        return
    recipe = Project._parse_recipe(spec.training)
    assert in_range(recipe), (training, recipe)
    for k, v in training.items():  # what was accepted is what the recipe uses, never a silent cast
        assert getattr(recipe, k) == v and not isinstance(v, bool)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(lambda k: k not in KEYS and k != "stages"), values)
def test_unknown_training_key_is_named(key, value):
    try:
        parse_spec({**BASE, "training": {key: value}}, TOML)
    except ValidationError as e:
        assert repr(key) in str(e) and "unknown key" in str(e)
    else:
        raise AssertionError(f"unknown key {key!r} was accepted")
