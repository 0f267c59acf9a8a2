"""A standalone HTML page that plays one scene from disk: open it from the file manager (file://), no server.

Browsers refuse a file:// page almost every way of reading another file (fetch, XMLHttpRequest, module
imports, Worker URLs), so the page holds everything itself: the player's module source (web/mv4d_player.js)
inline, and the scene as a .mv4dweb file in base64 inside a non-executed <script> element. The player starts
its sort worker from a Blob, which file:// pages may do. The page is about 4/3 of the .mv4dweb's size.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..errors import InvalidInput
from ..files import atomic_file
from .model import Splats4D
from .player_file import encode_player_file

PLAYER_SOURCE = Path(__file__).resolve().parents[2] / "web" / "mv4d_player.js"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>html, body {{ margin: 0; height: 100%; background: #202020; }} #mv4d-player {{ position: fixed; inset: 0; }}</style>
</head>
<body>
<div id="mv4d-player"></div>
<script type="application/octet-stream" id="mv4d-scene">{data}</script>
<script type="module">
{player}
// -- the page: decode the embedded scene and play it
const text = document.getElementById("mv4d-scene").textContent.trim();
const binary = atob(text);
const bytes = new Uint8Array(binary.length);
for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
const player = new Mv4dPlayer(document.getElementById("mv4d-player"));
window.mv4dPlayer = player;
player.loadBuffer(bytes.buffer, {name});
</script>
</body>
</html>
"""


def player_source() -> str:
    if not PLAYER_SOURCE.is_file():
        raise InvalidInput("player_page", f"the player's source {PLAYER_SOURCE} is missing",
                           "reinstall mv4d from its repository (the web/ folder is part of the pack)")
    source = PLAYER_SOURCE.read_text(encoding="utf-8")
    if "</script" in source.lower():
        raise InvalidInput("player_page", "the player's source contains '</script', which would end the page's script",
                           "write it as '<\\/script' in web/mv4d_player.js")
    return source


def player_page(data: bytes, title: str) -> str:
    """The page for one .mv4dweb file's bytes."""
    return PAGE.format(title=html.escape(title), data=base64.b64encode(data).decode("ascii"), player=player_source(),
                       name=json.dumps(title).replace("<", "\\u003c"))


def write_player_page(path: str | Path, scene: Splats4D, title: str, background=(1.0, 1.0, 1.0), fps: float = 12.0) -> Path:
    page = player_page(encode_player_file(scene, background, fps), title)
    with atomic_file(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return Path(path)
