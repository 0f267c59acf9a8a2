"""The 4D player (web/mv4d_player.js) on a large scene in headless Chromium: what can be measured without a GPU.

A random dynamic scene (default motion model: cubic + 2 Fourier terms, rotation, temporal opacity, SH degree 1)
of --gaussians Gaussians and --frames frames, seen from a 21-view orbit at --size px, goes into a standalone
page (the player as MV4D Save 4D writes it) opened from file://. Reported as one JSON line:

- file and page sizes; from opening the page: the scene parsed and on the GPU (page_ready_s: reading the page,
  base64, parsing, texture upload), the first depth order back from the worker (first_sort_s: its preparation
  and first sort), the first picture finished (first_picture_s, as the test machine sees it: one software draw);
- the worker's sort time (depth and opacity at the time for every Gaussian, culling, radix sort), per frame
  while playing through every frame and per step while orbiting, median and max, with every Gaussian drawn and
  with the --budget;
- the draw time with SwiftShader, Chromium's CPU implementation of WebGL: orders of magnitude slower than any
  GPU, so it only shows that drawing scales with the Gaussians drawn, not how fast a laptop draws.

    python -P bench/player.py                          # 200k Gaussians, 25 frames, 576 px
    python -P bench/player.py --gaussians 50000 --budget 20000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "mv4d" not in sys.modules:  # the repository root is the package mv4d
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mv4d"])
sys.path.insert(0, str(ROOT / "tests" / "host"))  # the CDP-driven Chromium of the browser tests

from mv4d.kernels.cameras import orbit_rig  # noqa: E402
from mv4d.kernels.splats.model import MotionConfig, Splats4D, new_gaussians  # noqa: E402
from mv4d.kernels.splats.player_file import encode_player_file  # noqa: E402
from mv4d.kernels.splats.player_page import player_page  # noqa: E402
from mv4d_browser import Chromium, find_chromium  # noqa: E402

# The worker alone (no drawing in between): a sort for every frame at the first camera, then for 25 small orbit
# steps; the worker's own timing of each. The same messages the player sends.
SORT_TIMES = """(async (frames) => {
    const p = window.mv4dPlayer, worker = p.worker, playerHandler = worker.onmessage;
    const sort = () => new Promise((resolve) => {
        worker.onmessage = ({data}) => resolve(data);
        worker.postMessage(p.sortMessage('bench'));
    });
    const playing = [], orbiting = [];
    let last;
    for (let frame = 0; frame < frames; frame++) { p.state.frame = frame; last = await sort(); playing.push(last.ms); }
    p.state.frame = 0;
    for (let step = 0; step < 25; step++) { p.camera.orbit(6, 1); last = await sort(); orbiting.push(last.ms); }
    worker.onmessage = playerHandler;
    p.resetView();
    return {playing, orbiting, drawn: last.drawn};
})(%d)"""

# Draws of the settled picture, each until the GPU (here SwiftShader) has finished it.
DRAW_TIMES = """(async (repeats) => {
    const p = window.mv4dPlayer, gl = p.renderer.gl, pixel = new Uint8Array(4), times = [];
    await p.settled(120000);
    for (let i = 0; i < repeats; i++) {
        const started = performance.now();
        p.draw();
        gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, pixel);
        times.push(performance.now() - started);
    }
    return times;
})(%d)"""


def random_scene(count: int, frames: int, size: int, seed: int = 0) -> Splats4D:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, 3, generator=generator)
    means = directions / directions.norm(dim=-1, keepdim=True) * torch.rand(count, 1, generator=generator) ** (1 / 3) * 0.6
    gaussians = new_gaussians(means, torch.rand(count, 3, generator=generator), 0.004 + 0.012 * torch.rand(count, generator=generator),
                              MotionConfig(), opacity=0.5)
    for name in ("position_motion", "rotation_motion", "shN"):
        gaussians.params[name] = 0.03 * torch.randn(gaussians.params[name].shape, generator=generator)
    gaussians.params["quats"] = torch.randn(count, 4, generator=generator)
    gaussians.params["opacities"] = torch.randn(count, generator=generator)
    gaussians.params["opacity_center"] = torch.rand(count, generator=generator)
    gaussians.params["opacity_log_width"] = math.log(0.3) + 0.5 * torch.randn(count, generator=generator)
    return Splats4D(gaussians, torch.linspace(0, 1, frames), orbit_rig(21, 10.0, 2.0, 33.8, size, size))


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values), 2), "max_ms": round(max(values), 2)}


def measure(browser: Chromium, page: Path, frames: int, budget: int, draws: int) -> dict:
    browser.new_page()
    started = time.monotonic()
    browser.navigate(page.as_uri())
    browser.wait_for("window.mv4dPlayer && ['ready', 'error'].includes(mv4dPlayer.state.status)", 600, "the page loaded")
    if budget:
        browser.evaluate(f"mv4dPlayer.options.maxGaussians = {budget}, mv4dPlayer.touch()")
    browser.evaluate("mv4dPlayer.settled(600000)", timeout=600)
    # until the first picture is finished (SwiftShader draws on the CPU, beside the sorts measured next)
    browser.evaluate("mv4dPlayer.renderer.gl.readPixels(0, 0, 1, 1, 6408, 5121, new Uint8Array(4))", timeout=600)
    load_s = time.monotonic() - started
    state = browser.evaluate("mv4dPlayer.state")
    if state["status"] != "ready":
        raise RuntimeError(f"the player failed: {state['error']}")
    sorts = browser.evaluate(SORT_TIMES % frames, timeout=1200)
    draw = browser.evaluate(DRAW_TIMES % draws, timeout=1200)
    return {"page_ready_s": round(state["readyAt"] / 1000, 2), "first_sort_s": round(state["firstOrderAt"] / 1000, 2),
            "first_picture_s": round(load_s, 2), "drawn": sorts["drawn"],
            "sort_playing": summary(sorts["playing"]), "sort_orbiting": summary(sorts["orbiting"]),
            "draw_swiftshader": summary(draw)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=200_000)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576, help="canvas size in pixels (square)")
    parser.add_argument("--budget", type=int, default=100_000, help="Gaussians drawn at most in the second run")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium found ($CHROMIUM, chromium, chromium-browser, google-chrome on PATH)")
    scene = random_scene(args.gaussians, args.frames, args.size)
    data = encode_player_file(scene)
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "scene.html"
        page.write_text(player_page(data, "bench"), encoding="utf-8")
        # the window is the canvas size plus the controls; the player shows the scene's first camera
        with Chromium(chromium, width=args.size, height=args.size + 60, start_timeout=120) as browser:
            version = browser.evaluate("navigator.userAgent")
            every = measure(browser, page, args.frames, 0, args.draws)
            budgeted = measure(browser, page, args.frames, args.budget, args.draws)
        result = {
            "bench": "player", "gaussians": args.gaussians, "frames": args.frames, "size": args.size,
            "file_mb": round(len(data) / 2**20, 2), "page_mb": round(page.stat().st_size / 2**20, 2),
            "all": every, f"budget_{args.budget}": budgeted, "browser": version.split(") ")[-1],
            "webgl": "SwiftShader (CPU)",
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
