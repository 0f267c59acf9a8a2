"""MV4D Preview 4D inside a real ComfyUI process: what it writes for the browser (the player itself runs in
test_host_player.py)."""

from pathlib import Path

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_player_scene import player_scene


def test_preview_writes_the_scene_for_the_player_into_temp(comfy, mv4d_nodes):
    from mv4d.kernels.splats.player_file import decode_player_file

    scene = player_scene()
    result = run_node(mv4d_nodes.Preview4D, splats_4d=scene, background="black", fps=8.0)
    assert result.args == ()  # an output node with nothing to pass on
    entries = result.ui["mv4d_player"]
    assert len(entries) == 1 and entries[0]["type"] == "temp" and entries[0]["filename"].endswith(".mv4dweb")
    path = Path(comfy.get_temp_directory()) / entries[0]["subfolder"] / entries[0]["filename"]
    header, fields = decode_player_file(path.read_bytes())
    assert header["count"] == scene.gaussians.count and header["background"] == [0.0, 0.0, 0.0] and header["fps"] == 8.0
    assert len(header["cameras"]) == len(scene.cameras) and torch.equal(torch.from_numpy(fields["means"]), scene.gaussians.params["means"])
    again = run_node(mv4d_nodes.Preview4D, splats_4d=scene, background="white", fps=12.0).ui["mv4d_player"][0]
    assert again["filename"] != entries[0]["filename"]  # a new file each run: the browser never shows a stale one
    assert not list(Path(comfy.get_temp_directory()).rglob("*.partial-*"))


def test_preview_errors_name_the_node_and_the_input(comfy, mv4d_nodes):
    from mv4d.integration.node_errors import NodeInputError

    scene = player_scene()
    scene.gaussians.params["means"][0, 0] = float("nan")
    with pytest.raises(NodeInputError, match=r"MV4D Preview 4D: input 'splats_4d': the Gaussians' means hold NaN"):
        run_node(mv4d_nodes.Preview4D, splats_4d=scene, background="white", fps=12.0)
