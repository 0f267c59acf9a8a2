"""MV4D Load Multiview Images inside a real ComfyUI process: order, size, transparency, and its errors."""

from pathlib import Path

import numpy as np
import pytest

from mv4d_host_helpers import run_node


def save(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def flat(value: int, size: int = 16, channels: int = 3) -> np.ndarray:
    return np.full((size, size, channels), value, dtype=np.uint8)


@pytest.fixture
def input_dir(comfy):
    return Path(comfy.get_input_directory())


def test_views_come_in_natural_file_name_order_with_the_input_view_last(mv4d_nodes, input_dir):
    for view in (10, 2, 1):  # written out of order; view_10 must come last, not between 1 and 2
        save(input_dir / "set_order" / f"view_{view}.png", flat(view * 20))
    views, input_view, count = run_node(mv4d_nodes.LoadMultiviewImages, folder="set_order", size=0,
                                        input_view="last (SV3D order: input view at 360 deg)").args
    assert count == 3 and views.shape == (3, 16, 16, 3)
    assert [round(float(v) * 255) for v in views[:, 0, 0, 0]] == [20, 40, 200]
    assert input_view.shape == (1, 16, 16, 3) and torch_equal(input_view[0], views[2])
    first = run_node(mv4d_nodes.LoadMultiviewImages, folder="set_order", size=0, input_view="first").args[1]
    assert torch_equal(first[0], views[0])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_views_are_resized_to_size_and_transparency_goes_on_white(mv4d_nodes, input_dir):
    transparent = np.zeros((20, 30, 4), dtype=np.uint8)  # fully transparent black
    save(input_dir / "set_alpha" / "a.png", transparent)
    save(input_dir / "set_alpha" / "b.png", flat(0, size=24))
    views = run_node(mv4d_nodes.LoadMultiviewImages, folder="set_alpha", size=8, input_view="first").args[0]
    assert views.shape == (2, 8, 8, 3)
    assert float(views[0].min()) == 1.0 and float(views[1].max()) == 0.0  # white behind the transparent view


def test_errors_name_the_node_the_input_and_the_fix(mv4d_nodes, input_dir):
    from mv4d.integration.node_errors import NodeInputError

    save(input_dir / "set_sizes" / "a.png", flat(0, size=16))
    save(input_dir / "set_sizes" / "b.png", flat(0, size=24))
    with pytest.raises(NodeInputError, match=r"MV4D Load Multiview Images: input 'size': the views have different sizes.*Fix: set size"):
        run_node(mv4d_nodes.LoadMultiviewImages, folder="set_sizes", size=0, input_view="first")
    (input_dir / "set_broken").mkdir()
    (input_dir / "set_broken" / "a.png").write_bytes(b"not a picture")
    save(input_dir / "set_broken" / "b.png", flat(0))
    with pytest.raises(NodeInputError, match=r"input 'folder': cannot read a\.png as an image"):
        run_node(mv4d_nodes.LoadMultiviewImages, folder="set_broken", size=0, input_view="first")

    node = mv4d_nodes.LoadMultiviewImages
    assert "no folder 'missing'" in node.validate_inputs(folder="missing")
    assert "not a subfolder" in node.validate_inputs(folder="../..")
    save(input_dir / "set_single" / "a.png", flat(0))
    assert "holds 1 image(s)" in node.validate_inputs(folder="set_single")
    assert node.validate_inputs(folder="set_sizes") is True


def test_the_folder_list_offers_subfolders_with_at_least_two_images(mv4d_nodes, input_dir):
    from mv4d.nodes.load_multiview import multiview_folders

    save(input_dir / "nested" / "deeper" / "set" / "a.png", flat(0))
    save(input_dir / "nested" / "deeper" / "set" / "b.png", flat(0))
    save(input_dir / "set_lonely" / "a.png", flat(0))
    folders = multiview_folders()
    assert "nested/deeper/set" in folders and "set_lonely" not in folders and "nested" not in folders
