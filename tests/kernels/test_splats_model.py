import math

import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.splats.init import initial_gaussians, scene_sphere
from mv4d.kernels.splats.model import MotionConfig, new_gaussians, parameter_shapes
from mv4d.kernels.synthetic_scene import example_multiview_video, render_scene


def test_the_hot_path_frame_equals_the_batched_evaluation():
    generator = torch.Generator().manual_seed(0)
    config = MotionConfig(position_degree=3, fourier_terms=2, rotation_degree=2, temporal_opacity=True, sh_degree=1)
    gaussians = new_gaussians(torch.randn(30, 3, generator=generator), torch.rand(30, 3, generator=generator), torch.full((30,), 0.02), config)
    for name, value in gaussians.params.items():
        gaussians.params[name] = value + 0.1 * torch.randn(value.shape, generator=generator)
    times = torch.tensor([0.0, 0.25, 0.9])
    basis = gaussians.time_basis(times)
    for index, time in enumerate(times.tolist()):
        frame = gaussians.frame_at(basis, index)
        assert torch.allclose(frame.means, gaussians.positions(times)[index], atol=1e-6)
        assert torch.allclose(frame.quats, gaussians.rotations(times)[index], atol=1e-6)
        assert torch.allclose(frame.opacities, gaussians.opacities(times)[index], atol=1e-6)
        assert torch.allclose(gaussians.frame(time).means, frame.means, atol=1e-6)
    # the Fourier terms are periodic over the clip, the polynomial is in tau = 2t - 1
    only_fourier = torch.zeros_like(gaussians.params["position_motion"])
    only_fourier[:, 3:] = gaussians.params["position_motion"][:, 3:]
    gaussians.params["position_motion"] = only_fourier
    assert torch.allclose(gaussians.positions(torch.tensor([0.0])), gaussians.positions(torch.tensor([1.0])), atol=1e-5)


def test_a_static_config_has_no_motion_parameters_and_does_not_move():
    config = MotionConfig.static(sh_degree=0)
    assert config.is_static and set(parameter_shapes(config)) == {"means", "quats", "scales", "opacities", "sh0"}
    gaussians = new_gaussians(torch.zeros(5, 3), torch.rand(5, 3), torch.full((5,), 0.1), config)
    positions = gaussians.positions(torch.linspace(0, 1, 4))
    assert torch.equal(positions[0], positions[-1])


@pytest.mark.parametrize("field, value", [("position_degree", 7), ("fourier_terms", -1), ("rotation_degree", 4), ("sh_degree", 4)])
def test_motion_settings_out_of_range_are_refused(field, value):
    with pytest.raises(InvalidInput, match=field):
        MotionConfig(**{field: value})


def test_initialisation_finds_the_object_and_carves_to_it():
    rig = orbit_rig(8, elevation_deg=15.0, height=48, width=48)
    centre, radius = scene_sphere(rig)
    assert centre.abs().max() < 1e-6 and radius == pytest.approx(2.0 * math.tan(math.radians(33.8 / 2)), rel=1e-4)
    video = example_multiview_video(rig, 3, perturbation=0.0, supersample=1)
    gaussians = initial_gaussians(video, 400, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0), time_window=0.1)
    assert gaussians.count == 400
    # carved points project onto the objects, not the white background, in (nearly) every view
    _, masks = render_scene(rig, video.times, supersample=1)
    pixels, _ = rig.project(gaussians.params["means"].double())
    frames = ((gaussians.params["opacity_center"] * 2).round().long()).clamp(0, 2)  # the frame each point was carved at
    rows, cols = pixels[..., 1].long().clamp(0, 47), pixels[..., 0].long().clamp(0, 47)
    on_object = masks[torch.arange(8)[:, None], frames[None], rows, cols] > 0
    assert on_object.float().mean() > 0.9
