"""Canonical storage order (``orientation.py``): exact mapping of voxels and of their positions,
and training cases read from disk in the order inference gives the network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from AirwaySegmentationLib.data import find_cases, load_case
from AirwaySegmentationLib.orientation import Reorientation, canonical
from AirwaySegmentationLib.phantom import generate_phantom
from AirwaySegmentationLib.volume import Geometry, Volume, write_volume


def _stored_direction(axes_of_index, signs, tilt=0.2):
    """A direction matrix whose index axis a lies along physical axis ``axes_of_index[a]`` times
    ``signs[a]``, tilted about the S axis by ``tilt`` radians."""
    direction = np.zeros((3, 3))
    for a, (p, sign) in enumerate(zip(axes_of_index, signs)):
        direction[p, a] = sign
    rotation = np.array([[np.cos(tilt), -np.sin(tilt), 0], [np.sin(tilt), np.cos(tilt), 0], [0, 0, 1]])
    return rotation @ direction


@pytest.mark.parametrize("axes_of_index", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", list(itertools.product((1, -1), repeat=3)))
def test_every_voxel_keeps_its_physical_position_in_the_canonical_order(axes_of_index, signs):
    geometry = Geometry((0.7, 0.8, 1.3), (10.0, -20.0, 30.0), tuple(_stored_direction(axes_of_index, signs).ravel()))
    array = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    volume, reorientation = canonical(Volume(array, geometry))
    assert reorientation.is_identity == (axes_of_index == (0, 1, 2) and signs == (1, 1, 1))
    # Index axes along L, P, S (an oblique tilt stays: no resampling).
    assert np.all(np.diag(volume.geometry.direction_matrix) > 0.9)
    index = np.argwhere(np.ones(volume.array_zyx.shape, dtype=bool))
    stored_index = np.rint(geometry.physical_to_index_zyx(volume.geometry.index_zyx_to_physical(index))).astype(int)
    np.testing.assert_array_equal(volume.array_zyx[tuple(index.T)], array[tuple(stored_index.T)])
    np.testing.assert_array_equal(reorientation.from_canonical(volume.array_zyx), array)
    assert sorted(volume.geometry.spacing_xyz) == sorted(geometry.spacing_xyz)


def test_a_direction_near_45_degrees_still_maps_each_axis_once():
    geometry = Geometry(direction=tuple(_stored_direction((0, 1, 2), (1, 1, 1), tilt=np.pi / 4 + 1e-9).ravel()))
    reorientation = Reorientation.of(geometry)
    assert sorted(reorientation.axes_zyx) == [0, 1, 2]


def test_a_training_case_stored_otherwise_is_read_in_the_canonical_order(tmp_path):
    phantom = generate_phantom(seed=3, shape_zyx=(48, 64, 64), spacing_zyx=(2.0, 2.0, 2.0))
    _write(tmp_path / "canonical", phantom.ct, phantom.airway3)
    # The same images stored as a RAS NIfTI reads (x and y reversed) with z and y swapped.
    order = Reorientation((1, 0, 2), (False, True, True))
    grid = order.geometry(phantom.ct.geometry, phantom.ct.array_zyx.shape)
    _write(tmp_path / "stored", Volume(np.ascontiguousarray(order.to_canonical(phantom.ct.array_zyx)), grid),
           Volume(np.ascontiguousarray(order.to_canonical(phantom.airway3.array_zyx)), grid))
    expected, loaded = (load_case(find_cases(tmp_path / name)[0]) for name in ("canonical", "stored"))
    np.testing.assert_array_equal(loaded.ct.array_zyx, expected.ct.array_zyx)
    np.testing.assert_array_equal(loaded.labels3, expected.labels3)
    assert loaded.ct.geometry.same_grid(expected.ct.geometry, loaded.labels3.shape, expected.labels3.shape)


def _write(root, ct: Volume, labels: Volume) -> None:
    write_volume(ct, root / "imagesTr" / "P_0000.nii.gz")
    write_volume(labels, root / "labelsTr" / "P.nii.gz")
