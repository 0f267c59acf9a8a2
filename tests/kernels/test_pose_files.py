import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.pose_files import format_pose_file, parse_pose_file

from mv4d_test_scenes import random_rig

# One RealEstate10K-style line: timestamp, fx fy cx cy (normalised), k1 k2, 3x4 world-to-camera (identity here).
IDENTITY_LINE = "33366667 0.5 0.888 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"


def test_pose_file_round_trip_keeps_the_cameras():
    rig = random_rig(6, torch.Generator().manual_seed(0), height=180, width=320)
    text = format_pose_file(rig, [i * 1000 for i in range(6)])
    loaded = parse_pose_file(text, 180, 320, source_aspect=320 / 180, max_frames=0, relative_to_first=False)
    assert loaded.timestamps_us == [i * 1000 for i in range(6)]
    assert torch.allclose(loaded.cameras.world_to_camera, rig.world_to_camera, atol=1e-12)
    assert torch.allclose(loaded.cameras.intrinsics, rig.intrinsics, atol=1e-9)


def test_wide_frames_are_scaled_to_cover_and_centre_cropped_like_cameractrl():
    text = "https://www.youtube.com/watch?v=x\n" + IDENTITY_LINE + "\n"
    cameras = parse_pose_file(text, 256, 256, source_aspect=16 / 9).cameras
    # CameraCtrl: the 16:9 frame is resized to height 256 (width 455.1), then centre-cropped to 256.
    resized_width = 256 * 16 / 9
    K = cameras.intrinsics[0]
    assert K[0, 0].item() == pytest.approx(0.5 * resized_width)
    assert K[1, 1].item() == pytest.approx(0.888 * 256)
    assert K[0, 2].item() == pytest.approx(0.5 * resized_width - (resized_width - 256) / 2)
    assert K[1, 2].item() == pytest.approx(128)
    # a tall output crops the sides instead: the 16:9 frame is scaled to height 512
    tall = parse_pose_file(text, 512, 256, source_aspect=16 / 9).cameras.intrinsics[0]
    assert tall[0, 0].item() == pytest.approx(0.5 * 512 * 16 / 9)
    assert tall[0, 2].item() == pytest.approx(128)


def test_frame_selection_and_relative_poses():
    rig = orbit_rig(10, height=64, width=64)
    text = format_pose_file(rig)
    picked = parse_pose_file(text, 64, 64, source_aspect=1.0, start_frame=1, frame_stride=3, max_frames=0, relative_to_first=False)
    assert torch.allclose(picked.cameras.world_to_camera, rig.world_to_camera[[1, 4, 7]], atol=1e-12)
    assert picked.source_line_numbers == [3, 6, 9]
    assert len(parse_pose_file(text, 64, 64, source_aspect=1.0, max_frames=4).cameras) == 4

    relative = parse_pose_file(text, 64, 64, source_aspect=1.0, max_frames=0, relative_to_first=True).cameras
    assert torch.allclose(relative.world_to_camera[0], torch.eye(4, dtype=torch.float64), atol=1e-12)
    for i, j in [(0, 3), (2, 7)]:  # the cameras keep their poses relative to each other
        assert torch.allclose(relative.relative_pose(i, j), rig.relative_pose(i, j), atol=1e-9)


SCALED = "0 0.5 0.9 0.5 0.5 0 0 2 0 0 0 0 2 0 0 0 0 2 0"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("https://example.com\n", "no camera lines"),
        ("url\n" + IDENTITY_LINE + "\n1 2 3\n", "line 3: expected 19 numbers"),
        ("url\n" + IDENTITY_LINE.replace("0.888", "abc") + "\n", "line 2: 'abc' is not a number"),
        ("url\n" + IDENTITY_LINE.replace("0.888", "nan") + "\n", "line 2: contains NaN"),
        ("url\n" + IDENTITY_LINE + "\n\n" + SCALED + "\n", "line 4: the camera has a rotation part that is not a rotation"),
        ("url\n" + IDENTITY_LINE.replace(" 0.5 0.888", " -0.5 0.888", 1) + "\n", "line 2: the camera has a focal length <= 0"),
    ],
)
def test_malformed_pose_files_name_the_line_and_the_reason(text, words):
    with pytest.raises(InvalidInput) as error:
        parse_pose_file(text, 64, 64)
    assert error.value.argument == "pose_file"
    assert words in error.value.problem


def test_bad_selection_and_sizes_are_refused():
    text = "url\n" + IDENTITY_LINE + "\n"
    with pytest.raises(InvalidInput, match="past the end"):
        parse_pose_file(text, 64, 64, start_frame=5)
    with pytest.raises(InvalidInput, match="stride"):
        parse_pose_file(text, 64, 64, frame_stride=0)
    with pytest.raises(InvalidInput, match="positive"):
        parse_pose_file(text, 0, 64)
    with pytest.raises(InvalidInput, match="source_aspect"):
        parse_pose_file(text, 64, 64, source_aspect=0.0)
