"""Camera nodes: orbit rigs and RealEstate10K / CameraCtrl trajectories."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..kernels.cameras import orbit_rig
from ..kernels.files import files_under
from ..kernels.pose_files import load_pose_file
from ..integration import host
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from .types import Cameras

MAX_SIZE = 8192
ORDER_INPUT_FIRST = "input view first"
LOAD_TRAJECTORY = "MV4D Load Camera Trajectory"
ORDER_SV3D = "SV3D: input view last (360 deg)"


class OrbitCameras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_OrbitCameras",
            display_name="MV4D Orbit Cameras",
            category="mv4d/cameras",
            description=(
                "Cameras evenly spaced on a circle around the object, all looking at its centre (world +Z up, "
                "OpenCV cameras, intrinsics in pixels). SV3D order puts the input view last at 360 degrees, as the "
                "official SV3D and Diffusion² code do."
            ),
            inputs=[
                io.Int.Input("views", default=21, min=1, max=256, tooltip="Number of cameras on the orbit (SV3D: 21)."),
                io.Float.Input("elevation", default=10.0, min=-89.9, max=89.9, step=0.1,
                               tooltip="Degrees above the horizontal plane (SV3D's default is 10). SV3D polar = 90 - elevation."),
                io.Float.Input("radius", default=2.0, min=0.01, max=1000.0, step=0.01,
                               tooltip="Distance from the object's centre, in scene units."),
                io.Float.Input("fov", default=33.8, min=1.0, max=179.0, step=0.1, tooltip="Vertical field of view in degrees."),
                io.Int.Input("width", default=576, min=8, max=MAX_SIZE, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=576, min=8, max=MAX_SIZE, step=8, tooltip="Image height in pixels."),
                io.Float.Input("start_azimuth", default=0.0, min=-360.0, max=360.0, step=0.1,
                               tooltip="Azimuth of the input view in degrees; azimuth turns counter-clockwise seen from above."),
                io.Combo.Input("order", options=[ORDER_SV3D, ORDER_INPUT_FIRST], default=ORDER_SV3D,
                               tooltip="Where the input view sits in the list. SV3D expects it last."),
                io.Float.Input("span", default=360.0, min=-3600.0, max=3600.0, step=1.0, optional=True,
                               tooltip="Degrees of azimuth the cameras cover (360: a full orbit; less: an arc, e.g. a camera "
                                       "path for CameraCtrl, one camera per frame; negative: clockwise)."),
            ],
            outputs=[Cameras.Output("cameras", tooltip="The camera rig.")],
        )

    @classmethod
    def execute(cls, views, elevation, radius, fov, width, height, start_azimuth, order, span=360.0) -> io.NodeOutput:
        check_numbers("MV4D Orbit Cameras", locals())
        if order not in (ORDER_SV3D, ORDER_INPUT_FIRST):
            raise input_error("MV4D Orbit Cameras", "order", f"unknown order {order!r}", f"choose {ORDER_SV3D!r} or {ORDER_INPUT_FIRST!r}")
        with kernel_errors_as_node_errors("MV4D Orbit Cameras", {"fov": "fov", "image_size": "width/height"}):
            rig = orbit_rig(views, elevation, radius, fov, height, width, start_azimuth, sv3d_order=order == ORDER_SV3D, span_deg=span)
        return io.NodeOutput(rig)


def resolve_pose_file(relative_path: str):
    return host.existing_file(folder_paths.get_input_directory(), relative_path, LOAD_TRAJECTORY, "pose_file", "the input folder",
                              "a .txt pose file")


class LoadCameraTrajectory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadCameraTrajectory",
            display_name=LOAD_TRAJECTORY,
            category="mv4d/cameras",
            description=(
                "Reads a RealEstate10K / CameraCtrl pose file (the format CVD uses) from ComfyUI's input folder: a URL "
                "line, then per frame 'timestamp fx fy cx cy k1 k2' and the 3x4 world-to-camera matrix. Frames are "
                "scaled to cover width x height and centre-cropped, as CameraCtrl does."
            ),
            inputs=[
                io.Combo.Input("pose_file", options=files_under(folder_paths.get_input_directory(), (".txt",)),
                               tooltip="A .txt pose file inside ComfyUI's input folder (subfolders allowed)."),
                io.Int.Input("width", default=256, min=8, max=MAX_SIZE, step=8, tooltip="Width of the generated frames."),
                io.Int.Input("height", default=256, min=8, max=MAX_SIZE, step=8, tooltip="Height of the generated frames."),
                io.Float.Input("source_aspect", default=1.7778, min=0.1, max=10.0, step=0.0001,
                               tooltip="Width / height of the video the poses were measured on (RealEstate10K: 16:9 = 1.7778)."),
                io.Int.Input("start_frame", default=0, min=0, max=100000, tooltip="First pose line to use (0 = the first)."),
                io.Int.Input("frame_stride", default=1, min=1, max=1000, tooltip="Use every n-th pose from the start frame."),
                io.Int.Input("max_frames", default=16, min=0, max=100000,
                             tooltip="Number of frames to keep (0 = all). CVD and CameraCtrl use 16."),
                io.Boolean.Input("relative_to_first", default=True,
                                 tooltip="Express all poses relative to the first kept camera, as CameraCtrl and CVD do."),
            ],
            outputs=[
                Cameras.Output("cameras", tooltip="One camera per kept frame."),
                io.Int.Output("frame_count", tooltip="Number of cameras loaded."),
            ],
        )

    @classmethod
    def validate_inputs(cls, pose_file):  # only pose_file: a **kwargs here would switch off ComfyUI's min/max checks
        try:
            resolve_pose_file(pose_file)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, pose_file, **_other_inputs):
        try:
            return host.fingerprint(resolve_pose_file(pose_file))
        except ValueError:
            return pose_file

    @classmethod
    def execute(cls, pose_file, width, height, source_aspect, start_frame, frame_stride, max_frames, relative_to_first) -> io.NodeOutput:
        check_numbers(LOAD_TRAJECTORY, locals())
        path = resolve_pose_file(pose_file)
        with kernel_errors_as_node_errors(LOAD_TRAJECTORY, {"size": "width/height", "frames": "start_frame/frame_stride/max_frames"}):
            trajectory = load_pose_file(path, height, width, source_aspect=source_aspect, start_frame=start_frame,
                                        frame_stride=frame_stride, max_frames=max_frames, relative_to_first=relative_to_first)
        return io.NodeOutput(trajectory.cameras, len(trajectory.cameras))
