"""Config values: plain containers and choice checks (the module and the SD study use them)."""

import pytest
from omegaconf import OmegaConf

from phis.config import check_choice, plain


def test_plain_resolves_interpolations_and_leaves_other_values() -> None:
    cfg = OmegaConf.create({"a": 2, "b": "${a}", "c": [1, "${a}"]})
    assert plain(cfg) == {"a": 2, "b": 2, "c": [1, 2]} and isinstance(plain(cfg), dict)
    assert plain(cfg.c) == [1, 2] and isinstance(plain(cfg.c), list)
    assert plain({"x": 1}) == {"x": 1} and plain(None) is None


def test_check_choice_names_key_value_and_choices() -> None:
    check_choice("optim.name", "adamw", ("adamw", "lamb", "sgd"))
    expected = r"optim.name='adam' is not valid; choose one of \['adamw', 'lamb'\]"
    with pytest.raises(ValueError, match=expected):
        check_choice("optim.name", "adam", ("adamw", "lamb"))
