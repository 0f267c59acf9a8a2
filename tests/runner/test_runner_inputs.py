"""Finding and checking the batch's inputs before anything runs."""

import pytest
from runner_helpers import write_png

from mv4d.runner.errors import RunnerError
from mv4d.runner.inputs import TAKES_IMAGE, TAKES_MULTIVIEW, TAKES_VIDEO, discover_inputs, read_list_file, sniff_format

HEADS = {
    "PNG": b"\x89PNG\r\n\x1a\n\0\0\0\r",
    "JPEG": b"\xff\xd8\xff\xe0\0\x10JFIF",
    "WEBP": b"RIFF\x24\0\0\0WEBPVP8 ",
    "GIF": b"GIF89a\x01\0\x01\0",
    "BMP": b"BM\x36\0\0\0\0\0",
    "TIFF": b"II*\0\x08\0\0\0",
    "MP4/MOV": b"\0\0\0\x18ftypmp42",
    "WebM/MKV": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81",
    "AVI": b"RIFF\x24\0\0\0AVI LIST",
}


@pytest.mark.parametrize("expected", sorted(HEADS))
def test_formats_are_recognised_by_content(expected):
    assert sniff_format(HEADS[expected]) == expected


@pytest.mark.parametrize("head", [b"hello world\n", b"%PDF-1.7", b"RIFF\x24\0\0\0WAVEfmt ", b"\0\0\0\0"])
def test_other_content_is_not_recognised(head):
    assert sniff_format(head) is None


def test_a_folder_stands_for_its_images_in_name_order(tmp_path):
    for name in ("view_10.png", "view_2.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(HEADS["PNG"] if name.endswith("png") else HEADS["JPEG"] if name.endswith("jpg") else b"text")
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "deeper.png")
    items = discover_inputs([str(tmp_path)], TAKES_IMAGE)
    assert [item.path.name for item in items] == ["view_2.jpg", "view_10.png"]
    assert all(item.error is None and item.files == [item.path] for item in items)


def test_a_text_file_named_png_is_refused_with_the_reason(tmp_path):
    fake_png = tmp_path / "photo.png"
    fake_png.write_text("this is not a picture")
    [item] = discover_inputs([str(fake_png)], TAKES_IMAGE)
    assert str(fake_png) in item.error and "not an image" in item.error and "PNG, JPEG" in item.error
    assert "b'this is '" in item.error


def test_missing_and_empty_inputs_are_refused(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing, empty_item = discover_inputs([str(tmp_path / "nowhere.png"), str(empty)], TAKES_IMAGE)
    assert "no such file or folder" in missing.error and str(tmp_path / "nowhere.png") in missing.error
    assert "empty" in empty_item.error


def test_a_video_where_images_are_taken_says_what_it_is(tmp_path):
    clip = tmp_path / "clip.png"
    clip.write_bytes(HEADS["MP4/MOV"])
    [item] = discover_inputs([str(clip)], TAKES_IMAGE)
    assert "it is MP4/MOV" in item.error and "takes images" in item.error


def test_video_inputs(tmp_path):
    for name, head in (("a.mp4", "MP4/MOV"), ("b.webm", "WebM/MKV"), ("c.avi", "AVI"), ("d.gif", "GIF"), ("e.png", "PNG")):
        (tmp_path / name).write_bytes(HEADS[head])
    items = discover_inputs([str(tmp_path)], TAKES_VIDEO)
    assert [item.path.name for item in items] == ["a.mp4", "b.webm", "c.avi", "d.gif"]  # e.png: not a video file
    assert all(item.error is None for item in items)


def test_each_folder_is_one_multiview_item(tmp_path):
    good, single, broken = tmp_path / "good", tmp_path / "single", tmp_path / "broken"
    for index in range(3):
        write_png(good / f"view_{index}.png")
    write_png(single / "view_0.png")
    write_png(broken / "view_0.png")
    (broken / "view_1.png").write_text("oops")
    lone_file = write_png(tmp_path / "lone.png")
    items = discover_inputs([str(good), str(single), str(broken), str(lone_file)], TAKES_MULTIVIEW)
    assert items[0].error is None and [file.name for file in items[0].files] == ["view_0.png", "view_1.png", "view_2.png"]
    assert "at least 2 images" in items[1].error and "holds 1" in items[1].error
    assert str(broken / "view_1.png") in items[2].error and "not an image" in items[2].error
    assert "this is a file" in items[3].error


def test_an_input_given_twice_is_one_item(tmp_path):
    image = write_png(tmp_path / "a.png")
    assert len(discover_inputs([str(image), str(tmp_path), str(tmp_path / "." / "a.png")], TAKES_IMAGE)) == 1


def test_list_file_paths_are_relative_to_it_and_skip_comments(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "inputs.txt"
    listing.write_text(f"# my batch\n../a.png\n\n{tmp_path / 'b.png'}\n   # indented comment\n")
    assert read_list_file(listing) == [str(tmp_path / "lists" / "../a.png"), str(tmp_path / "b.png")]
    with pytest.raises(RunnerError, match="cannot read the --list file"):
        read_list_file(tmp_path / "missing.txt")
