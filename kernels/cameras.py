"""Camera rigs: the one camera type of mv4d, and its converters to what each model or method expects.

Conventions (every kernel and node follows them):

- Extrinsics are OpenCV world-to-camera rigid transforms: camera x points right, y down, z forward.
- Intrinsics are 3x3 matrices in pixels of the rig's image size, with continuous pixel coordinates: the image
  covers [0, width] x [0, height] and the pixel in column i, row j has its centre at (i + 0.5, j + 0.5). With this
  convention resizing an image scales the intrinsics exactly, and a feature-map cell of any UNet level has a
  well-defined centre.
- Orbit rigs live in a right-handed world with +Z up and the object at the origin. A camera at azimuth `a` and
  elevation `e` sits at radius * (cos e cos a, cos e sin a, sin e): azimuth turns counter-clockwise seen from
  above, elevation is the angle above the XY plane. SV3D's polar angle is 90 - elevation.

Geometry is kept in float64: rigs are small, and fundamental matrices and reprojections in pixel units are then
exact to far below a pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from kornia.geometry.epipolar import essential_from_Rt, fundamental_from_essential
from kornia.geometry.linalg import inverse_transformation, transform_points
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

from .errors import InvalidInput

GEOMETRY_DTYPE = torch.float64
_RIGID_TOLERANCE = 1e-4  # |R R^T - I| allowed in a rotation read from a file (6-digit text is common)


@dataclass(frozen=True)
class CameraProblem:
    """The first camera of a set whose matrices are unusable, and why."""

    camera: int
    argument: str  # "world_to_camera" or "intrinsics"
    problem: str
    fix: str


def find_camera_problem(world_to_camera: torch.Tensor, intrinsics: torch.Tensor) -> CameraProblem | None:
    """Check (N, 4, 4) OpenCV world-to-camera transforms and (N, 3, 3) pixel intrinsics; None when all are usable."""
    rigid_fix = "pass rigid OpenCV world-to-camera transforms (no scale, no reflection)"
    bad = ~torch.isfinite(world_to_camera).flatten(1).all(1)
    if bad.any():
        return CameraProblem(int(bad.nonzero()[0]), "world_to_camera", "has NaN or infinite entries", rigid_fix)
    expected_bottom = torch.tensor([0, 0, 0, 1], dtype=world_to_camera.dtype)
    bad = (world_to_camera[:, 3, :] - expected_bottom).abs().amax(dim=1) > 1e-9
    if bad.any():
        return CameraProblem(int(bad.nonzero()[0]), "world_to_camera", "has a last row other than [0, 0, 0, 1]", rigid_fix)
    rotation = world_to_camera[:, :3, :3]
    error = (rotation @ rotation.transpose(1, 2) - torch.eye(3, dtype=rotation.dtype)).abs().flatten(1).amax(dim=1)
    determinant = torch.linalg.det(rotation)
    bad = (error > _RIGID_TOLERANCE) | (determinant < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        problem = f"has a rotation part that is not a rotation (|R R^T - I| = {float(error[i]):.2g}, det = {float(determinant[i]):.3g})"
        return CameraProblem(i, "world_to_camera", problem, rigid_fix)

    intrinsics_fix = "pass pinhole intrinsics [[fx, s, cx], [0, fy, cy], [0, 0, 1]] in pixels with positive focal lengths"
    bad = ~torch.isfinite(intrinsics).flatten(1).all(1)
    if bad.any():
        return CameraProblem(int(bad.nonzero()[0]), "intrinsics", "has NaN or infinite intrinsics", intrinsics_fix)
    bad = (intrinsics[:, 0, 0] <= 0) | (intrinsics[:, 1, 1] <= 0)
    if bad.any():
        return CameraProblem(int(bad.nonzero()[0]), "intrinsics", "has a focal length <= 0", intrinsics_fix)
    structure = torch.stack([intrinsics[:, 1, 0], intrinsics[:, 2, 0], intrinsics[:, 2, 1], intrinsics[:, 2, 2] - 1], 1)
    bad = (structure.abs() > 1e-9).any(1)
    if bad.any():
        return CameraProblem(int(bad.nonzero()[0]), "intrinsics", "is not an upper-triangular pinhole matrix", intrinsics_fix)
    return None


@dataclass(frozen=True, eq=False)
class CameraRig:
    """N pinhole cameras sharing one image size.

    world_to_camera: (N, 4, 4) OpenCV extrinsics. intrinsics: (N, 3, 3) in pixels of (height, width).
    A rig is either the views of a multi-view set or the frames of a camera trajectory; nothing here cares which.
    """

    world_to_camera: torch.Tensor
    intrinsics: torch.Tensor
    height: int
    width: int

    def __post_init__(self):
        if int(self.height) <= 0 or int(self.width) <= 0 or self.height != int(self.height) or self.width != int(self.width):
            raise InvalidInput(
                "image_size", f"height and width must be positive whole pixels, got {self.height} x {self.width}",
                "give the size of the images the intrinsics refer to",
            )
        world_to_camera = torch.as_tensor(self.world_to_camera).detach().to("cpu", GEOMETRY_DTYPE)
        intrinsics = torch.as_tensor(self.intrinsics).detach().to("cpu", GEOMETRY_DTYPE)
        if world_to_camera.ndim == 2:
            world_to_camera = world_to_camera[None]
        if intrinsics.ndim == 2:
            intrinsics = intrinsics[None]
        if world_to_camera.ndim != 3 or world_to_camera.shape[1:] not in ((3, 4), (4, 4)) or len(world_to_camera) == 0:
            raise InvalidInput(
                "world_to_camera", f"expected N x 4 x 4 (or N x 3 x 4) matrices with N >= 1, got shape {tuple(world_to_camera.shape)}",
                "pass one OpenCV world-to-camera matrix per camera",
            )
        if world_to_camera.shape[1] == 3:
            bottom = torch.tensor([0, 0, 0, 1], dtype=GEOMETRY_DTYPE).expand(len(world_to_camera), 1, 4)
            world_to_camera = torch.cat([world_to_camera, bottom], dim=1)
        if intrinsics.ndim != 3 or intrinsics.shape[1:] != (3, 3):
            raise InvalidInput(
                "intrinsics", f"expected N x 3 x 3 matrices, got shape {tuple(intrinsics.shape)}",
                "pass one pixel intrinsic matrix per camera",
            )
        if len(intrinsics) == 1 and len(world_to_camera) > 1:
            intrinsics = intrinsics.expand(len(world_to_camera), 3, 3).clone()
        if len(intrinsics) != len(world_to_camera):
            raise InvalidInput(
                "intrinsics", f"{len(intrinsics)} intrinsic matrices for {len(world_to_camera)} cameras",
                "pass one intrinsic matrix per camera, or a single one shared by all",
            )
        problem = find_camera_problem(world_to_camera, intrinsics)
        if problem:
            raise InvalidInput(problem.argument, f"camera {problem.camera} {problem.problem}", problem.fix)
        object.__setattr__(self, "world_to_camera", world_to_camera)
        object.__setattr__(self, "intrinsics", intrinsics)
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))

    def __len__(self) -> int:
        return len(self.world_to_camera)

    def __repr__(self) -> str:
        return f"CameraRig({len(self)} cameras, {self.width}x{self.height} px)"

    @property
    def rotations(self) -> torch.Tensor:
        return self.world_to_camera[:, :3, :3]

    @property
    def translations(self) -> torch.Tensor:
        return self.world_to_camera[:, :3, 3]

    @property
    def camera_to_world(self) -> torch.Tensor:
        return inverse_transformation(self.world_to_camera)

    @property
    def centers(self) -> torch.Tensor:
        """(N, 3) camera centres in world coordinates."""
        return self.camera_to_world[:, :3, 3]

    def select(self, indices: Sequence[int] | torch.Tensor) -> CameraRig:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return CameraRig(self.world_to_camera[indices], self.intrinsics[indices], self.height, self.width)

    def resized(self, height: int, width: int) -> CameraRig:
        """The same cameras for images resized (not cropped) to height x width."""
        if height <= 0 or width <= 0:
            raise InvalidInput("size", f"height and width must be positive, got {height} x {width}", "pass a positive size")
        scale = torch.tensor([width / self.width, height / self.height, 1.0], dtype=GEOMETRY_DTYPE)
        return CameraRig(self.world_to_camera, self.intrinsics * scale[None, :, None], height, width)

    def relative_to_camera(self, index: int = 0) -> CameraRig:
        """The same rig in the coordinates of camera `index`, which becomes the identity (CameraCtrl's relative poses)."""
        return CameraRig(self.world_to_camera @ self.camera_to_world[index], self.intrinsics, self.height, self.width)

    def projection_matrices(self) -> torch.Tensor:
        """(N, 3, 4) pixel projection matrices K [R | t]."""
        return self.intrinsics @ self.world_to_camera[:, :3, :]

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points (P, 3) into every camera: pixels (N, P, 2) and depths (N, P) along the optical axis."""
        points = torch.as_tensor(points, dtype=GEOMETRY_DTYPE).reshape(1, -1, 3)
        camera_points = transform_points(self.world_to_camera, points.expand(len(self), -1, -1))
        depth = camera_points[..., 2]
        pixels_h = camera_points @ self.intrinsics.transpose(1, 2)
        return pixels_h[..., :2] / pixels_h[..., 2:3], depth

    def relative_pose(self, source: int, target: int) -> torch.Tensor:
        """(4, 4) transform taking camera-`source` coordinates to camera-`target` coordinates."""
        return self.world_to_camera[target] @ inverse_transformation(self.world_to_camera[source][None])[0]

    def fundamental_matrices(self, sources: Sequence[int] | torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(P, 3, 3) fundamental matrices F with x_target^T F x_source = 0 for pixels of this rig's image size.

        F is zero for a pair with no baseline (identical centres): there the epipolar geometry is undefined.
        """
        sources = torch.as_tensor(sources, dtype=torch.long).reshape(-1)
        targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        essential = essential_from_Rt(
            self.rotations[sources], self.translations[sources, :, None],
            self.rotations[targets], self.translations[targets, :, None],
        )
        return fundamental_from_essential(essential, self.intrinsics[sources], self.intrinsics[targets])

    def plucker_rays(self, height: int | None = None, width: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, 6, height, width) Plücker ray maps (o x d, d) with unit world directions d through pixel centres,
        the embedding CameraCtrl and CVD feed their pose encoders. Defaults to the rig's image size."""
        rig = self if height is None and width is None else self.resized(height or self.height, width or self.width)
        rows, cols = torch.meshgrid(
            torch.arange(rig.height, dtype=GEOMETRY_DTYPE) + 0.5,
            torch.arange(rig.width, dtype=GEOMETRY_DTYPE) + 0.5,
            indexing="ij",
        )
        pixels = torch.stack([cols, rows, torch.ones_like(cols)], dim=-1).reshape(-1, 3)
        camera_dirs = pixels @ torch.linalg.inv(rig.intrinsics).transpose(1, 2)  # (N, HW, 3)
        world_dirs = camera_dirs @ rig.rotations  # R^T d, row-vector form
        world_dirs = world_dirs / world_dirs.norm(dim=-1, keepdim=True)
        origins = rig.centers[:, None, :].expand_as(world_dirs)
        rays = torch.cat([torch.cross(origins, world_dirs, dim=-1), world_dirs], dim=-1)
        return rays.reshape(len(rig), rig.height, rig.width, 6).permute(0, 3, 1, 2).to(dtype).contiguous()


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> torch.Tensor:
    """(3, 3) intrinsics with vertical field of view `fov_deg`, square pixels and the principal point centred."""
    focal = (height / 2) / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=GEOMETRY_DTYPE)


def look_at(eyes: torch.Tensor, target: Sequence[float] = (0.0, 0.0, 0.0), up: Sequence[float] = (0.0, 0.0, 1.0)) -> torch.Tensor:
    """(N, 4, 4) OpenCV world-to-camera transforms of cameras at `eyes` (N, 3) looking at `target`."""
    eyes = torch.as_tensor(eyes, dtype=GEOMETRY_DTYPE).reshape(-1, 3)
    target = torch.as_tensor(target, dtype=GEOMETRY_DTYPE)
    up = torch.as_tensor(up, dtype=GEOMETRY_DTYPE)
    forward = target - eyes
    forward = forward / forward.norm(dim=-1, keepdim=True)
    right = torch.cross(forward, up.expand_as(forward), dim=-1)
    if (right.norm(dim=-1) < 1e-9).any():
        raise InvalidInput("elevation", "a camera looks straight along the up axis, so its orientation is undefined",
                           "keep the elevation strictly between -90 and 90 degrees")
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.cross(forward, right, dim=-1)
    rotation = torch.stack([right, down, forward], dim=1)  # rows: camera axes in world coordinates
    world_to_camera = torch.eye(4, dtype=GEOMETRY_DTYPE).repeat(len(eyes), 1, 1)
    world_to_camera[:, :3, :3] = rotation
    world_to_camera[:, :3, 3] = -(rotation @ eyes[:, :, None])[..., 0]
    return world_to_camera


def orbit_azimuths_deg(views: int, start_azimuth_deg: float = 0.0, sv3d_order: bool = False, span_deg: float = 360.0) -> list[float]:
    """Evenly spaced azimuths of an orbit covering span_deg (a full turn by default).

    Default order: the input view first, at `start_azimuth_deg`. SV3D order (official SV3D and Diffusion² code):
    start + 360 k / views for k = 1..views, so the input view is the LAST one, at start + 360 degrees.
    """
    first = 1 if sv3d_order else 0
    return [start_azimuth_deg + span_deg * k / views for k in range(first, views + first)]


def orbit_rig(
    views: int,
    elevation_deg: float | Sequence[float] = 10.0,
    radius: float = 2.0,
    fov_deg: float = 33.8,
    height: int = 576,
    width: int = 576,
    start_azimuth_deg: float = 0.0,
    sv3d_order: bool = False,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    span_deg: float = 360.0,
) -> CameraRig:
    """Cameras on a circle around `target` (default the origin), all looking at it (see the module docstring)."""
    if views < 1:
        raise InvalidInput("views", f"an orbit needs at least 1 view, got {views}", "set views to 1 or more")
    if not radius > 0 or not math.isfinite(radius):
        raise InvalidInput("radius", f"must be a positive distance, got {radius}", "set radius > 0")
    if not 0 < fov_deg < 180:
        raise InvalidInput("fov", f"field of view must be between 0 and 180 degrees, got {fov_deg}", "use e.g. 33.8")
    elevations = torch.as_tensor(elevation_deg, dtype=GEOMETRY_DTYPE).reshape(-1).expand(views)
    if not torch.isfinite(elevations).all() or (elevations.abs() >= 90).any():
        raise InvalidInput("elevation", f"must be strictly between -90 and 90 degrees, got {elevation_deg}",
                           "use an elevation like 10 (SV3D's default)")
    azimuths = torch.deg2rad(torch.tensor(orbit_azimuths_deg(views, start_azimuth_deg, sv3d_order, span_deg), dtype=GEOMETRY_DTYPE))
    elevations = torch.deg2rad(elevations)
    target = torch.as_tensor(target, dtype=GEOMETRY_DTYPE)
    eyes = target + radius * torch.stack(
        [torch.cos(elevations) * torch.cos(azimuths), torch.cos(elevations) * torch.sin(azimuths), torch.sin(elevations)],
        dim=-1,
    )
    return CameraRig(look_at(eyes, target), intrinsics_from_fov(fov_deg, height, width), height, width)


@dataclass(frozen=True)
class SV3DAngles:
    """Per-view conditioning angles for SV3D_p, in the official convention.

    azimuths are measured from the reference (input) view and lie in (0, 360]: the reference view itself is 360,
    as in the official SV3D / Diffusion² code, where the input view is the last of 21 at 2*pi.
    """

    elevations_deg: list[float]
    azimuths_deg: list[float]

    @property
    def polars_rad(self) -> list[float]:
        return [math.radians(90.0 - e) for e in self.elevations_deg]

    @property
    def azimuths_rad(self) -> list[float]:
        return [math.radians(a) for a in self.azimuths_deg]


def sv3d_angles(rig: CameraRig, reference_view: int = -1) -> SV3DAngles:
    """SV3D elevation/azimuth lists of an orbit-like rig around the world origin (+Z up)."""
    centers = rig.centers
    distance = centers.norm(dim=-1)
    if (distance < 1e-9).any():
        raise InvalidInput("cameras", f"camera {int((distance < 1e-9).nonzero()[0])} sits at the orbit centre",
                           "SV3D angles need cameras around the object at the world origin")
    elevations = torch.rad2deg(torch.asin((centers[:, 2] / distance).clamp(-1, 1)))
    azimuths = torch.rad2deg(torch.atan2(centers[:, 1], centers[:, 0]))
    relative = torch.remainder(azimuths - azimuths[reference_view], 360.0)
    # The reference view (relative azimuth 0 up to rounding) is written as 360, the official convention.
    relative = torch.where((relative < 1e-6) | (relative > 360.0 - 1e-6), torch.full_like(relative, 360.0), relative)
    return SV3DAngles(elevations.tolist(), relative.tolist())


def rotated_about_up(rig: CameraRig, degrees: float, centre: Sequence[float] = (0.0, 0.0, 0.0)) -> CameraRig:
    """The rig turned by `degrees` about the world's up axis (+Z) through `centre`, counter-clockwise seen from
    above (an orbit's azimuths all grow by `degrees`); intrinsics and image size unchanged."""
    angle = math.radians(degrees)
    turn = torch.eye(4, dtype=GEOMETRY_DTYPE)
    turn[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=GEOMETRY_DTYPE)
    centre = torch.as_tensor(centre, dtype=GEOMETRY_DTYPE)
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    return CameraRig(rig.world_to_camera @ inverse_transformation(turn), rig.intrinsics, rig.height, rig.width)


def mvdream_cameras(rig: CameraRig) -> torch.Tensor:
    """(N, 16) camera embeddings in MVDream's (and ImageDream's, 4DM's) convention: the flattened 4 x 4
    camera-to-world matrix with OpenGL camera axes (x right, y up, z backward) in a +Z-up world (MVDream's
    "Blender" coordinates, which our orbit rigs share) and the camera centre normalised onto the unit sphere
    (MVDream's normalize_camera). MVDream's azimuth a is our a - 90: its default views (azimuth 90, 180, 270, 360 at
    elevation 15) are our orbit from azimuth 0, ImageDream's (azimuth 0, ...) our orbit from -90."""
    camera_to_world = rig.camera_to_world.clone()
    camera_to_world[:, :3, 1:3] *= -1  # OpenCV y down, z forward -> OpenGL y up, z backward
    distance = camera_to_world[:, :3, 3].norm(dim=-1, keepdim=True)
    if (distance < 1e-9).any():
        raise InvalidInput("cameras", f"camera {int((distance[:, 0] < 1e-9).nonzero()[0])} sits at the world origin",
                           "MVDream cameras look at an object at the origin from around it: use an orbit rig")
    camera_to_world[:, :3, 3] /= distance
    return camera_to_world.reshape(len(rig), 16).float()


def interpolate_world_to_camera(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Pose interpolation: slerp of the camera orientation, linear blend of the camera centre.

    start, end: (N, 4, 4) world-to-camera; weight: scalar or (N,) with 0 giving `start` and 1 giving `end`.
    """
    start_c2w, end_c2w = inverse_transformation(start), inverse_transformation(end)
    weight = torch.as_tensor(weight, dtype=GEOMETRY_DTYPE)
    weight = weight.expand(len(start)) if weight.ndim == 0 else weight
    # slerp: turn from the start orientation by `weight` of the (shortest) relative rotation, in axis-angle form
    relative = rotation_matrix_to_axis_angle(start_c2w[:, :3, :3].transpose(1, 2) @ end_c2w[:, :3, :3])
    rotation = start_c2w[:, :3, :3] @ axis_angle_to_rotation_matrix(relative * weight[:, None])
    result = torch.eye(4, dtype=GEOMETRY_DTYPE).repeat(len(start), 1, 1)
    result[:, :3, :3] = rotation
    result[:, :3, 3] = torch.lerp(start_c2w[:, :3, 3], end_c2w[:, :3, 3], weight[:, None])
    return inverse_transformation(result)


def blend_trajectories(first: CameraRig, second: CameraRig, weight: float) -> CameraRig:
    """The trajectory `weight` of the way from `first` to `second`, frame by frame (CVD's trajectory interpolation)."""
    if len(first) != len(second) or (first.height, first.width) != (second.height, second.width):
        raise InvalidInput(
            "trajectories", f"cannot blend {len(first)} cameras at {first.width}x{first.height} with "
            f"{len(second)} cameras at {second.width}x{second.height}", "blend trajectories of equal length and image size",
        )
    world_to_camera = interpolate_world_to_camera(first.world_to_camera, second.world_to_camera, weight)
    intrinsics = torch.lerp(first.intrinsics, second.intrinsics, float(weight))
    return CameraRig(world_to_camera, intrinsics, first.height, first.width)


def resample_trajectory(rig: CameraRig, positions: Sequence[float] | torch.Tensor) -> CameraRig:
    """Cameras at fractional positions along a trajectory (0 = first camera, len - 1 = last)."""
    positions = torch.as_tensor(positions, dtype=GEOMETRY_DTYPE).reshape(-1)
    if len(positions) == 0 or (positions < 0).any() or (positions > len(rig) - 1).any() or not torch.isfinite(positions).all():
        raise InvalidInput("positions", f"must lie in [0, {len(rig) - 1}], got {positions.tolist()}",
                           "pass fractional camera indices inside the trajectory")
    lower = positions.floor().long().clamp(max=len(rig) - 1)
    upper = (lower + 1).clamp(max=len(rig) - 1)
    weight = positions - lower
    world_to_camera = interpolate_world_to_camera(rig.world_to_camera[lower], rig.world_to_camera[upper], weight)
    intrinsics = torch.lerp(rig.intrinsics[lower], rig.intrinsics[upper], weight[:, None, None])
    return CameraRig(world_to_camera, intrinsics, rig.height, rig.width)
