import numpy as np
import pytest

from discgeo.config import Settings
from discgeo.errors import InvalidDataError, TooLargeError
from discgeo.volume import Volume, check_size


def test_canonical_preserves_world_positions_of_every_voxel():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    # axes: 0 -> inferior (2 mm), 1 -> posterior (0.5 mm), 2 -> left (3 mm), some translation
    affine = np.array([[0, 0, -3.0, 10], [0, -0.5, 0, 20], [-2.0, 0, 0, 30], [0, 0, 0, 1]])
    vol = Volume(array, affine)
    assert vol.axcodes == ("I", "P", "L")
    can = vol.canonical()
    assert can.axcodes == ("R", "A", "S")
    assert can.shape == (6, 5, 4)
    assert can.spacing == pytest.approx((3.0, 0.5, 2.0))
    assert can.source_shape == (4, 5, 6) and can.source_axcodes == ("I", "P", "L")
    # every voxel keeps its value at the same world position
    for ijk in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        world = vol.world_coordinates(np.array(ijk))
        back = np.linalg.solve(can.affine[:3, :3], world - can.affine[:3, 3])
        assert np.allclose(back, np.rint(back))
        assert can.array[tuple(np.rint(back).astype(int))] == array[ijk]


def test_canonical_is_identity_for_ras():
    vol = Volume(np.zeros((2, 3, 4)), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert vol.canonical() is vol


def test_volume_rejects_bad_inputs():
    with pytest.raises(InvalidDataError, match="3D"):
        Volume(np.zeros((2, 3)), np.eye(4))
    with pytest.raises(InvalidDataError, match="singular"):
        Volume(np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_size_limits():
    settings = Settings(max_dim=100, max_voxels=1000)
    check_size((10, 10, 10), settings)
    with pytest.raises(TooLargeError, match="DISCGEO_MAX_DIM"):
        check_size((101, 1, 1), settings)
    with pytest.raises(TooLargeError, match="DISCGEO_MAX_VOXELS"):
        check_size((11, 10, 10), settings)
