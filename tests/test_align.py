"""Pose alignment by PCA of edges: parts in any pose come out in one pose, and maps go back."""

import numpy as np
import pytest

from anomaly_core.align import align_images, edge_pose, unalign_maps

S = 96


def part(angle: float, centre: tuple[float, float]) -> np.ndarray:
    """[S, S, 3] uint8: a bright bar with a knob at one end, turned by `angle` (radians, ccw) about `centre`."""
    rows, cols = np.mgrid[:S, :S].astype(float)
    dx, dy = cols - centre[1], -(rows - centre[0])
    u = dx * np.cos(angle) + dy * np.sin(angle)                   # along the bar
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    shape = ((np.abs(u) < 26) & (np.abs(v) < 6)) | ((u - 26) ** 2 + v ** 2 < 11 ** 2)
    return np.repeat(np.where(shape, 200, 40).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("angle", [0.3, 1.9, -2.5])
def test_the_pose_is_the_centroid_and_the_axis_of_the_part(angle):
    ref = edge_pose(part(0.0, (48, 48)).mean(-1))
    pose = edge_pose(part(angle, (44, 53)).mean(-1))
    c, s = np.cos(angle), np.sin(angle)
    moved = np.array([44, 53]) + np.array([[c, -s], [s, c]]) @ (ref[:2] - 48)   # (row, col), y down
    assert np.hypot(*(pose[:2] - moved)) < 1.5                      # the centroid turns with the part
    turn = (pose[2] - ref[2] - angle + np.pi) % (2 * np.pi) - np.pi
    assert abs(turn) < 0.05                                         # no 180-degree flip either


def test_parts_in_any_pose_align_to_the_same_image():
    aligned, _ = align_images(np.stack([part(a, c) for a, c in [(0.0, (48, 48)), (2.2, (40, 55)),
                                                                (-1.0, (52, 44))]]))
    fg = aligned[0, ..., 0] > 120
    for other in aligned[1:]:
        assert np.mean((other[..., 0] > 120) != fg) < 0.02         # < 2% of pixels disagree


def test_maps_warp_back_to_the_image_frame():
    img = part(1.2, (45, 50))
    aligned, poses = align_images(img[None])
    back = unalign_maps(aligned[..., 0].astype(np.float32), poses)[0]
    assert np.mean((back > 120) != (img[..., 0] > 120)) < 0.01


def test_a_flat_image_keeps_its_pose():
    img = np.full((1, S, S, 3), 90, np.uint8)
    aligned, poses = align_images(img)
    np.testing.assert_array_equal(aligned, img)
    assert poses[0, 2] == 0
