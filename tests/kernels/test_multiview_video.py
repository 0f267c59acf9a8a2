import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.multiview_video import MultiviewVideo, even_times, from_image_batch, to_image_batch
from mv4d.kernels.synthetic_scene import example_multiview_video, render_scene


def test_image_batches_are_view_major_both_ways():
    rig = orbit_rig(3, height=8, width=8)
    batch = torch.arange(3 * 5, dtype=torch.float32)[:, None, None, None].expand(15, 8, 8, 3) / 15
    video = from_image_batch(batch, rig, frames=5)
    assert video.images.shape == (3, 5, 8, 8, 3)
    assert float(video.images[1, 2, 0, 0, 0]) == pytest.approx(7 / 15)  # view 1, frame 2 = index 1 * 5 + 2
    assert torch.equal(to_image_batch(video), batch)
    assert torch.allclose(video.times, even_times(5))


@pytest.mark.parametrize("make, argument, words", [
    (lambda rig: from_image_batch(torch.zeros(7, 8, 8, 3), rig, 2), "frames", "do not split"),
    (lambda rig: from_image_batch(torch.zeros(8, 8, 8, 3), rig, 2), "cameras", "3 cameras but the batch holds 4 views"),
    (lambda rig: MultiviewVideo(torch.zeros(3, 2, 8, 8, 3), rig, torch.tensor([0.5, 0.2])), "times", "increase"),
    (lambda rig: MultiviewVideo(torch.zeros(3, 0, 8, 8, 3), rig, torch.zeros(0)), "images", "empty"),
    (lambda rig: MultiviewVideo(torch.zeros(3, 2, 8, 8), rig, torch.tensor([0.0, 1.0])), "images", "views x frames"),
    (lambda rig: MultiviewVideo(torch.zeros(2, 2, 8, 8, 3), rig, torch.tensor([0.0, 1.0])), "cameras", "3 cameras for 2 views"),
])
def test_mismatched_images_cameras_and_times_are_refused(make, argument, words):
    with pytest.raises(InvalidInput) as error:
        make(orbit_rig(3, height=8, width=8))
    assert error.value.argument == argument and words in error.value.problem


def test_the_example_scene_moves_and_its_masks_match_its_pixels():
    rig = orbit_rig(2, height=24, width=24)
    images, masks = render_scene(rig, torch.tensor([0.0, 0.5, 1.0]), supersample=1)
    white = (images - 1).abs().amax(-1) < 1e-6
    assert torch.equal(masks == 0, white)  # background exactly where no object was hit
    assert (images[:, 0] - images[:, 2]).abs().amax() > 0.3  # objects moved
    perturbed = example_multiview_video(rig, 3, seed=1, supersample=1)
    difference = (perturbed.images - images).abs()
    assert 0 < float(difference.mean()) < 0.05  # small, generated-image-like inconsistencies
    assert torch.equal(perturbed.images, example_multiview_video(rig, 3, seed=1, supersample=1).images)
