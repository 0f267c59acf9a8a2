"""One composition job spread over several devices through ComfyUI's MultiGPU work units, on CPU devices faked
as GPUs (cpu, cpu:1, cpu:2 are distinct device keys whose tensors all live in main memory): each role's videos /
multi-view sets are split over the model's clones, each clone runs its share in ComfyUI's thread pool, and the
grid equals the one-device grid. Needs ComfyUI 0.29+ (comfy.multigpu)."""

from __future__ import annotations

import threading

import pytest
import torch

from mv4d_tiny_models import svd_family_unet
from test_host_composition import cameras, grid_conditioning, grid_noise, models, references, sample  # noqa: F401

TOLERANCE = 1e-5
FAKE_DEVICES = [torch.device("cpu"), torch.device("cpu", 1), torch.device("cpu", 2)]


@pytest.fixture
def multigpu(comfy, monkeypatch):
    try:
        import comfy.multigpu
    except ImportError:
        pytest.skip("this ComfyUI has no MultiGPU work units (comfy.multigpu, ComfyUI 0.29+): the guider runs on one device")
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices", lambda exclude_current=False: list(FAKE_DEVICES))
    return comfy.multigpu


def on_three_devices(multigpu, kind: str, seed: int):
    """A tiny model with clones on the two other fake devices, as ComfyUI's MultiGPU CFG Split node makes them
    (the loader factory that deepclone_multigpu calls rebuilds the same weights)."""
    patcher = svd_family_unet(kind, seed)
    patcher.cached_patcher_init = (svd_family_unet, (kind, seed))
    return multigpu.create_multigpu_deepclones(patcher, max_gpus=3)


def record_calls(monkeypatch) -> list:
    """(BaseModel, batch, thread) of every batch of UNet work."""
    import comfy.samplers

    calls, original = [], comfy.samplers.calc_cond_batch

    def recorded(model, conds, x, *args, **kwargs):
        calls.append((model, x.shape[0], threading.current_thread().name))
        return original(model, conds, x, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", recorded)
    return calls


def test_the_grid_over_three_devices_equals_the_one_device_grid(mv4d_nodes, models, cameras, references, multigpu, monkeypatch):  # noqa: F811
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    one_device = sample(ComposedGuider(svd_family_unet("svd", 0), svd_family_unet("sv3d_p", 1), conditioning, GuiderSettings()),
                        grid_noise(), latent)
    video, multiview = on_three_devices(multigpu, "svd", 0), on_three_devices(multigpu, "sv3d_p", 1)
    assert {clone.load_device for clone in video.get_additional_models_with_key("multigpu")} == set(FAKE_DEVICES[1:])
    calls = record_calls(monkeypatch)
    spread = sample(ComposedGuider(video, multiview, conditioning, GuiderSettings()), grid_noise(), latent)
    difference = float((spread - one_device).abs().max() / one_device.abs().max())
    print(f"\n3 fake devices vs 1: relative difference {difference:.2e}")
    assert difference <= TOLERANCE
    # every model copy ran a share, from the thread pool's workers, and each evaluation covered every group once
    by_model = {}
    for model, batch, thread in calls:
        by_model.setdefault(id(model), []).append((batch, thread))
    assert len(by_model) == 6  # SVD and SV3D on each of the three devices
    assert any(thread != threading.main_thread().name for model_calls in by_model.values() for _, thread in model_calls)
    from test_host_composition import FRAMES, STEPS, VIEWS

    items = sum(batch for _, batch, _ in calls)
    assert items == 2 * STEPS * VIEWS * FRAMES  # two roles, every cell once (cond and uncond in one call), every step


def test_shares_follow_the_devices_relative_speeds(multigpu):
    from mv4d.integration.multi_gpu import DeviceRun, shares

    runs = [DeviceRun(device, object(), {}, {}, speed) for device, speed in zip(FAKE_DEVICES, (2.0, 1.0, 1.0))]
    assert shares(list(range(8)), runs) == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert sum(shares(list(range(7)), runs), []) == list(range(7))  # every group once, in order


def test_cancel_in_a_device_worker_stops_the_sampling(mv4d_nodes, models, cameras, references, multigpu, monkeypatch):  # noqa: F811
    import comfy.model_management
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    video, multiview = on_three_devices(multigpu, "svd", 0), on_three_devices(multigpu, "sv3d_p", 1)
    original = comfy.model_management.throw_exception_if_processing_interrupted

    def cancelled_in_workers():
        if threading.current_thread() is not threading.main_thread():
            raise comfy.model_management.InterruptProcessingException()
        original()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", cancelled_in_workers)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(ComposedGuider(video, multiview, conditioning, GuiderSettings()), grid_noise(), latent)
