"""A small stand-in for ComfyUI's HTTP API (the routes of its server.py the batch runner uses), served on
127.0.0.1 from a thread of its own, recording what clients asked of it.

It "runs" a prompt by walking its nodes with a few progress events; SaveImage and MV4D_Save4D nodes write
output files derived from the uploaded input. An input holding b"FAIL" fails at the LoadImage node, as a file
ComfyUI cannot decode would; one holding b"REJECT" (or not uploaded) fails POST /prompt's validation. With
hold=True every prompt runs until it is interrupted.

A test can make it misbehave: `tamper[route]` (route one of upload, prompt, history, queue, object_info) turns
the answer it would give into another (a wrong shape, say); `hang_view=True` makes GET /view never answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from aiohttp import web

OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}}},
    "LoadVideo": {"input": {"required": {"file": ["COMBO", {"options": [], "video_upload": True}]}}},
    "MV4D_LoadMultiviewImages": {"input": {"required": {
        "folder": ["COMBO", {"options": []}], "size": ["INT", {"default": 576}],
        "input_view": ["COMBO", {"options": ["last (SV3D order: input view at 360 deg)", "first"]}]}}},
    "PrimitiveInt": {"input": {"required": {"value": ["INT", {"default": 0}]}}},
    "ImageScale": {"input": {"required": {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear", "area"]],
                                          "width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                                          "crop": [["disabled", "center"]]}}},
    "ImageInvert": {"input": {"required": {"image": ["IMAGE"]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}}},
    "EmptyImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}]}}},
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": ["COMBO", {"options": ["sd15.safetensors"]}]}}},
    "LoraLoader": {"input": {"required": {"model": ["MODEL"], "lora_name": [["detail.safetensors"]], "strength_model": ["FLOAT", {}]}}},
    "KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {}], "steps": ["INT", {}],
                                        "sampler_name": [["euler", "dpmpp_2m"]], "scheduler": ["COMBO", {"options": ["karras", "normal"]}]}}},
    "MV4D_Save4D": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
}


def image_workflow(prefix: str = "batch") -> dict:
    """LoadImage -> ImageScale (width and height from a PrimitiveInt titled size) -> SaveImage and MV4D_Save4D."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 64}, "_meta": {"title": "size"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": ["2", 0],
                                                     "height": ["2", 0], "crop": "disabled"}, "_meta": {"title": "Scale"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}, "_meta": {"title": "Save"}},
        "5": {"class_type": "MV4D_Save4D", "inputs": {"images": ["3", 0], "filename_prefix": prefix}, "_meta": {"title": "Save 4D"}},
    }


class FakeComfyUI:
    def __init__(self, object_info: dict | None = None, hold: bool = False, websocket: bool = True, steps: int = 3,
                 step_seconds: float = 0.01, port: int = 0, tamper: dict | None = None, hang_view: bool = False):
        self.port = port  # 0: any free one
        self.object_info = object_info if object_info is not None else OBJECT_INFO
        self.hold = hold
        self.websocket_enabled = websocket
        self.steps = steps
        self.step_seconds = step_seconds
        self.tamper = tamper or {}
        self.hang_view = hang_view
        self.views_asked = 0
        self.uploads: dict[str, bytes] = {}        # "subfolder/name" -> content
        self.received: list[dict] = []             # every accepted POST /prompt: {prompt_id, client_id, prompt}
        self.deleted: list[str] = []               # ids asked for by POST /queue {"delete"}
        self.interrupts: list[dict] = []           # bodies of POST /interrupt
        self.history: dict[str, dict] = {}
        self.pending: list[list] = []              # queue entries: [number, prompt_id, prompt, extra_data, outputs]
        self.running: list | None = None
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> content
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.number = 0
        self.counter = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    # -- lifetime ------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeComfyUI:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def shutdown(self) -> None:
        self.release.set()  # a hanging /view answers, so the server can stop
        self.executor_task.cancel()
        for socket in list(self.sockets.values()):
            await socket.close()  # else the server waits for clients to hang up
        await self.runner.cleanup()

    def serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.get("/ws", self.ws), web.get("/system_stats", self.system_stats), web.get("/object_info", self.get_object_info),
            web.post("/upload/image", self.upload), web.post("/prompt", self.post_prompt), web.get("/queue", self.get_queue),
            web.post("/queue", self.post_queue), web.post("/interrupt", self.interrupt), web.get("/history/{prompt_id}", self.get_history),
            web.get("/history", self.get_all_history), web.get("/view", self.view),
        ])
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.wake = asyncio.Event()
        self.interrupted = asyncio.Event()
        self.release = asyncio.Event()
        self.executor_task = self.loop.create_task(self.executor())
        self.ready.set()
        self.loop.run_forever()

    # -- what a test looks at -------------------------------------------------------------------------------

    def prompt_ids(self, client_id: str | None = None) -> list[str]:
        return [entry["prompt_id"] for entry in self.received if client_id is None or entry["client_id"] == client_id]

    def queued_ids(self) -> tuple[list[str], list[str]]:
        return ([self.running[1]] if self.running else []), [entry[1] for entry in self.pending]

    def wait_until(self, condition, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the fake server never reached the expected state")
            time.sleep(0.02)

    # -- routes ---------------------------------------------------------------------------------------------

    def reply(self, route: str, answer, status: int = 200):
        """The JSON answer of a route, as the test's tamper function (if any) turns it."""
        if route in self.tamper:
            answer = self.tamper[route](answer)
        return web.json_response(answer, status=status)

    async def ws(self, request):
        if not self.websocket_enabled:
            return web.Response(status=404)
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        self.sockets[client_id] = socket
        await socket.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": len(self.pending)}}, "sid": client_id}})
        async for _ in socket:
            pass
        self.sockets.pop(client_id, None)
        return socket

    async def system_stats(self, request):
        return web.json_response({"system": {"comfyui_version": "fake"}, "devices": []})

    async def get_object_info(self, request):
        return self.reply("object_info", self.object_info)

    async def upload(self, request):
        form = await request.post()
        image = form["image"]
        subfolder = form.get("subfolder", "")
        self.uploads[f"{subfolder}/{image.filename}" if subfolder else image.filename] = image.file.read()
        return self.reply("upload", {"name": image.filename, "subfolder": subfolder, "type": form.get("type", "input")})

    async def post_prompt(self, request):
        body = await request.json()
        prompt = body["prompt"]
        missing = [node["class_type"] for node in prompt.values() if node["class_type"] not in self.object_info]
        if missing:
            return web.json_response({"error": {"type": "invalid_prompt", "message": f"Cannot execute because node {missing[0]} does not exist.",
                                                "details": "", "extra_info": {}}, "node_errors": {}}, status=400)
        node_errors = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "LoadImage" and b"REJECT" in self.uploads.get(node["inputs"]["image"], b"REJECT"):
                node_errors[node_id] = {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                                                    "details": f"image - Invalid image file: {node['inputs']['image']}",
                                                    "extra_info": {"input_name": "image"}}],
                                        "dependent_outputs": [], "class_type": "LoadImage"}
        if node_errors:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                                                "details": "", "extra_info": {}}, "node_errors": node_errors}, status=400)
        prompt_id = str(uuid.uuid4())
        self.number += 1
        client_id = body.get("client_id")
        self.received.append({"prompt_id": prompt_id, "client_id": client_id, "prompt": prompt})
        self.pending.append([self.number, prompt_id, prompt, {"client_id": client_id}, []])
        self.wake.set()
        return self.reply("prompt", {"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    async def get_queue(self, request):
        return self.reply("queue", {"queue_running": [self.running] if self.running else [], "queue_pending": self.pending})

    async def post_queue(self, request):
        body = await request.json()
        for prompt_id in body.get("delete", []):
            self.deleted.append(prompt_id)
            self.pending = [entry for entry in self.pending if entry[1] != prompt_id]
        return web.Response(status=200)

    async def interrupt(self, request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.interrupts.append(body)
        if self.running and body.get("prompt_id") in (None, self.running[1]):
            self.interrupted.set()
        return web.Response(status=200)

    async def get_history(self, request):
        prompt_id = request.match_info["prompt_id"]
        return self.reply("history", {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def get_all_history(self, request):
        return web.json_response(self.history)

    async def view(self, request):
        self.views_asked += 1
        if self.hang_view:
            await self.release.wait()
        # as ComfyUI's server.py reads it: a " [temp]"-style annotation picks the folder, only the base name counts
        kind, name = request.query.get("type", "output"), request.query.get("filename", "")
        for suffix, annotated in (("[output]", "output"), ("[input]", "input"), ("[temp]", "temp")):
            if name.endswith(suffix):
                kind, name = annotated, name[:-len(suffix) - 1]
                break
        key = (kind, request.query.get("subfolder", ""), name.rsplit("/", 1)[-1])
        if key not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[key], content_type="application/octet-stream")

    # -- the executor ---------------------------------------------------------------------------------------

    async def send(self, client_id: str | None, kind: str, data: dict) -> None:
        socket = self.sockets.get(client_id)
        if socket is not None and not socket.closed:
            await socket.send_json({"type": kind, "data": data})

    async def executor(self) -> None:
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            self.running = self.pending.pop(0)
            self.interrupted.clear()
            try:
                await self.execute(*self.running[1:4])
            finally:
                self.running = None

    async def execute(self, prompt_id: str, prompt: dict, extra: dict) -> None:
        client_id = extra.get("client_id")
        messages = []

        async def event(kind: str, data: dict, keep: bool = True) -> None:
            data = {**data, "prompt_id": prompt_id}
            if keep:
                messages.append([kind, {**data, "timestamp": int(time.time() * 1000)}])
            await self.send(client_id, kind, data)

        await event("execution_start", {})
        loaded = b""
        outputs, status = {}, "success"
        for node_id, node in prompt.items():
            await event("executing", {"node": node_id, "display_node": node_id}, keep=False)
            for step in range(self.steps):
                while True:
                    if self.interrupted.is_set():
                        await event("execution_interrupted", {"node_id": node_id, "node_type": node["class_type"], "executed": []})
                        status = "error"
                        break
                    await event("progress", {"value": step + 1, "max": self.steps, "node": node_id}, keep=False)
                    await asyncio.sleep(self.step_seconds)
                    if not self.hold:
                        break
                if status == "error":
                    break
            if status == "error":
                break
            if node["class_type"] == "LoadImage":
                loaded = self.uploads.get(node["inputs"]["image"], b"")
                if b"FAIL" in loaded:
                    await event("execution_error", {"node_id": node_id, "node_type": "LoadImage", "executed": [],
                                                    "exception_message": "cannot identify image file\n", "exception_type": "PIL.UnidentifiedImageError",
                                                    "traceback": ["..."], "current_inputs": {}, "current_outputs": {}})
                    status = "error"
                    break
            elif node["class_type"] in ("SaveImage", "MV4D_Save4D"):
                outputs[node_id] = self.save(node, loaded)
        if status == "success":
            await event("execution_success", {})
        self.history[prompt_id] = {"prompt": [0, prompt_id, prompt, extra, []], "outputs": outputs, "meta": {},
                                   "status": {"status_str": status, "completed": status == "success", "messages": messages}}
        await event("executing", {"node": None}, keep=False)

    def save(self, node: dict, loaded: bytes) -> dict:
        self.counter += 1
        prefix = node["inputs"]["filename_prefix"]
        if node["class_type"] == "SaveImage":
            key = ("output", "", f"{prefix}_{self.counter:05}_.png")
            self.files[key] = b"PNG of " + loaded
            return {"images": [{"filename": key[2], "subfolder": key[1], "type": key[0]}]}
        # files of several kinds, nested under other keys, as packs report them
        splats = ("output", "mv4d", f"{prefix}_{self.counter:05}_.splatv")
        frame = ("output", f"mv4d/{prefix}_{self.counter:05}_frames", "frame_0000.ply")
        preview = ("temp", "", f"preview_{self.counter:05}.webp")
        for key, content in ((splats, b"SPLATV" + loaded[:8]), (frame, b"ply\n" + loaded[:4]), (preview, b"RIFF....WEBP")):
            self.files[key] = content
        return {"files": [{"filename": splats[2], "subfolder": splats[1], "type": splats[0]},
                          {"group": {"filename": frame[2], "subfolder": frame[1], "type": frame[0]}}],
                "animated": [True], "images": [{"filename": preview[2], "subfolder": preview[1], "type": preview[0]}],
                "text": ["max position error 0.01"]}
