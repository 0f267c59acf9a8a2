"""Hostile files for every reader (issue 12, item 14): .splatv, .mv4d.safetensors, INRIA .ply and pose files.

Each reader gets hundreds of seeded random mutations of a file our writer made (bytes flipped, words set to
extreme values, cuts, insertions, duplications, tokens of its text header swapped) and structured cases (each
malformation found by hand). Every outcome must be a clean load of finite, consistent values or our
InvalidInput naming the file and what is wrong, with a fix; never another exception, never longer than 10 s,
and never more memory than the reader's stated bound (READ_MEMORY_PER_BYTE x the file's size, plus the test's
slack): a count a file declares is checked against the bytes it holds before anything is allocated.
"""

from __future__ import annotations

import json
import random
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.pose_files import READ_MEMORY_PER_BYTE as POSE_MEMORY, format_pose_file, load_pose_file
from mv4d.kernels.splats.model import MotionConfig, Splats4D, new_gaussians
from mv4d.kernels.splats.ply import READ_MEMORY_PER_BYTE as PLY_MEMORY, read_ply, write_ply
from mv4d.kernels.splats.splatv import MAGIC, READ_MEMORY_PER_BYTE as SPLATV_MEMORY, read_splatv, write_splatv
from mv4d.kernels.splats.storage import load_splats4d, save_splats4d

from mv4d_limits import memory_limit, time_limit

MUTATIONS = 300
EXTREME_WORDS = (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x7F800000, 0x7FC00000, 0xFF800000, 0x3C003C00, 0x7C00FC00)
TOKENS = ("nan", "inf", "-inf", "-1", "0", "-0", "1e309", "99999999999999999999", "", "x", '"x"', "true", "null", "[]",
          "{}", "[[[[", "3.5", "\x00", "\u00e9", "0x10", "1_000")


def moving_gaussians(count=40, config: MotionConfig | None = None, seed=0):
    config = config or MotionConfig(sh_degree=1)
    generator = torch.Generator().manual_seed(seed)
    gaussians = new_gaussians(torch.randn(count, 3, generator=generator) * 0.3, torch.rand(count, 3, generator=generator),
                              0.01 + 0.05 * torch.rand(count, generator=generator), config, opacity=0.5)
    for name in ("position_motion", "rotation_motion", "shN"):
        if name in gaussians.params:
            gaussians.params[name] = torch.randn(gaussians.params[name].shape, generator=generator) * 0.05
    return gaussians


# -- outcomes ---------------------------------------------------------------------------------------------------

def read_bounded(read, path, memory_per_byte: float):
    """read(path) under the time and memory bounds; None when it refused the file with our clear error."""
    size = path.stat().st_size
    with time_limit(10, f"reading {path.name}"), memory_limit(memory_per_byte * size):
        try:
            return read(path)
        except InvalidInput as error:
            message = str(error)
            assert path.name in message and "Fix: " in message and error.problem, message
            return None


def finite(*tensors) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def check_splatv(path):
    loaded = read_bounded(read_splatv, path, SPLATV_MEMORY)
    if loaded is not None:
        gaussians, cameras = loaded
        assert isinstance(cameras, list) and finite(*gaussians.params.values())
    return loaded


def check_safetensors(path):
    scene = read_bounded(load_splats4d, path, 3)
    if scene is not None:
        times = scene.frame_times
        assert finite(*scene.gaussians.params.values(), times) and ((times >= 0) & (times <= 1)).all()
        assert all(value.dtype == torch.float32 for value in scene.gaussians.params.values())
    return scene


def check_ply(path):
    ply = read_bounded(read_ply, path, PLY_MEMORY)
    if ply is not None:
        count = len(ply.means)
        assert finite(ply.means, ply.quats, ply.log_scales, ply.opacity_logits, ply.sh)
        assert ply.quats.shape == (count, 4) and ply.sh.shape == (count, (ply.sh_degree + 1) ** 2, 3)
    return ply


def check_pose(path):
    trajectory = read_bounded(lambda p: load_pose_file(p, 64, 64, max_frames=0), path, POSE_MEMORY)
    if trajectory is not None:
        assert len(trajectory.cameras) == len(trajectory.timestamps_us) >= 1
    return trajectory


# -- valid files, from our writers -----------------------------------------------------------------------------

def splatv_bytes(tmp_path) -> bytes:
    config = MotionConfig(position_degree=3, fourier_terms=0, rotation_degree=1, temporal_opacity=True, sh_degree=0)
    write_splatv(tmp_path / "source.splatv", moving_gaussians(config=config), orbit_rig(2, height=32, width=32))
    return (tmp_path / "source.splatv").read_bytes()


def safetensors_bytes(tmp_path) -> bytes:
    save_splats4d(tmp_path / "source.mv4d.safetensors", Splats4D(moving_gaussians(), torch.linspace(0, 1, 5), orbit_rig(3, height=32, width=48)))
    return (tmp_path / "source.mv4d.safetensors").read_bytes()


def ply_bytes(tmp_path) -> bytes:
    write_ply(tmp_path / "source.ply", moving_gaussians().frame(0.4))
    return (tmp_path / "source.ply").read_bytes()


def pose_bytes(tmp_path) -> bytes:
    return format_pose_file(orbit_rig(6, height=64, width=64)).encode()


# -- mutations -------------------------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, header: int) -> bytes:
    """One random damage; half the time aimed at the first `header` bytes, where the declarations are."""
    data = bytearray(data)
    reach = header if rng.random() < 0.5 else len(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(reach, len(data)))] = rng.randrange(256)
    elif kind == 1:
        offset = rng.randrange(0, max(1, min(reach, len(data)) - 4)) & ~3
        data[offset:offset + 4] = struct.pack("<I", rng.choice(EXTREME_WORDS))
    elif kind == 2:
        del data[rng.randrange(len(data)):]
    elif kind == 3:
        at = rng.randrange(min(reach, len(data)))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 4:
        start = rng.randrange(min(reach, len(data)))
        del data[start:start + rng.randint(1, 256)]
    else:
        start = rng.randrange(len(data))
        data[start:start] = data[start:start + rng.randint(1, 512)]
    return bytes(data)


def mutate_tokens(text: str, rng: random.Random) -> str:
    """Swap, drop or duplicate a few tokens or lines of a text (a header or a pose file)."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        lines = text.split("\n")
        if kind == 0 and len(lines) > 1:
            del lines[rng.randrange(len(lines))]
            text = "\n".join(lines)
        elif kind == 1:
            at = rng.randrange(len(lines))
            lines.insert(at, lines[at] if rng.random() < 0.5 else rng.choice(TOKENS))
            text = "\n".join(lines)
        else:
            parts = re.split(r"(\s+|[\[\]{},:\"])", text)
            words = [index for index, part in enumerate(parts) if part and not re.fullmatch(r"(\s+|[\[\]{},:\"])", part)]
            if words:
                parts[rng.choice(words)] = rng.choice(TOKENS) if kind == 2 else str(rng.choice([-1, 0, 2**31, 2**64, 10**9]))
            text = "".join(parts)
    return text


def splatv_with_header(data: bytes, header_text: str, keep_length: bool = False) -> bytes:
    magic, length = struct.unpack("<II", data[:8])
    encoded = header_text.encode("utf-8", errors="surrogatepass")
    return struct.pack("<II", magic, length if keep_length else len(encoded)) + encoded + data[8 + length:]


def splatv_header(data: bytes) -> str:
    _, length = struct.unpack("<II", data[:8])
    return data[8:8 + length].decode()


def ply_with_header(data: bytes, header_text: str) -> bytes:
    end = data.index(b"end_header\n")
    return header_text.encode("utf-8", errors="surrogatepass") + data[end:]


def run_mutations(tmp_path, name, source: bytes, mutate, check) -> dict:
    outcomes = {"loaded": 0, "refused": 0}
    rng = random.Random(f"mv4d-{name}")  # fixed seed per reader
    path = tmp_path / name
    for _ in range(MUTATIONS):
        path.write_bytes(mutate(source, rng))
        outcomes["loaded" if check(path) is not None else "refused"] += 1
    return outcomes


def test_random_mutations_of_splatv_files(tmp_path):
    source = splatv_bytes(tmp_path)

    def mutate(data, rng):
        if rng.random() < 0.4:
            return splatv_with_header(data, mutate_tokens(splatv_header(data), rng), keep_length=rng.random() < 0.2)
        return mutate_bytes(data, rng, header=8 + len(splatv_header(data)) + 256)

    outcomes = run_mutations(tmp_path, "scene.splatv", source, mutate, check_splatv)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes  # both outcomes were exercised


def test_random_mutations_of_mv4d_safetensors_files(tmp_path):
    source = safetensors_bytes(tmp_path)
    header_length = struct.unpack("<Q", source[:8])[0]

    def mutate(data, rng):
        if rng.random() < 0.4:  # rewrite the JSON header (tensor table and metadata) with a damaged one
            header = mutate_tokens(data[8:8 + header_length].decode(), rng).encode("utf-8", errors="surrogatepass")
            return struct.pack("<Q", len(header)) + header + data[8 + header_length:]
        return mutate_bytes(data, rng, header=8 + header_length)

    outcomes = run_mutations(tmp_path, "scene.mv4d.safetensors", source, mutate, check_safetensors)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes


def test_random_mutations_of_ply_files(tmp_path):
    source = ply_bytes(tmp_path)
    header = source[:source.index(b"end_header\n")].decode()

    def mutate(data, rng):
        if rng.random() < 0.4:
            return ply_with_header(data, mutate_tokens(header, rng))
        return mutate_bytes(data, rng, header=len(header) + 64)

    outcomes = run_mutations(tmp_path, "frame_0003.ply", source, mutate, check_ply)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes


def test_random_mutations_of_pose_files(tmp_path):
    source = pose_bytes(tmp_path)

    def mutate(data, rng):
        if rng.random() < 0.7:
            return mutate_tokens(data.decode(), rng).encode("utf-8", errors="surrogatepass")
        return mutate_bytes(data, rng, header=len(data))

    outcomes = run_mutations(tmp_path, "trajectory.txt", source, mutate, check_pose)
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 10, outcomes


# -- structured cases: .splatv ---------------------------------------------------------------------------------

def splatv_case(tmp_path, header=None, texture=None, raw=None):
    source = splatv_bytes(tmp_path)
    if raw is not None:
        data = raw(source)
    else:
        chunks = json.loads(splatv_header(source))
        text = header(chunks) if header else json.dumps(chunks)
        data = splatv_with_header(source, text if isinstance(text, str) else json.dumps(text))
        if texture is not None:
            data = texture(data)
    path = tmp_path / "case.splatv"
    path.write_bytes(data)
    return path


def set_word(index: int, word: int, value: int):
    """Texture word `word` of Gaussian `index` set to `value` (a raw uint32)."""
    def change(data: bytes) -> bytes:
        start = 8 + struct.unpack("<II", data[:8])[1] + 64 * index + 4 * word
        return data[:start] + struct.pack("<I", value) + data[start + 4:]
    return change


SPLATV_CASES = {
    # what the issue found raw: UnicodeDecodeError, JSONDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError
    "header not UTF-8": (dict(raw=lambda d: struct.pack("<II", MAGIC, 4) + b"\xff\xfe\x00[" + d[8 + struct.unpack("<II", d[:8])[1]:]),
                         "not UTF-8 JSON"),
    "header not JSON": (dict(header=lambda c: "[{not json"), "not UTF-8 JSON"),
    "header nested too deep": (dict(header=lambda c: "[" * 100000 + "]" * 100000), "not UTF-8 JSON"),
    "header an object": (dict(header=lambda c: c[0]), "is a JSON dict, not the list of chunks"),
    "header a number": (dict(header=lambda c: 7), "is a JSON int"),
    "chunks not objects": (dict(header=lambda c: ["splat", 3]), "no 'splat' chunk"),
    "no splat chunk": (dict(header=lambda c: [{"type": "other"}]), "no 'splat' chunk"),
    "size missing": (dict(header=lambda c: [{k: v for k, v in c[0].items() if k != "size"}]), "size = None"),
    "size a string": (dict(header=lambda c: [{**c[0], "size": "65536"}]), "size = '65536'"),
    "size a boolean": (dict(header=lambda c: [{**c[0], "texheight": True}]), "texheight = True"),
    "size negative": (dict(header=lambda c: [{**c[0], "texwidth": -4096}]), "texwidth = -4096"),
    "texture size mismatch": (dict(header=lambda c: [{**c[0], "texwidth": 1000}]), "does not hold"),
    "texture far beyond the file": (dict(header=lambda c: [{**c[0], "texheight": 10**9, "size": 4096 * 10**9 * 16}]), "truncated"),
    "cameras not a list": (dict(header=lambda c: [{**c[0], "cameras": {"a": 1}}]), "'cameras' that are not a list"),
    "header length beyond the file": (dict(raw=lambda d: struct.pack("<II", MAGIC, 2**31) + d[8:]), "header but holds"),
    "too short": (dict(raw=lambda d: d[:5]), "too short"),
    "wrong magic": (dict(raw=lambda d: struct.pack("<I", 0x1234) + d[4:]), "not .splatv's"),
    "truncated texture": (dict(raw=lambda d: d[:-100]), "truncated"),
    "NaN position": (dict(texture=set_word(3, 1, 0x7FC00000)), "Gaussian 3 has a NaN or infinite positions"),
    "infinite half scale": (dict(texture=set_word(5, 5, 0x3C007C00)), "Gaussian 5 has a NaN or infinite scales"),
    "negative scale": (dict(texture=set_word(2, 6, 0xBC00)), "Gaussian 2 has a negative scales"),
    "NaN motion": (dict(texture=set_word(1, 9, 0x7E00)), "Gaussian 1 has a NaN or infinite motion"),
    "negative temporal scale": (dict(texture=set_word(0, 15, 0xBC003800)), "Gaussian 0 has a negative time scale"),
}


@pytest.mark.parametrize("case", list(SPLATV_CASES))
def test_malformed_splatv_files_are_refused_naming_the_file_and_the_problem(case, tmp_path):
    spec, expected = SPLATV_CASES[case]
    path = splatv_case(tmp_path, **spec)
    assert check_splatv(path) is None
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        read_splatv(path)


def test_a_splatv_without_gaussians_loads_as_an_empty_scene(tmp_path):
    path = splatv_case(tmp_path, texture=lambda data: data[:8 + struct.unpack("<II", data[:8])[1]] + bytes(65536))
    gaussians, _ = check_splatv(path)
    assert gaussians.count == 0


# -- structured cases: .mv4d.safetensors -----------------------------------------------------------------------

def safetensors_case(tmp_path, change_tensors=lambda t: t, change_metadata=lambda m: m, raw=None):
    source = tmp_path / "source.mv4d.safetensors"
    source.write_bytes(safetensors_bytes(tmp_path))
    path = tmp_path / "case.mv4d.safetensors"
    if raw is not None:
        path.write_bytes(raw(source.read_bytes()))
        return path
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = change_tensors(dict(load_file(str(source))))
    save_file(tensors, str(path), metadata=change_metadata(metadata))
    return path


def replace(key, value):
    return lambda tensors: {**tensors, key: value}


def without(*keys, metadata=False):
    return lambda mapping: {k: v for k, v in mapping.items() if k not in keys}


MOTION = {"position_degree": 3, "fourier_terms": 2, "rotation_degree": 1, "temporal_opacity": True, "sh_degree": 1}
SAFETENSORS_CASES = {
    "not safetensors": (dict(raw=lambda d: b"not a safetensors file"), "is not a readable .safetensors file"),
    "empty": (dict(raw=lambda d: b""), "is not a readable .safetensors file"),
    "header size beyond the file": (dict(raw=lambda d: struct.pack("<Q", 2**40) + d[8:]), "is not a readable .safetensors file"),
    "truncated": (dict(raw=lambda d: d[: len(d) // 2]), "is not a readable .safetensors file"),
    "another format": (dict(change_metadata=lambda m: {**m, "format": "x"}), "is not an mv4d 4D file"),
    "motion missing": (dict(change_metadata=without("motion")), "its 'motion' metadata"),
    "motion not JSON": (dict(change_metadata=lambda m: {**m, "motion": "{oops"}), "its 'motion' metadata"),
    "motion a list": (dict(change_metadata=lambda m: {**m, "motion": "[3, 2]"}), "its 'motion' metadata"),
    "motion field missing": (dict(change_metadata=lambda m: {**m, "motion": json.dumps({k: v for k, v in MOTION.items() if k != "sh_degree"})}),
                             "its 'motion' metadata"),
    "motion field null": (dict(change_metadata=lambda m: {**m, "motion": json.dumps({**MOTION, "sh_degree": None})}), "its 'motion' metadata"),
    "motion degree a string": (dict(change_metadata=lambda m: {**m, "motion": json.dumps({**MOTION, "position_degree": "3"})}), "its 'motion' metadata"),
    "motion flag an integer": (dict(change_metadata=lambda m: {**m, "motion": json.dumps({**MOTION, "temporal_opacity": 1})}), "its 'motion' metadata"),
    "motion degree out of range": (dict(change_metadata=lambda m: {**m, "motion": json.dumps({**MOTION, "sh_degree": 9})}),
                                   "its motion setting sh_degree: 9 is out of range"),
    "motion nested too deep": (dict(change_metadata=lambda m: {**m, "motion": "[" * 100000}), "its 'motion' metadata"),
    "camera_size missing": (dict(change_metadata=without("camera_size")), "'camera_size' metadata '' is not HEIGHTxWIDTH"),
    "camera_size garbage": (dict(change_metadata=lambda m: {**m, "camera_size": "axb"}), "is not HEIGHTxWIDTH"),
    "camera_size zero": (dict(change_metadata=lambda m: {**m, "camera_size": "0x48"}), "is not HEIGHTxWIDTH"),
    "intrinsics missing": (dict(change_tensors=without("cameras.intrinsics")), "has no tensor 'cameras.intrinsics'"),
    "intrinsics of the wrong shape": (dict(change_tensors=replace("cameras.intrinsics", torch.eye(3))), "tensor 'cameras.intrinsics' has shape (3, 3)"),
    "cameras not rigid": (dict(change_tensors=replace("cameras.world_to_camera", 2 * torch.eye(4).repeat(3, 1, 1).double())), "its cameras are unusable"),
    "frame_times missing": (dict(change_tensors=without("frame_times")), "has no tensor 'frame_times'"),
    "frame_times 0-d": (dict(change_tensors=replace("frame_times", torch.tensor(0.5))), "tensor 'frame_times' has shape ()"),
    "frame_times 2-d": (dict(change_tensors=replace("frame_times", torch.zeros(2, 2))), "tensor 'frame_times' has shape (2, 2)"),
    "frame_times outside [0, 1]": (dict(change_tensors=replace("frame_times", torch.tensor([0.0, 1.5]))), "do not increase within [0, 1]"),
    "frame_times decreasing": (dict(change_tensors=replace("frame_times", torch.tensor([0.8, 0.2]))), "do not increase within [0, 1]"),
    "frame_times empty": (dict(change_tensors=replace("frame_times", torch.zeros(0))), "do not increase within [0, 1]"),
    "NaN frame time": (dict(change_tensors=replace("frame_times", torch.tensor([0.0, float("nan")]))), "holds NaN or infinite values"),
    "NaN means": (dict(change_tensors=lambda t: {**t, "param.means": t["param.means"].index_fill(0, torch.tensor([4]), float("nan"))}),
                  "tensor 'param.means' holds NaN or infinite values"),
    "integer parameter": (dict(change_tensors=lambda t: {**t, "param.scales": t["param.scales"].to(torch.int32)}), "'param.scales' is int32"),
    "boolean parameter": (dict(change_tensors=lambda t: {**t, "param.opacities": t["param.opacities"] > 0}), "'param.opacities' is bool"),
    "float8 parameter": (dict(change_tensors=lambda t: {**t, "param.sh0": t["param.sh0"].to(torch.float8_e4m3fn)}), "'param.sh0' is float8_e4m3fn"),
    "0-d parameter": (dict(change_tensors=replace("param.means", torch.tensor(1.0))), "tensor 'param.means' has shape ()"),
    "parameter of the wrong shape": (dict(change_tensors=lambda t: {**t, "param.quats": t["param.quats"][:, :3].contiguous()}),
                                     "its Gaussians do not match its motion settings: quats has shape (40, 3)"),
    "a parameter missing": (dict(change_tensors=without("param.shN")), "its Gaussians do not match its motion settings"),
    "an unknown parameter": (dict(change_tensors=replace("param.extra", torch.zeros(40))), "its Gaussians do not match its motion settings"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_malformed_mv4d_safetensors_files_are_refused_naming_the_file_and_the_problem(case, tmp_path):
    spec, expected = SAFETENSORS_CASES[case]
    path = safetensors_case(tmp_path, **spec)
    assert check_safetensors(path) is None
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        load_splats4d(path)


def test_half_precision_parameters_load_as_float32(tmp_path):
    path = safetensors_case(tmp_path, change_tensors=lambda t: {k: v.half() if k.startswith("param.") else v for k, v in t.items()})
    scene = check_safetensors(path)
    assert scene is not None and scene.gaussians.params["means"].dtype == torch.float32


# -- structured cases: .ply ------------------------------------------------------------------------------------

def ply_case(tmp_path, header=None, raw=None):
    source = ply_bytes(tmp_path)
    text = source[:source.index(b"end_header\n")].decode()
    data = raw(source) if raw else ply_with_header(source, header(text))
    path = tmp_path / "case.ply"
    path.write_bytes(data)
    return path


PLY_CASES = {
    "element vertex -1": (dict(header=lambda h: h.replace("element vertex 40", "element vertex -1")), "is not 'element vertex <count>'"),
    "element vertex not a number": (dict(header=lambda h: h.replace("element vertex 40", "element vertex many")), "is not 'element vertex <count>'"),
    "count beyond the data": (dict(header=lambda h: h.replace("element vertex 40", "element vertex 4000000000")), "declares 4000000000 vertices"),
    "property without a name": (dict(header=lambda h: h.replace("property float opacity", "property float")), "unsupported PLY property"),
    "property of an unknown type": (dict(header=lambda h: h.replace("property float opacity", "property quad opacity")), "unsupported PLY property"),
    "list property": (dict(header=lambda h: h.replace("property float nx", "property list uchar int nx")), "unsupported PLY property"),
    "property twice": (dict(header=lambda h: h.replace("property float ny", "property float nx")), "property 'nx' is declared twice"),
    "ascii format": (dict(header=lambda h: h.replace("binary_little_endian", "ascii")), "not binary_little_endian 1.0"),
    "big-endian format": (dict(header=lambda h: h.replace("binary_little_endian", "binary_big_endian")), "not binary_little_endian 1.0"),
    "no end_header": (dict(raw=lambda d: d.replace(b"end_header", b"end_headr")), "has no 'end_header' line"),
    "not a PLY": (dict(raw=lambda d: b"solid cube\n" + d), "is not a PLY file"),
    "empty": (dict(raw=lambda d: b""), "is not a PLY file"),
    "another element first": (dict(header=lambda h: h.replace("element vertex", "element face 3\nproperty float q\nelement vertex")),
                              "its first element is 'element face 3'"),
    "no vertex element": (dict(header=lambda h: h.split("element vertex")[0]), "declares no vertex element"),
    "a property missing": (dict(header=lambda h: h.replace("property float rot_3\n", "")), "lacks the Gaussian properties ['rot_3']"),
    "an odd f_rest count": (dict(header=lambda h: h.replace("property float f_rest_8\n", "")), "has 8 f_rest_* properties"),
    "a stray header line": (dict(header=lambda h: h.replace("element vertex 40", "element vertex 40\nwhatever 3")), "is not a PLY header line"),
    "NaN value": (dict(raw=lambda d: d[:d.index(b"end_header\n") + 11] + struct.pack("<f", float("nan")) + d[d.index(b"end_header\n") + 15:]),
                  "has NaN or infinite values in x, y, z"),
}


@pytest.mark.parametrize("case", list(PLY_CASES))
def test_malformed_ply_files_are_refused_naming_the_file_and_the_problem(case, tmp_path):
    spec, expected = PLY_CASES[case]
    path = ply_case(tmp_path, **spec)
    assert check_ply(path) is None
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        read_ply(path)


def test_plys_with_comments_later_elements_or_no_vertex_load(tmp_path):
    commented = ply_case(tmp_path, header=lambda h: h.replace("format binary_little_endian 1.0", "format binary_little_endian 1.0\ncomment made by x\nobj_info y"))
    assert len(check_ply(commented).means) == 40
    later = ply_case(tmp_path, raw=lambda d: d.replace(b"end_header\n", b"element camera 0\nproperty float fx\nend_header\n"))
    assert len(check_ply(later).means) == 40
    empty = ply_case(tmp_path, raw=lambda d: d[:d.index(b"end_header\n") + 11].replace(b"element vertex 40", b"element vertex 0"))
    assert len(check_ply(empty).means) == 0


# -- structured cases: pose files ------------------------------------------------------------------------------

POSE_LINE = "0 0.5 0.888 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"
POSE_CASES = {
    "empty": (b"", "the file is empty"),
    "only the URL line": (b"https://example.com/clip\n", "no camera lines"),
    "too few numbers": (f"url\n{POSE_LINE[:-2]}\n".encode(), "line 2: expected 19 numbers"),
    "a word among the numbers": (f"url\n{POSE_LINE.replace('0.888', 'abc')}\n".encode(), "line 2: 'abc' is not a number"),
    "NaN": (f"url\n{POSE_LINE}\n{POSE_LINE.replace('0.888', 'nan')}\n".encode(), "line 3: contains NaN or infinity"),
    "not UTF-8": (b"url\n\xff\xfe" + POSE_LINE.encode(), "is not UTF-8 text"),
    "a NUL byte": (f"url\n{POSE_LINE}\x00\n".encode(), "holds a NUL byte"),
    "not a rotation": (f"url\n{POSE_LINE.replace(' 1 0 0 0 0 1 0 0 0 0 1 0', ' 2 0 0 0 0 1 0 0 0 0 1 0')}\n".encode(), "line 2: the camera has a rotation part"),
    "zero focal length": (f"url\n{POSE_LINE.replace('0.888', '0')}\n".encode(), "line 2: the camera has a focal length <= 0"),
}


@pytest.mark.parametrize("case", list(POSE_CASES))
def test_malformed_pose_files_are_refused_naming_the_file_and_the_problem(case, tmp_path):
    data, expected = POSE_CASES[case]
    path = tmp_path / "trajectory.txt"
    path.write_bytes(data)
    assert check_pose(path) is None
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        load_pose_file(path, 64, 64)


def test_pose_files_with_windows_line_ends_and_blank_lines_load(tmp_path):
    path = tmp_path / "trajectory.txt"
    path.write_bytes(f"url\r\n\r\n{POSE_LINE}\r\n{POSE_LINE}\r\n".encode())
    assert len(check_pose(path).cameras) == 2
