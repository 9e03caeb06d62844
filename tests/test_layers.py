"""The one ``--layers`` selection (nmgrad_cli.layers)."""

import pytest

from nmgrad_cli.errors import NmgradError
from nmgrad_cli.layers import LayerSelectionError, layer_matches, parse_layers, select_layers

NAMES = ["fc1", "fc2", "blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.mlp.fc", "head"]


def test_comma_separated_globs_select_in_given_order():
    assert select_layers(NAMES, "head,fc1") == ["fc1", "head"]
    assert select_layers(NAMES, "fc1, fc2") == ["fc1", "fc2"]
    assert select_layers(NAMES, "blocks.*.mlp.*") == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    assert select_layers(NAMES, ["fc*", "head"]) == ["fc1", "fc2", "head"]


def test_everything_when_absent_empty_or_star():
    for spec in (None, "", "*", "fc1,*"):
        assert parse_layers(spec) is None
        assert select_layers(NAMES, spec) == NAMES


def test_globs_are_case_sensitive():
    assert not layer_matches("FC1", ("fc1",))
    with pytest.raises(LayerSelectionError):
        select_layers(NAMES, "FC*")


def test_no_match_lists_the_names_and_is_a_user_error():
    with pytest.raises(LayerSelectionError) as e:
        select_layers(NAMES, "nothing*", what="dump layer")
    msg = str(e.value)
    assert isinstance(e.value, NmgradError) and e.value.exit_code == 2
    assert "no dump layer matches --layers 'nothing*'" in msg and "fc1" in msg and "head" in msg
    assert "\n" not in msg


def test_a_spec_of_only_commas_is_refused():
    with pytest.raises(LayerSelectionError, match="holds no glob"):
        parse_layers(", ,")


def test_long_name_lists_are_shortened():
    names = [f"l{i}" for i in range(40)]
    with pytest.raises(LayerSelectionError, match=r"\(40 in all\)"):
        select_layers(names, "x")
