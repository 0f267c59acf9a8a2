"""mv4d-batch: the command line (also `python -m mv4d.runner`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

from .batch import EXIT_CANCELLED, Batch, mark_finished, run_batch, summary
from .errors import RunnerError
from .inputs import InputItem, discover_inputs, read_list_file
from .local_server import LocalComfyUI
from .manifest import ERROR, MANIFEST_NAME, PENDING, Manifest, reset_entry
from .progress import Reporter
from .workflow import apply_overrides, describe, find_input_node, load_workflow, parse_override, workflow_sha256

DEFAULT_SERVER = "http://127.0.0.1:8188"
SHORTHANDS = ("seed", "steps", "size")

DESCRIPTION = """\
Run one ComfyUI API-format workflow over many inputs, on one or more running ComfyUI servers (or one it starts).
Each input is uploaded into ComfyUI's input folder, fed to the workflow's input node, queued, followed to the
end, and every file the workflow outputs is downloaded to OUTPUT/<item name>/. OUTPUT/manifest.json records it
all; running the same command again resumes: items done whose files are all still there are skipped."""

EPILOG = """\
inputs:
  The workflow's input node decides what one item is: LoadImage -> an image file, LoadVideo -> a video file
  (a folder given stands for its image or video files, sorted, not recursive); MV4D_LoadMultiviewImages -> a
  folder of at least 2 images (one multi-view set). Files are checked by content before anything runs:
  unreadable ones are recorded as failed items and skipped (if none is usable, nothing runs: exit 2).

overrides (--set KEY=VALUE, VALUE read as JSON when it parses, else a string):
  NODE_ID.INPUT=V  sets that input of that node, e.g. --set 6.cfg=2.5
  KEY=V            sets the `value` input of the nodes titled KEY (case-insensitive); mv4d's workflows have
                   primitive nodes titled seed, steps, size, views, frames; with no such node, sets input KEY
                   of every node where it is a plain value, e.g. --set denoise=0.8
  --seed/--steps/--size N are --set seed=N / steps=N / size=N. Linked inputs are never overwritten.

exit codes: 0 every item done, 1 some item failed, 2 bad usage or a pre-flight check failed (nothing run),
  130 cancelled (Ctrl-C / SIGTERM: our queued prompts are deleted, ours running is interrupted, no other
  client's prompt is touched; cancelled items are redone by the next run).
examples:
  mv4d-batch workflows/api/image_to_4d.json photos/ --output out/ --seed 7
  mv4d-batch flow.json a.png b.png --server http://gpu1:8188 --server http://gpu2:8188 --output out/
  COMFYUI_DIR=~/ComfyUI mv4d-batch flow.json --list inputs.txt --output out/ --start-server
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mv4d-batch", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", metavar="WORKFLOW", help="an API-format workflow JSON (ComfyUI: Workflow -> Export (API))")
    parser.add_argument("inputs", metavar="INPUTS", nargs="*", help="files and/or folders")
    parser.add_argument("--list", metavar="FILE", help="a text file of input paths, one a line (# comments; relative to the file)")
    parser.add_argument("--output", metavar="DIR", required=True, help=f"where results and {MANIFEST_NAME} go")
    parser.add_argument("--server", metavar="URL", action="append",
                        help=f"a ComfyUI server; repeat for several, which share the items (default {DEFAULT_SERVER})")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides", help="override an input (see below)")
    for name in SHORTHANDS:
        parser.add_argument(f"--{name}", metavar="N", type=int, help=f"same as --set {name}=N")
    parser.add_argument("--input-node", metavar="ID", help="the node that receives the inputs, when the workflow has several")
    parser.add_argument("--timeout", metavar="S", type=float,
                        help="give an item up (and take its prompt off the server) when it has not finished S seconds after "
                             "it started (default: no limit)")
    parser.add_argument("--restart", action="store_true",
                        help=f"start over in OUTPUT, ignoring its {MANIFEST_NAME} (needed when the workflow or overrides changed)")
    parser.add_argument("--start-server", action="store_true",
                        help="start ComfyUI from --comfyui-dir on a free local port for this batch, and stop it at the end")
    parser.add_argument("--comfyui-dir", metavar="DIR", default=os.environ.get("COMFYUI_DIR"),
                        help="the ComfyUI folder for --start-server (default: $COMFYUI_DIR)")
    parser.add_argument("--comfyui-python", metavar="PYTHON", default=sys.executable,
                        help="the Python that runs ComfyUI (default: this one)")
    parser.add_argument("--comfyui-args", metavar="ARGS", default="",
                        help="more arguments for ComfyUI's main.py with --start-server, one string, e.g. \"--cpu\" "
                             "(needed on a machine without a CUDA GPU)")
    parser.add_argument("--start-timeout", metavar="S", type=float, default=300,
                        help="how long the started ComfyUI may take to answer (default 300)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only errors")
    return parser


def server_url(text: str) -> str:
    """host:port alone means http://host:port."""
    return (text if "://" in text else "http://" + text).rstrip("/")


def collect_overrides(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(text) for text in args.overrides)
    for name in SHORTHANDS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


async def run(args: argparse.Namespace, reporter: Reporter) -> int:
    if args.start_server and args.server:
        raise RunnerError("--start-server runs the batch on the server it starts: leave out --server")
    if args.start_server and not args.comfyui_dir:
        raise RunnerError("--start-server needs the ComfyUI folder: set COMFYUI_DIR or pass --comfyui-dir")
    workflow_path = Path(args.workflow).expanduser().resolve()
    workflow = load_workflow(workflow_path)
    overrides = collect_overrides(args)
    paths = list(args.inputs) + (read_list_file(Path(args.list).expanduser().resolve()) if args.list else [])
    input_node = find_input_node(workflow, args.input_node, have_inputs=bool(paths))
    prepared = apply_overrides(workflow, overrides)

    if input_node is None:  # a workflow without inputs (e.g. 4d_gaussians_example): one item, the workflow itself
        inputs = [InputItem(workflow_path)]
    elif not paths:
        raise RunnerError(f"no inputs: give files or folders after the workflow, or --list FILE (it feeds "
                          f"{describe(input_node.node_id, workflow[input_node.node_id])})")
    else:
        inputs = discover_inputs(paths, input_node.takes)
    manifest = Manifest.open(Path(args.output).expanduser().resolve(), workflow_path, workflow_sha256(workflow), overrides, args.restart)
    entries = manifest.entries_for(inputs)
    to_run, unreadable, skipped = [], 0, 0
    for item, entry in zip(inputs, entries):
        if manifest.is_intact(entry):
            skipped += 1  # done before and its files are all there (its input is not even needed any more)
        elif item.error:
            reporter.error(item.error)
            reset_entry(entry, ERROR, item.error)
            unreadable += 1
        else:
            reset_entry(entry, PENDING)
            to_run.append(entry)
    if unreadable == len(inputs):
        raise RunnerError("no input can be used (see above): nothing was run")
    if skipped:
        reporter.info(f"{skipped} item(s) already done in {manifest.path.parent}, skipped")
    batch = Batch(prepared, input_node, {str(item.path): item for item in inputs}, manifest, reporter, args.timeout)

    code = 0
    if to_run:
        local = None
        if args.start_server:
            local = LocalComfyUI(Path(args.comfyui_dir).expanduser().resolve(), args.comfyui_python,
                                 shlex.split(args.comfyui_args), manifest.path.parent / "comfyui.log")
            reporter.info(f"starting ComfyUI from {local.comfyui_dir} (log: {local.log_path})")
        try:
            if local:
                await local.start(args.start_timeout)
            servers = [local.url] if local else [server_url(text) for text in args.server or [DEFAULT_SERVER]]
            code = await run_with_signals(batch, to_run, servers)
        finally:
            if local:
                local.stop()
    else:
        mark_finished(manifest)
    if code == 0 and any(entry["status"] == ERROR for entry in entries):
        code = 1
    reporter.info(f"{'cancelled: ' if code == EXIT_CANCELLED else ''}{summary(entries)}; manifest: {manifest.path}")
    return code


async def run_with_signals(batch: Batch, entries: list[dict], server_urls: list[str]) -> int:
    """run_batch with Ctrl-C and SIGTERM turned into an orderly stop (prompts taken off the servers)."""
    loop = asyncio.get_running_loop()
    stop_signal = asyncio.Event()

    def stop() -> None:
        if not stop_signal.is_set():  # a second signal changes nothing: the stop is under way, bounded in time
            batch.reporter.error("stopping: taking this batch's prompts off the servers")
            stop_signal.set()

    installed = []
    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(number, stop)
            installed.append(number)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals here: Ctrl-C then ends the run abruptly
    try:
        return await run_batch(batch, entries, server_urls, stop_signal)
    finally:
        for number in installed:
            loop.remove_signal_handler(number)


VALUE_OPTIONS_STARTING_WITH_DASH = ("--comfyui-args",)


def join_dash_values(argv: list[str]) -> list[str]:
    """`--comfyui-args "--cpu"` as `--comfyui-args=--cpu`: argparse reads a value that starts with '-' as an
    option of its own ("expected one argument") unless it is joined with '='."""
    joined, index = [], 0
    while index < len(argv):
        if argv[index] in VALUE_OPTIONS_STARTING_WITH_DASH and index + 1 < len(argv):
            joined.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, or a usage error argparse has printed
        return int(exit_.code or 0)
    reporter = Reporter(args.quiet)
    try:
        return asyncio.run(run(args, reporter))
    except RunnerError as error:
        for line in str(error).splitlines():
            reporter.error(line)
        return error.exit_code
    except KeyboardInterrupt:  # before the batch's own handlers were installed (or after)
        reporter.error("interrupted")
        return EXIT_CANCELLED
