"""Everything MV4D Save 4D writes for one scene, each file written atomically:

- <base>.mv4d.safetensors   the lossless scene (MV4D Load 4D reads it back exactly);
- <base>.splatv             for 4D web players (splaTV);
- <base>.html               with the .splatv: a standalone page playing the scene in our player, from disk
                            (player_page.py: the scene embedded in the page, exact, view-dependent colour included);
- <base>_frames/frame_NNNN.ply   one INRIA .ply per frame time, the universal fallback;
- <base>_tT.TTT.ply         optionally, a static .ply of one time.
Gaussians fainter than 1/255 at a time are left out of that time's .ply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import InvalidInput
from ..files import atomic_folder
from .model import GaussianFrame, Splats4D
from .player_page import write_player_page
from .ply import write_ply
from .splatv import write_splatv
from .storage import SUFFIX, save_splats4d

VISIBLE_OPACITY = 1.0 / 255.0


@dataclass
class SavedFiles:
    paths: list[Path] = field(default_factory=list)
    splatv_motion_error: float | None = None  # largest position error of the cubic fit .splatv needs


def visible(frame: GaussianFrame, threshold: float = VISIBLE_OPACITY) -> GaussianFrame:
    keep = frame.opacities >= threshold
    return GaussianFrame(frame.means[keep], frame.quats[keep], frame.scales[keep], frame.opacities[keep], frame.sh[keep], frame.sh_degree)


def export_scene(scene: Splats4D, base: Path, splatv: bool = True, ply_sequence: bool = True,
                 static_time: float | None = None, on_file: Callable[[int, int], None] | None = None) -> SavedFiles:
    """Write the scene next to `base` (a path without suffix). on_file(done, total) is called after each file
    (progress and interrupt checks); an interrupt leaves every finished file whole and no partial one."""
    if static_time is not None and not 0 <= static_time <= 1:
        raise InvalidInput("static_time", f"must lie in [0, 1], got {static_time}", "pick a time of the clip, 0 = first frame")
    base = Path(base)
    gaussians = scene.gaussians.to("cpu")
    saved = SavedFiles()
    total = 1 + 2 * int(splatv) + (len(scene.frame_times) if ply_sequence else 0) + int(static_time is not None)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_file is not None:
            on_file(done, total)

    path = base.with_name(base.name + SUFFIX)
    save_splats4d(path, scene)
    saved.paths.append(path)
    tick()
    if splatv:
        path = base.with_name(base.name + ".splatv")
        saved.splatv_motion_error = write_splatv(path, gaussians, scene.cameras)
        saved.paths.append(path)
        tick()
        saved.paths.append(write_player_page(base.with_name(base.name + ".html"), scene, base.name))
        tick()
    if ply_sequence:
        folder = base.with_name(base.name + "_frames")
        with atomic_folder(folder) as temporary:
            for index, time in enumerate(scene.frame_times.tolist()):
                write_ply(temporary / f"frame_{index:04d}.ply", visible(gaussians.frame(time)))
                tick()
        saved.paths += [folder / f"frame_{index:04d}.ply" for index in range(len(scene.frame_times))]
    if static_time is not None:
        path = base.with_name(f"{base.name}_t{static_time:.3f}.ply")
        write_ply(path, visible(gaussians.frame(torch.tensor(static_time))))
        saved.paths.append(path)
        tick()
    return saved
