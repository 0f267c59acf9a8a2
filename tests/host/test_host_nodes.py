"""Our nodes inside a real ComfyUI process: registration, schemas, execution and error messages."""

import asyncio

import pytest
import torch

from mv4d_host_helpers import run_node

EXPECTED_NODES = {
    "MV4D_OrbitCameras": "MV4D Orbit Cameras",
    "MV4D_LoadCameraTrajectory": "MV4D Load Camera Trajectory",
    "MV4D_EpipolarMask": "MV4D Epipolar Mask",
    "MV4D_PreviewEpipolarMask": "MV4D Preview Epipolar Mask",
    "MV4D_LoadMultiviewImages": "MV4D Load Multiview Images",
    "MV4D_ImagesToMultiviewVideo": "MV4D Images To Multiview Video",
    "MV4D_MultiviewVideoToImages": "MV4D Multiview Video To Images",
    "MV4D_ExampleScene": "MV4D Example Scene",
    "MV4D_LoadMultiviewModel": "MV4D Load Multi-view Model",
    "MV4D_MultiviewConditioning": "MV4D Multi-view Conditioning",
    "MV4D_ImageDreamConditioning": "MV4D ImageDream Conditioning",
    "MV4D_LoadMotionModule": "MV4D Load Motion Module",
    "MV4D_ApplyMotionModule": "MV4D Apply Motion Module",
    "MV4D_LoadCameraCtrl": "MV4D Load CameraCtrl",
    "MV4D_ApplyCameraControl": "MV4D Apply Camera Control",
    "MV4D_LoadAlignmentAdapters": "MV4D Load Alignment Adapters",
    "MV4D_ApplyAlignmentAdapters": "MV4D Apply Alignment Adapters",
    "MV4D_TrainAlignmentAdapters": "MV4D Train Alignment Adapters",
    "MV4D_MakeDemoTrainingSet": "MV4D Make Demo Training Set",
    "MV4D_LoadCVDModule": "MV4D Load CVD Module",
    "MV4D_ApplyCVD": "MV4D Apply CVD",
    "MV4D_Load4DM": "MV4D Load 4DM",
    "MV4D_4DMConditioning": "MV4D 4DM Conditioning",
    "MV4D_Refine4DWithSDS": "MV4D Refine 4D with SDS",
    "MV4D_SV3DConditioning": "MV4D SV3D Conditioning",
    "MV4D_GridConditioning": "MV4D Grid Conditioning",
    "MV4D_PromptGridConditioning": "MV4D Prompt Grid Conditioning",
    "MV4D_ReferenceRowLatent": "MV4D Reference Row Latent",
    "MV4D_ComposedGuider": "MV4D Composed Guider",
    "MV4D_RollbackEuler": "MV4D Rollback Euler",
    "MV4D_DecodeGrid": "MV4D Decode Grid",
    "MV4D_FP8Matmuls": "MV4D FP8 Matmuls",
    "MV4D_FuseElementwise": "MV4D Fuse Elementwise",
    "MV4D_CompileAndKeep": "MV4D Compile and Keep",
    "MV4D_3DAwareDenoising": "MV4D 3D-Aware Denoising",
    "MV4D_3DAwareReconstruction": "MV4D 3D-Aware Reconstruction",
    "MV4D_Fit4DGaussians": "MV4D Fit 4D Gaussians",
    "MV4D_Render4D": "MV4D Render 4D",
    "MV4D_Save4D": "MV4D Save 4D",
    "MV4D_Load4D": "MV4D Load 4D",
    "MV4D_Preview4D": "MV4D Preview 4D",
}


def test_comfy_entrypoint_registers_every_node_with_a_complete_schema(mv4d_nodes):
    import mv4d

    extension = asyncio.run(mv4d.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    schemas = {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in nodes}
    assert {node_id: schema.display_name for node_id, schema in schemas.items()} == EXPECTED_NODES
    for node_id, schema in schemas.items():
        assert schema.category.startswith("mv4d/"), node_id
        assert len(schema.description) > 40, node_id
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"
        for item in schema.outputs:
            assert item.tooltip, f"{node_id} output {item.id} has no tooltip"
        # ComfyUI 0.3.64 refuses a schema whose input and output ids meet, and registers none of the nodes after it
        assert not {item.id for item in schema.inputs} & {item.id for item in schema.outputs}, node_id
    for node in nodes:
        info = node.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["category"].startswith("mv4d/")


def test_orbit_to_mask_to_preview(mv4d_nodes):
    rig = run_node(mv4d_nodes.OrbitCameras, views=21, elevation=10.0, radius=2.0, fov=33.8, width=576, height=576,
                   start_azimuth=0.0, order="SV3D: input view last (360 deg)").args[0]
    assert len(rig) == 21 and (rig.height, rig.width) == (576, 576)
    mask = run_node(mv4d_nodes.EpipolarMask, cameras=rig, latent_width=72, latent_height=72, mode="hard", tau=3.0,
                    reference_resolution=256, band_fraction=0.0234, decay=3.0, slope_seed=0).args[0]
    assert mask.num_pairs == 21 * 20 and mask.query_size == (72, 72) and mask.reference_size == (256, 256)
    result = run_node(mv4d_nodes.PreviewEpipolarMask, epipolar_mask=mask, source_view=20, target_view=2, queries=4,
                      query_seed=0, panel_height=128)
    picture, summary = result.args
    assert picture.shape == (1, 128, 2 * 128 + 8, 3) and picture.dtype == torch.float32
    assert "views 20 -> 2: hard epipolar mask, density" in summary
    saved = result.ui.as_dict()["images"]
    assert saved and saved[0]["type"] == "temp"


def test_preview_overlays_given_images(mv4d_nodes):
    rig = run_node(mv4d_nodes.OrbitCameras, views=3, elevation=10.0, radius=2.0, fov=33.8, width=64, height=64,
                   start_azimuth=0.0, order="input view first").args[0]
    mask = run_node(mv4d_nodes.EpipolarMask, cameras=rig, latent_width=8, latent_height=8, mode="soft", tau=3.0,
                    reference_resolution=0, band_fraction=0.0234, decay=3.0, slope_seed=0).args[0]
    images = torch.zeros(3, 64, 64, 3)
    images[2, ..., 1] = 1.0
    picture = run_node(mv4d_nodes.PreviewEpipolarMask, epipolar_mask=mask, source_view=0, target_view=2, queries=2,
                       query_seed=1, panel_height=64, images=images).args[0]
    assert picture[0, :, 72:, 1].mean() > 0.3  # the green target view shows under the masks


POSE_LINE = "{stamp} 0.5 0.888 0.5 0.5 0 0 1 0 0 {x} 0 1 0 0 0 0 1 0"


def write_pose_file(folder, name, frames=5):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["https://www.youtube.com/watch?v=test"] + [POSE_LINE.format(stamp=i * 33366, x=-0.1 * i) for i in range(frames)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_camera_trajectory_from_the_input_folder(comfy, mv4d_nodes):
    input_dir = comfy.get_input_directory()
    from pathlib import Path

    write_pose_file(Path(input_dir) / "cameras", "sideways.txt", frames=6)
    node = mv4d_nodes.LoadCameraTrajectory
    options = node.GET_SCHEMA().inputs[0].options
    assert "cameras/sideways.txt" in options
    assert node.validate_inputs(pose_file="cameras/sideways.txt") is True
    rig, count = run_node(node, pose_file="cameras/sideways.txt", width=256, height=256, source_aspect=16 / 9,
                          start_frame=0, frame_stride=2, max_frames=0, relative_to_first=True).args
    assert count == 3 and len(rig) == 3
    assert torch.allclose(rig.centers[:, 0], torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64), atol=1e-9)
    # a trajectory of a sideways-moving camera gives real (not pseudo) epipolar masks between its frames
    mask = run_node(mv4d_nodes.EpipolarMask, cameras=rig, latent_width=32, latent_height=32, mode="hard", tau=3.0,
                    reference_resolution=256, band_fraction=0.0234, decay=3.0, slope_seed=0).args[0]
    assert not mask.pseudo.any()
    before = node.fingerprint_inputs(pose_file="cameras/sideways.txt", width=256)
    write_pose_file(Path(input_dir) / "cameras", "sideways.txt", frames=7)
    assert node.fingerprint_inputs(pose_file="cameras/sideways.txt", width=256) != before  # edits re-run the node
    assert "outside the input folder" in node.validate_inputs(pose_file="../secret.txt")
    assert "does not exist" in node.validate_inputs(pose_file="cameras/missing.txt")


def orbit(mv4d_nodes, views):
    return run_node(mv4d_nodes.OrbitCameras, views=views, elevation=10.0, radius=2.0, fov=33.8, width=256, height=256,
                    start_azimuth=0.0, order="input view first").args[0]


def test_errors_name_the_node_the_input_and_the_fix(comfy, mv4d_nodes):
    from mv4d.integration.node_errors import NodeInputError
    from pathlib import Path

    mask_inputs = dict(latent_width=32, latent_height=32, mode="hard", tau=3.0, reference_resolution=256,
                       band_fraction=0.0234, decay=3.0, slope_seed=0)
    with pytest.raises(NodeInputError, match=r"MV4D Epipolar Mask: input 'cameras': an epipolar mask needs at least 2 views, got 1\. Fix: "):
        run_node(mv4d_nodes.EpipolarMask, cameras=orbit(mv4d_nodes, 1), **mask_inputs)
    with pytest.raises(NodeInputError, match=r"MV4D Epipolar Mask: input 'latent_width/latent_height': must be a positive"):
        run_node(mv4d_nodes.EpipolarMask, cameras=orbit(mv4d_nodes, 2), **(mask_inputs | {"latent_width": 0}))
    with pytest.raises(NodeInputError, match=r"MV4D Orbit Cameras: input 'elevation'"):
        run_node(mv4d_nodes.OrbitCameras, views=4, elevation=90.0, radius=2.0, fov=33.8, width=64, height=64,
                 start_azimuth=0.0, order="input view first")

    mask = run_node(mv4d_nodes.EpipolarMask, cameras=orbit(mv4d_nodes, 3), **mask_inputs).args[0]
    preview = dict(epipolar_mask=mask, source_view=1, target_view=1, queries=2, query_seed=0, panel_height=64)
    with pytest.raises(NodeInputError, match=r"MV4D Preview Epipolar Mask: input 'target_view': source_view equals target_view\. Fix: pick two different views in 0\.\.2"):
        run_node(mv4d_nodes.PreviewEpipolarMask, **preview)
    with pytest.raises(NodeInputError, match=r"input 'target_view': view 5 does not exist in this 3-view mask\. Fix: pick a view in 0\.\.2"):
        run_node(mv4d_nodes.PreviewEpipolarMask, **(preview | {"source_view": 0, "target_view": 5}))
    # issue 12, item 16: a source view out of range was blamed on target_view
    with pytest.raises(NodeInputError, match=r"input 'source_view': view 7 does not exist in this 3-view mask"):
        run_node(mv4d_nodes.PreviewEpipolarMask, **(preview | {"source_view": 7, "target_view": 0}))
    with pytest.raises(NodeInputError, match=r"input 'images': 2 images, but view 2 was asked for"):
        run_node(mv4d_nodes.PreviewEpipolarMask, **(preview | {"target_view": 2, "images": torch.zeros(2, 8, 8, 3)}))

    binary = Path(comfy.get_input_directory()) / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(NodeInputError, match=r"MV4D Load Camera Trajectory: input 'pose_file': binary.txt: is not UTF-8 text \(byte 0 is 0x80\)\. Fix: use a plain-text"):
        run_node(mv4d_nodes.LoadCameraTrajectory, pose_file="binary.txt", width=64, height=64, source_aspect=1.0,
                 start_frame=0, frame_stride=1, max_frames=0, relative_to_first=True)

    bad = Path(comfy.get_input_directory()) / "broken.txt"
    bad.write_text("url\n" + POSE_LINE.format(stamp=0, x=0) + "\n0 0.5 0.5\n")
    with pytest.raises(NodeInputError, match=r"MV4D Load Camera Trajectory: input 'pose_file': broken.txt: line 3: expected 19 numbers"):
        run_node(mv4d_nodes.LoadCameraTrajectory, pose_file="broken.txt", width=64, height=64, source_aspect=1.0,
                 start_frame=0, frame_stride=1, max_frames=0, relative_to_first=True)
