import pytest

from discgeo.config import Settings
from discgeo.errors import ConfigurationError


def test_defaults_and_overrides():
    assert Settings.from_env({}).contrast_preference == ("t1", "t2")
    s = Settings.from_env({"DISCGEO_CONTRAST_PREFERENCE": "T2, t1", "DISCGEO_MAX_DIM": "64"})
    assert s.contrast_preference == ("t2", "t1")
    assert s.max_dim == 64
    assert Settings.from_env({}).segmenter_mode == "fast"
    assert Settings.from_env({"DISCGEO_SEGMENTER_MODE": "Accurate"}).segmenter_mode == "accurate"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DISCGEO_MAX_DIM", "abc", "not an integer"),
        ("DISCGEO_MAX_VOXELS", "-5", "must be positive"),
        ("DISCGEO_CONTRAST_PREFERENCE", "t1,flair", "comma-separated list"),
        ("DISCGEO_ACCEPTED_PLANES", "oblique", "comma-separated list"),
        ("DISCGEO_ORIENTATION_TOLERANCE", "x", "not a number"),
        ("DISCGEO_SEGMENTER_MODE", "best", "expected one of fast, accurate"),
    ],
)
def test_bad_settings_are_named(name, value, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
