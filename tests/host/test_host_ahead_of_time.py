"""MV4D Compile Ahead of Time: UNet calls as AOTInductor programs kept on disk, on tiny SVD / SV3D models (CPU).

Properties: a program gives the UNet's prediction; a second "process" (a new wrapper over the same folder) loads
the package instead of building it, also for another checkpoint of the same architecture (weights are bound, not
packaged) and after a weight patch; calls the rules refuse run the UNet as before and build nothing; a failed
build leaves no file and the call still returns the eager prediction; the composed grid is the same with programs.
Each build compiles C++ on this machine (tens of seconds on two cores), so the tests share the builds they need.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import svd_family_unet
from test_host_composition import cameras, composed_guider, grid_conditioning, grid_noise, models, references, sample  # noqa: F401
from test_host_exact_savings import svd_inputs

TOLERANCE = 1e-5  # float32: inductor's fused kernels reorder sums


def unet_call(patcher, x: torch.Tensor, context: torch.Tensor, **conds) -> torch.Tensor:
    """One denoising call as sampling makes it: object and weight patches applied, and the patcher's
    transformer_options (attention patches) and wrappers handed to the UNet."""
    options = dict(patcher.model_options.get("transformer_options", {}), wrappers=patcher.wrappers)
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.full((x.shape[0],), 3.0), c_crossattn=context,
                                             transformer_options=options, **conds)
    finally:
        patcher.unpatch_model()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def aot(comfy):
    import mv4d.integration.patches.ahead_of_time as aot

    return aot


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled_unets")


def compiled(aot, model, folder, min_images=1, max_programs=4):
    return aot.with_ahead_of_time_programs(model, min_images=min_images, max_programs=max_programs, folder=folder)


@pytest.fixture
def no_builds(aot, monkeypatch):
    """From here on a build fails the test: what follows must come from memory or disk, or run uncompiled."""
    def refuse(*args, **kwargs):
        raise AssertionError("a program was built")

    monkeypatch.setattr(aot.AheadOfTimeUNet, "build", refuse)


@pytest.fixture(scope="module")
def first_build(aot, folder):
    """One tiny SVD call (one video of 3 frames) through a fresh folder: the build every later test reuses."""
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    program = unet_call(compiled(aot, model, folder), x, context, **conds)
    return eager, program


def test_a_program_gives_the_unets_prediction_and_leaves_one_package(first_build, folder):
    eager, program = first_build
    print(f"\nahead-of-time program, tiny SVD: relative difference {relative(program, eager):.2e}")
    assert relative(program, eager) <= TOLERANCE
    assert [path.suffix for path in folder.iterdir()] == [".pt2"]  # no partial file beside it


def test_a_new_process_loads_the_package_for_another_checkpoint_of_the_same_architecture(aot, folder, first_build, no_builds):
    other = svd_family_unet("svd", seed=5)  # other weights, same layout
    x, context, conds = svd_inputs(seed=1)
    wrapped = compiled(aot, other, folder)
    program = unet_call(wrapped, x, context, **conds)
    eager = unet_call(other, x, context, **conds)
    assert relative(program, eager) <= TOLERANCE
    assert relative(eager, first_build[0]) > 0.1  # really another model's prediction
    assert len(aot.programs_of(wrapped)[0].programs) == 1


def test_a_weight_patch_reaches_the_program(aot, folder, first_build, no_builds):
    model = svd_family_unet("svd", seed=0)
    key = "diffusion_model.input_blocks.0.0.weight"
    weight = model.model.state_dict()[key]
    for patched in (model, compiled(aot, model, folder)):
        patched.add_patches({key: (0.5 * torch.ones_like(weight),)}, strength_patch=1.0)
    plain_patched, compiled_patched = model, compiled(aot, model, folder)
    x, context, conds = svd_inputs()
    eager = unet_call(plain_patched, x, context, **conds)
    program = unet_call(compiled_patched, x, context, **conds)
    assert relative(program, eager) <= TOLERANCE
    assert relative(eager, first_build[0]) > 1e-3  # the patch changed the prediction


def test_calls_the_rules_refuse_run_the_unet_as_before(aot, folder, first_build, no_builds, caplog):
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()

    def doubled_attention(q, k, v, extra_options):  # an attention patch: Python the program would freeze
        import comfy.ldm.modules.attention as attention

        return 2.0 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    patched.set_model_attn1_replace(doubled_attention, "input", 1)
    with caplog.at_level(logging.INFO):
        eager = unet_call(patched, x, context, **conds)
        program = unet_call(compiled(aot, patched, folder), x, context, **conds)
        small = unet_call(compiled(aot, model, folder, min_images=4), x, context, **conds)
    assert torch.equal(program, eager)
    assert torch.equal(small, first_build[0])
    assert "patches_replace" in caplog.text and "fewer than min_images 4" in caplog.text
    assert len(list(folder.iterdir())) == 1


def test_a_failed_build_leaves_nothing_and_the_call_runs_uncompiled(aot, tmp_path, monkeypatch, caplog):
    import mv4d.kernels.ahead_of_time as kernels

    def broken_compiler(exported, package_path, **kwargs):
        open(package_path, "w").write("half a package")
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels.torch._inductor, "aoti_compile_and_package", broken_compiler)
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    wrapped = compiled(aot, model, tmp_path)
    with caplog.at_level(logging.WARNING):
        first = unet_call(wrapped, x, context, **conds)
        second = unet_call(wrapped, x, context, **conds)  # remembered: no second attempt
    assert torch.equal(first, unet_call(model, x, context, **conds)) and torch.equal(first, second)
    assert caplog.text.count("no C++ compiler") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_composed_grid_is_the_same_with_programs(aot, mv4d_nodes, models, cameras, references, folder):  # noqa: F811
    """Both models compiled: one call per model and evaluation (4 videos, 3 sets), two programs built."""
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    grids = []
    for wrap in (lambda m: m, lambda m: compiled(aot, m, folder)):
        guider = composed_guider(mv4d_nodes, models, conditioning, video_model=wrap(models["svd"][0]),
                                 multiview_model=wrap(models["sv3d_p"][0]), videos_per_call=4, multiview_sets_per_call=3)
        grids.append(sample(guider, grid_noise(), latent))
    print(f"\ncomposed grid with programs: relative difference {relative(grids[1], grids[0]):.2e}")
    assert relative(grids[1], grids[0]) <= 1e-4  # four steps of float32 differences
    assert len(list(folder.glob("*.pt2"))) == 3  # the first test's and one per model here


def test_the_node_keeps_programs_in_comfyuis_user_folder(aot, mv4d_nodes, models):  # noqa: F811
    import folder_paths

    wrapped = run_node(mv4d_nodes.CompileAheadOfTimeNode, model=models["svd"][0], min_images=64, max_programs=2).result[0]
    (wrapper,) = aot.programs_of(wrapped)
    assert wrapper.store.directory.is_relative_to(folder_paths.get_user_directory())
    assert wrapper.max_programs == 2 and not aot.programs_of(models["svd"][0])  # the loader's model is untouched
