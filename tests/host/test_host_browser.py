"""Our workflow templates in ComfyUI's own web frontend, in a real headless Chromium.

For every workflows/*.json: the server lists it for the template browser and serves its thumbnail; the frontend
fetches it through the template browser's URL and loads it with no missing node type, no missing-nodes dialog and
no error in the console or the network; `app.graphToPrompt()` gives exactly its API twin workflows/api/<name>.json;
the models its loaders name (properties.models), absent on the test server, are reported missing. A screenshot of
each loaded template goes to test-output/browser/<ComfyUI version>/<name>.png.

Skipped when no Chromium is installed ($CHROMIUM, then chromium, chromium-browser, google-chrome on PATH); nothing
is ever downloaded.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from mv4d_browser import Chromium, ComfyFrontend, PageEvent, find_chromium
from mv4d_host_helpers import WORKFLOWS, get_json

ROOT = Path(__file__).resolve().parents[2]
MODULE = "mv4d"  # the test server loads this checkout as custom_nodes/mv4d
TEMPLATES = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
FRONTEND_ONLY_NODES = ("Note", "MarkdownNote")  # registered by the frontend; they produce nothing in the prompt
SCREENSHOTS = ROOT / "test-output" / "browser"

# What the frontend reports because this machine is offline, never because of a template: requests to hosts other
# than the ComfyUI server (api.comfy.org release and registry look-ups, the missing-models dialog's HEAD of each
# model URL) and the console error the missing-models dialog logs when that HEAD fails. They are printed, not hidden.
OFFLINE_CONSOLE_ERRORS = (re.compile(r"^Error fetching file size: TypeError: Failed to fetch"),)


def is_offline_noise(event: PageEvent, server_url: str) -> bool:
    if event.kind in ("network", "log") and event.url.startswith(("http://", "https://")):
        return urlsplit(event.url).netloc != urlsplit(server_url).netloc
    return event.kind == "console" and any(pattern.search(event.text) for pattern in OFFLINE_CONSOLE_ERRORS)


def errors_of(events: list[PageEvent], server_url: str) -> tuple[list[PageEvent], list[PageEvent]]:
    """(errors, offline noise): warnings are neither."""
    errors = [event for event in events if event.level in ("error", "assert")]
    noise = [event for event in errors if is_offline_noise(event, server_url)]
    return [event for event in errors if event not in noise], noise


def show(events: list[PageEvent]) -> str:
    return "\n".join(f"  {event}" for event in events) or "  (none)"


def summarize(events: list[PageEvent]) -> str:
    """One line per distinct event (its first line of text), with how many times it came."""
    counts: dict[str, int] = {}
    for event in events:
        line = str(PageEvent(event.kind, event.level, event.text.splitlines()[0] if event.text else "", event.url))
        counts[line] = counts.get(line, 0) + 1
    return "\n".join(f"  {line}" + (f"  (x{count})" if count > 1 else "") for line, count in counts.items()) or "  (none)"


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found ($CHROMIUM, chromium, chromium-browser, google-chrome on PATH); the browser tests "
                    "need an installed one and never download a browser")
    return path


def post_setting(server_url: str, setting: str, value) -> None:
    request = urllib.request.Request(f"{server_url}/api/settings/{setting}", data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture(scope="module")
def comfy_version(comfy_server) -> str:
    return get_json(comfy_server.url + "/system_stats")["system"]["comfyui_version"]


@pytest.fixture(scope="module")
def frontend(chromium_path, comfy_server):
    # A first visit opens the template browser over the canvas ("get started"): mark the tutorial done, as any
    # user who closed it once has it.
    post_setting(comfy_server.url, "Comfy.TutorialCompleted", True)
    with Chromium(chromium_path) as browser:
        yield ComfyFrontend(browser, comfy_server.url, probe_node_type="MV4D_OrbitCameras")


def test_the_frontend_boots(frontend, comfy_server, comfy_version):
    """A blank app boots with our nodes registered. What the frontend itself reports while booting is printed (it
    is not ours); an error that names our pack fails."""
    boot = frontend.open()
    version = frontend.browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    errors, noise = errors_of(boot, comfy_server.url)
    print(f"\nComfyUI {comfy_version}, frontend {version}: errors while booting a blank page:\n{summarize(errors)}\n"
          f"offline noise while booting (not counted):\n{summarize(noise)}")
    ours = [event for event in boot if re.search(r"mv4d|MV4D_", f"{event.text} {event.url}")]
    assert not ours, f"the frontend reported these about our pack while booting:\n{show(ours)}"
    registered = frontend.browser.evaluate(
        "Object.keys(LiteGraph.registered_node_types).filter(type => type.startsWith('MV4D_'))")
    object_info = get_json(comfy_server.url + "/object_info")
    assert sorted(registered) == sorted(node for node in object_info if node.startswith("MV4D_"))
    missing = frontend.browser.evaluate(f"{list(FRONTEND_ONLY_NODES)}.filter(type => !(type in LiteGraph.registered_node_types))")
    assert not missing, f"frontend-only node types our templates use are not registered: {missing}"


def test_every_template_is_listed_with_a_thumbnail(comfy_server):
    listed = get_json(comfy_server.url + "/api/workflow_templates")
    assert sorted(listed.get(MODULE, [])) == TEMPLATES, f"listed for {MODULE}: {listed.get(MODULE)}; workflows/: {TEMPLATES}"
    problems = []
    for name in TEMPLATES:
        url = f"{comfy_server.url}/api/workflow_templates/{MODULE}/{name}.jpg"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as error:
            on_disk = (WORKFLOWS / f"{name}.jpg").exists()
            problems.append(f"{name}.jpg: HTTP {error.code} ({'present' if on_disk else 'missing'} in workflows/)")
            continue
        if not data.startswith(b"\xff\xd8\xff"):
            problems.append(f"{name}.jpg: served, but not a JPEG (starts with {data[:8]!r})")
    assert not problems, "the template browser shows workflows/<name>.jpg as each template's thumbnail:\n" + "\n".join(problems)


def same_value(actual, expected) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(same_value(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(same_value(actual[key], expected[key]) for key in expected)
    return type(actual) is type(expected) and actual == expected


def node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def declared_inputs(object_info: dict) -> dict[str, set[str]]:
    return {node_type: {name for section in info.get("input", {}).values() if isinstance(section, dict) for name in section}
            for node_type, info in object_info.items()}


def prompt_differences(actual: dict, expected: dict, declared: dict[str, set[str]],
                       untitled: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Where the frontend's prompt differs from our API twin, one line each, and the inputs left out of the
    comparison. Links are [source id (a string), slot]; floats compare with a relative tolerance of 1e-6; titles
    only where the twin has them. An input the frontend adds that the node's class does not declare (a value of a
    frontend-only widget, such as LoadVideo's 'video-preview' in frontend 1.47) is ignored by the server, so it is
    listed as ignored, not as a difference. `untitled`: ids of UI nodes without a title of their own (the frontend
    then titles them with the host's display name of their class, which differs between ComfyUI versions)."""
    problems, ignored = [], []
    for node_id in sorted(expected.keys() - actual.keys(), key=node_order):
        problems.append(f"node {node_id} ({expected[node_id]['class_type']}) is in the twin, not in the frontend's prompt")
    for node_id in sorted(actual.keys() - expected.keys(), key=node_order):
        problems.append(f"node {node_id} ({actual[node_id].get('class_type')}) is in the frontend's prompt, not in the twin")
    for node_id in sorted(actual.keys() & expected.keys(), key=node_order):
        mine, theirs = expected[node_id], {"inputs": {}, **actual[node_id]}
        where = f"node {node_id} ({mine['class_type']})"
        if theirs.get("class_type") != mine["class_type"]:
            problems.append(f"{where}: class_type {theirs.get('class_type')!r} in the frontend's prompt")
        for name in sorted(mine["inputs"].keys() - theirs["inputs"].keys()):
            problems.append(f"{where}: input {name!r} = {mine['inputs'][name]!r} in the twin, absent from the frontend's prompt")
        for name in sorted(theirs["inputs"].keys() - mine["inputs"].keys()):
            if theirs.get("class_type") == mine["class_type"] and name not in declared.get(mine["class_type"], set()):
                ignored.append(f"{where}: input {name!r} = {theirs['inputs'][name]!r} (not declared by the node)")
                continue
            problems.append(f"{where}: input {name!r} = {theirs['inputs'][name]!r} in the frontend's prompt, absent from the twin")
        for name in sorted(mine["inputs"].keys() & theirs["inputs"].keys()):
            if not same_value(theirs["inputs"][name], mine["inputs"][name]):
                problems.append(f"{where}: input {name!r}: twin {mine['inputs'][name]!r}, frontend {theirs['inputs'][name]!r}")
        title = (mine.get("_meta") or {}).get("title")
        if title is not None and (theirs.get("_meta") or {}).get("title") != title:
            why = " (the UI node has no title of its own: the frontend used this host's display name)" if node_id in untitled else ""
            problems.append(f"{where}: title: twin {title!r}, frontend {(theirs.get('_meta') or {}).get('title')!r}{why}")
    return problems, ignored


def declared_models(template: dict) -> list[dict]:
    return [model for node in template["nodes"] for model in (node.get("properties") or {}).get("models") or []]


MISSING_NODES_DIALOG = re.compile(r"missing nodes|nodes are missing|node types were not found|missing node packs", re.IGNORECASE)
MISSING_MODELS_DIALOG = re.compile(r"missing models|models were not found", re.IGNORECASE)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_in_the_frontend_as_its_api_twin(frontend, comfy_server, comfy_version, name):
    template = json.loads((WORKFLOWS / f"{name}.json").read_text())
    twin_path = WORKFLOWS / "api" / f"{name}.json"
    assert twin_path.exists(), f"workflows/{name}.json has no API twin workflows/api/{name}.json"
    twin = json.loads(twin_path.read_text())
    available = {folder: set(get_json(f"{comfy_server.url}/api/models/{folder}"))
                 for folder in {model["directory"] for model in declared_models(template)}}
    absent = sorted({model["name"] for model in declared_models(template) if model["name"] not in available[model["directory"]]})
    browser = frontend.browser

    frontend.open()
    mark = browser.log.mark()  # only what the load causes, not the boot (test_the_frontend_boots prints that)
    loaded = frontend.load_template(MODULE, name)
    assert "error" not in loaded, loaded["error"]
    frontend.settle()
    # look at everything first, then screenshot (dialogs closed, view fitted), then judge
    dialogs = frontend.dialog_texts()
    stores = frontend.missing_in_stores()
    reported_models = frontend.wait_for_missing_models(absent, timeout=30) if absent else ""
    prompt = frontend.graph_to_prompt()
    frontend.close_dialogs()
    frontend.fit_view()
    path = browser.screenshot(SCREENSHOTS / comfy_version / f"{name}.png")
    print(f"\nscreenshot: {path}")
    errors, noise = errors_of(browser.log.since(mark), comfy_server.url)
    if noise:
        print(f"{name}: offline noise while loading (not counted):\n{summarize(noise)}")

    failures = []  # every kind of problem is checked and reported, not only the first

    # node types: all registered, none reported missing (by the hook; by a dialog in 1.27 / 1.35, a store in 1.47)
    if loaded["unregistered"]:
        failures.append(f"node types of {name} not registered in the frontend: {loaded['unregistered']}")
    if loaded["missingNodeTypes"]:
        failures.append(f"the frontend reported missing node types: {loaded['missingNodeTypes']}")
    unregistered = [f"{node['id']}:{node['type']}" for node in loaded["nodes"] if not node["registered"]]
    if unregistered:
        failures.append(f"nodes of the loaded graph whose type is not registered: {unregistered}")
    if sorted(node["id"] for node in loaded["nodes"]) != sorted(loaded["templateNodeIds"]):
        failures.append(f"the loaded graph has nodes {sorted(node['id'] for node in loaded['nodes'])}, the template "
                        f"{sorted(loaded['templateNodeIds'])}")
    if [text for text in dialogs if MISSING_NODES_DIALOG.search(text)]:
        failures.append("a missing-nodes dialog opened:\n" + "\n".join(dialogs))
    if stores["nodeTypes"]:
        failures.append(f"the frontend's missing-nodes store lists {stores['nodeTypes']}")

    # models: those the loaders declare (properties.models) are absent on the test server, and the frontend must
    # name each of them; a template that declares none must not make it report any
    unnamed = [model for model in absent if model not in reported_models]
    if unnamed:
        failures.append(f"models absent on the server that the frontend did not report missing: {unnamed}; it showed:\n{reported_models}")
    if not absent and ([text for text in dialogs if MISSING_MODELS_DIALOG.search(text)] or stores["models"]):
        failures.append(f"{name} declares no model, yet the frontend reports missing models:\n" + "\n".join(dialogs + (stores["models"] or [])))

    if errors:
        failures.append(f"errors while loading {name}:\n{show(errors)}")

    # the prompt the Run button would queue is our API twin
    untitled = frozenset(str(node["id"]) for node in template["nodes"] if not node.get("title"))
    problems, ignored = prompt_differences(prompt, twin, declared_inputs(get_json(comfy_server.url + "/object_info")), untitled)
    if ignored:
        print(f"{name}: inputs of the frontend's prompt the server ignores, not compared:\n  " + "\n  ".join(ignored))
    if problems:
        failures.append(f"graphToPrompt() of {name} differs from workflows/api/{name}.json:\n" + "\n".join(problems))
    assert not failures, "\n\n".join(failures)
