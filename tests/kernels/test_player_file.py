"""The web player's file (.mv4dweb) and standalone page: what the JavaScript player reads is our model, exactly
enough to draw it, and damaged files are refused with a reason. (The player itself runs in tests/host.)"""

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.splats.model import MotionConfig, Splats4D, new_gaussians
from mv4d.kernels.splats.player_file import (MAGIC, decode_player_file, encode_player_file, field_layout, record_stride,
                                             write_player_file)
from mv4d.kernels.splats.player_page import PLAYER_SOURCE, player_page

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [MotionConfig(), MotionConfig.static(0), MotionConfig(0, 3, 0, False, 3), MotionConfig(6, 8, 3, True, 2)]


def moving_scene(config: MotionConfig, count=50, seed=0, cameras=True) -> Splats4D:
    generator = torch.Generator().manual_seed(seed)
    gaussians = new_gaussians(torch.randn(count, 3, generator=generator) * 0.4, torch.rand(count, 3, generator=generator),
                              0.01 + 0.05 * torch.rand(count, generator=generator), config, opacity=0.6)
    for name, value in gaussians.params.items():
        if name != "means":
            gaussians.params[name] = value + 0.2 * torch.randn(value.shape, generator=generator)
    rig = orbit_rig(3, height=40, width=56) if cameras else None
    return Splats4D(gaussians, torch.linspace(0, 1, 6), rig)


def frame_from_fields(header: dict, fields: dict, time: float):
    """What the player's shader computes from the file, in torch: position, rotation, scales, opacity at a time."""
    from mv4d.kernels.splats.model import time_basis

    config = MotionConfig(**header["motion"])
    basis = time_basis(config, torch.tensor([time]))
    f = {name: torch.from_numpy(value) for name, value in fields.items()}
    count = header["count"]
    means = f["means"]
    if basis.position is not None:
        means = means + torch.einsum("k,nkc->nc", basis.position[0], f["position_motion"].reshape(count, -1, 3))
    quats = f["quats"]
    if basis.rotation is not None:
        quats = quats + torch.einsum("k,nkc->nc", basis.rotation[0], f["rotation_motion"].reshape(count, -1, 4))
    opacity = torch.sigmoid(f["opacity"][:, 0])
    if config.temporal_opacity:
        opacity = opacity * torch.exp(-0.5 * ((time - f["opacity"][:, 1]) / f["opacity"][:, 2].exp()) ** 2)
    return means, quats / quats.norm(dim=-1, keepdim=True), f["log_scales"].exp(), opacity, f["sh"].reshape(count, -1, 3)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"P{c.position_degree}K{c.fourier_terms}R{c.rotation_degree}T{int(c.temporal_opacity)}D{c.sh_degree}")
def test_the_file_holds_the_model_and_evaluates_to_its_frames(config):
    scene = moving_scene(config)
    header, fields = decode_player_file(encode_player_file(scene, background=(0.0, 0.0, 0.0), fps=8))
    layout = field_layout(config)
    assert header["count"] == 50 and header["stride"] % 4 == 0 and header["stride"] == record_stride(layout)
    assert header["fields"] == layout and MotionConfig(**header["motion"]) == config
    assert header["frame_times"] == pytest.approx(scene.frame_times.tolist()) and header["background"] == [0, 0, 0] and header["fps"] == 8
    # fields never overlap and fit the record
    words = sorted((field["offset"], field["offset"] + (field["length"] if field["type"] == "f32" else (field["length"] + 1) // 2))
                   for field in layout.values())
    assert all(end <= start for (_, end), (start, _) in zip(words, words[1:])) and words[-1][1] <= header["stride"]
    assert np.array_equal(fields["means"], scene.gaussians.params["means"].numpy())  # float32, bit for bit
    for time in (0.0, 0.37, 1.0):
        truth = scene.gaussians.frame(time)
        means, quats, scales, opacity, sh = frame_from_fields(header, fields, time)
        assert torch.allclose(means, truth.means, atol=2e-3)  # half-precision motion of coefficients ~0.2
        assert torch.allclose(quats.abs(), truth.quats.abs(), atol=2e-3)
        assert torch.allclose(scales, truth.scales, rtol=2e-3)
        assert torch.allclose(opacity, truth.opacities, atol=2e-3)
        assert torch.allclose(sh, truth.sh, atol=2e-3)


def test_header_cameras_are_opencv_and_the_default_view_looks_at_the_scene():
    scene = moving_scene(MotionConfig())
    header, _ = decode_player_file(encode_player_file(scene))
    rig = scene.cameras
    assert len(header["cameras"]) == 3
    first = header["cameras"][0]
    assert np.allclose(np.array(first["world_to_camera"]).reshape(4, 4), rig.world_to_camera[0].numpy())
    assert (first["fx"], first["cy"], first["width"], first["height"]) == (float(rig.intrinsics[0, 0, 0]), float(rig.intrinsics[0, 1, 2]), 56, 40)
    assert np.allclose(header["view"]["up"], [0, 0, 1], atol=0.05)  # orbit rigs are +Z up
    assert np.allclose(header["view"]["center"], [0, 0, 0], atol=1e-5)
    no_cameras = decode_player_file(encode_player_file(moving_scene(MotionConfig(), cameras=False)))[0]
    assert no_cameras["cameras"] == [] and no_cameras["view"]["radius"] > 0


def test_damaged_and_foreign_files_are_refused_with_a_reason(tmp_path):
    data = write_player_file(tmp_path / "scene.mv4dweb", moving_scene(MotionConfig())).read_bytes()
    assert data.startswith(MAGIC)
    with pytest.raises(InvalidInput, match="truncated"):
        decode_player_file(data[:-4])
    with pytest.raises(InvalidInput, match="truncated"):
        decode_player_file(data[:40])
    with pytest.raises(InvalidInput, match="no MV4D-WEB magic"):
        decode_player_file(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(InvalidInput, match="version 7"):
        decode_player_file(data[:8] + (7).to_bytes(4, "little") + data[12:])
    broken = moving_scene(MotionConfig())
    broken.gaussians.params["shN"][3, 0, 1] = float("nan")
    with pytest.raises(InvalidInput, match="sh hold NaN"):
        encode_player_file(broken)


def test_the_standalone_page_embeds_the_player_and_the_file():
    scene = moving_scene(MotionConfig())
    data = encode_player_file(scene)
    page = player_page(data, 'a "scene" </script>')
    embedded = re.search(r'<script type="application/octet-stream" id="mv4d-scene">([^<]*)</script>', page).group(1)
    assert base64.b64decode(embedded) == data
    assert PLAYER_SOURCE.read_text() in page
    assert "</script>" not in page.split('id="mv4d-scene">')[1].split("</script>", 1)[1].rsplit("</script>", 1)[0]
    assert "<title>a &quot;scene&quot; &lt;/script&gt;</title>" in page


def test_web_code_asks_no_host_of_its_own():
    """Offline and behind --listen: no absolute URL anywhere, imports only ComfyUI's script shims (relative to the
    extension's own URL) and each other, and the player fetches nothing but the URL it is given."""
    import mv4d

    web = ROOT / mv4d.WEB_DIRECTORY
    sources = {path.name: path.read_text() for path in sorted(web.glob("*.js"))}
    assert set(sources) == {"mv4d_player.js", "mv4d_preview.js"}
    for name, source in sources.items():
        assert not re.search(r"https?:|wss?:|//[a-z0-9-]+\.[a-z]", source, re.IGNORECASE), name
        imports = re.findall(r'^import .* from "([^"]+)";', source, re.MULTILINE)
        assert set(imports) <= {"../../scripts/app.js", "../../scripts/api.js", "./mv4d_player.js"}, (name, imports)
    assert sources["mv4d_player.js"].count("fetch(") == 1 and "import " not in sources["mv4d_player.js"]
    assert "api.apiURL(" in sources["mv4d_preview.js"] and "fetch(" not in sources["mv4d_preview.js"]
    assert "</script" not in sources["mv4d_player.js"].lower()  # the standalone page inlines it
