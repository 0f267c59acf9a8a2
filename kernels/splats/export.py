"""Everything MV4D Save 4D writes for one scene, as one set that appears whole or not at all:

- <base>.mv4d.safetensors   the lossless scene (MV4D Load 4D reads it back exactly);
- <base>.splatv             for 4D web players (splaTV);
- <base>.html               with the .splatv: a standalone page playing the scene in our player, from disk
                            (player_page.py: the scene embedded in the page, exact, view-dependent colour included);
- <base>_frames/frame_NNNN.ply   one INRIA .ply per frame time, the universal fallback;
- <base>_tT.TTT.ply         optionally, a static .ply of one time.
Gaussians fainter than 1/255 at a time are left out of that time's .ply (a time where none is visible gets a
.ply with no vertex).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import InvalidInput
from ..files import atomic_file_set
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
    (progress and interrupt checks). The files appear together once all are written: an error or an interrupt
    while writing any of them leaves none behind."""
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

    with atomic_file_set(base.parent, base.name) as staged:
        save_splats4d(staged.path(base.name + SUFFIX), scene)
        saved.paths.append(base.with_name(base.name + SUFFIX))
        tick()
        if splatv:
            saved.splatv_motion_error = write_splatv(staged.path(base.name + ".splatv"), gaussians, scene.cameras)
            saved.paths.append(base.with_name(base.name + ".splatv"))
            tick()
            write_player_page(staged.path(base.name + ".html"), scene, base.name)  # opens from disk: the player
            saved.paths.append(base.with_name(base.name + ".html"))
            tick()
        if ply_sequence:
            folder = staged.path(base.name + "_frames")
            for index, time in enumerate(scene.frame_times.tolist()):
                write_ply(folder / f"frame_{index:04d}.ply", visible(gaussians.frame(time)))
                saved.paths.append(base.with_name(base.name + "_frames") / f"frame_{index:04d}.ply")
                tick()
        if static_time is not None:
            name = f"{base.name}_t{static_time:.3f}.ply"
            write_ply(staged.path(name), visible(gaussians.frame(torch.tensor(static_time))))
            saved.paths.append(base.with_name(name))
            tick()
    return saved
