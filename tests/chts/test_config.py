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
