"""Bad configurations fail with messages that name the problem and the fix."""

from __future__ import annotations

import pytest

from leanformers.chts import CHTssConfig


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"final_density=.* is outside \(0, 1\]"):
        CHTssConfig(final_density=value)
    with pytest.raises(ValueError, match=r"initial_density=.* is outside \(0, 1\]"):
        CHTssConfig(final_density=0.1, initial_density=value)


def test_final_above_initial_is_refused_for_chtss():
    with pytest.raises(
        ValueError, match=r"final_density=0.6 > initial_density=0.5.*Set initial_density >= final_density"
    ):
        CHTssConfig(final_density=0.6, initial_density=0.5)


def test_chts_is_chtss_at_fixed_density():
    cfg = CHTssConfig(final_density=0.3, initial_density=None)
    assert cfg.initial_density == 0.3 and not cfg.is_chtss
    assert CHTssConfig(final_density=0.3).is_chtss


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("regrowth", "CH9", "regrowth='CH9' is not one of"),
        ("removal_sampling", "top", "removal_sampling='top' is not one of"),
        ("zeta", 1.0, r"zeta=1.0 must be in \[0, 1\)"),
        ("topology_end", 0.0, r"topology_end=0.0 must be in \(0, 1\]"),
        ("update_interval", -1, "update_interval=-1 must be >= 0"),
        ("brf_randomness", 2.0, r"brf_randomness=2.0 must be in \[0, 1\]"),
        ("targets", (), "targets is empty"),
    ],
)
def test_field_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        CHTssConfig(**{field: value})


def test_presets():
    assert CHTssConfig.for_method("set", final_density=0.1).regrowth == "random"
    rigl = CHTssConfig.for_method("RigL", final_density=0.1)
    assert rigl.regrowth == "gradient" and rigl.initial_density == 0.1 and rigl.method == "rigl"
    assert CHTssConfig.for_method("static", final_density=0.1, update_interval=5).update_interval == 0
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        CHTssConfig.for_method("foo")


@pytest.mark.parametrize("method", ["chts", "cht", "set", "rigl", "static"])
def test_method_field_applies_its_preset(method):
    # Issue 7: CHTssConfig(method="rigl") was accepted and ignored (it ran CHTss).
    direct = CHTssConfig(method=method, final_density=0.1)
    assert direct.to_dict() == CHTssConfig.for_method(method, final_density=0.1).to_dict()
    assert direct.initial_density == 0.1 and not direct.is_chtss  # every non-CHTss preset is fixed density
    if method == "rigl":
        assert direct.regrowth == "gradient" and direct.regrowth_sampling == "hard"


def test_method_field_keeps_explicit_fields_and_round_trips():
    cfg = CHTssConfig(method="RigL", final_density=0.1, regrowth_sampling="soft", initial_density=0.2)
    assert cfg.method == "rigl" and cfg.regrowth == "gradient"
    assert cfg.regrowth_sampling == "soft" and cfg.initial_density == 0.2  # explicit fields win
    assert CHTssConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()
    assert CHTssConfig(method="chtss").to_dict() == CHTssConfig().to_dict()


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"method='foo' is not a known method; choose one of"):
        CHTssConfig(method="foo")


def test_mest_lambda_default_is_the_official_value():
    # Issue 7: the default was 1.0, 100x the official --factor 0.01 (Cannistraci-Hebb-training).
    assert CHTssConfig().mest_lambda == 0.01
