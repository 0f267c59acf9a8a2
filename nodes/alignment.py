"""Vivid-ZOO nodes: alignment adapters between a multi-view model and motion modules, their files, and training
them on your own multi-view videos (or on the pack's synthetic demo set)."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..integration import host
from ..integration.alignment_training import encode_clips, text_context, train_alignment_adapters
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from ..integration.patches.alignment import alignment_adapters_of, fresh_adapters, with_alignment_adapters
from ..integration.training_sets import resolve_training_set
from ..kernels.files import atomic_folder, check_output_prefix
from ..kernels.models.alignment import TrainingSettings, load_adapters
from ..kernels.training_data import SUFFIX, demo_clips, read_training_set, write_clip
from .types import AlignmentAdaptersSocket

ADAPTER_FOLDER = "mv4d_adapters"
MAKE_SET = "MV4D Make Demo Training Set"
LOAD = "MV4D Load Alignment Adapters"
APPLY = "MV4D Apply Alignment Adapters"
TRAIN = "MV4D Train Alignment Adapters"
DEFAULTS = TrainingSettings()


def adapter_files() -> list[str]:
    host.register_model_folders()
    return [name for name in folder_paths.get_filename_list(ADAPTER_FOLDER) if name.endswith(".safetensors")]


def adapters_path(name: str) -> Path:
    """Where MV4D Train Alignment Adapters writes `name` (a plain file name, without folders)."""
    host.register_model_folders()
    if not name or Path(name).name != name or name.startswith("."):
        raise input_error(TRAIN, "adapter_name", f"{name!r} is not a plain file name", "use a name such as vividzoo_adapters")
    return Path(folder_paths.get_folder_paths(ADAPTER_FOLDER)[0]) / (name if name.endswith(".safetensors") else f"{name}.safetensors")


class MakeDemoTrainingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_MakeDemoTrainingSet",
            display_name=MAKE_SET,
            category="mv4d/vivid-zoo",
            description="Writes a training set of multi-view videos the pack makes by itself: the synthetic animated scene "
                        "(MV4D Example Scene) seen from orbits at random azimuths and elevations over random windows of its "
                        "animation, with cameras and a caption, as *.mv4d_clip.safetensors files in "
                        "output/mv4d/training_sets/<name>/. To try adapter training without a dataset.",
            is_output_node=True,
            inputs=[
                io.String.Input("name", default="demo", tooltip="Folder name under output/mv4d/training_sets."),
                io.Int.Input("clips", default=8, min=1, max=10000, tooltip="Number of clips."),
                io.Int.Input("views", default=4, min=1, max=64, tooltip="Views per clip (Vivid-ZOO: 4)."),
                io.Int.Input("frames", default=16, min=1, max=64, tooltip="Frames per clip (Vivid-ZOO: 16)."),
                io.Int.Input("size", default=256, min=32, max=1024, step=8, tooltip="Image size in pixels (Vivid-ZOO: 256)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True, tooltip="Seed of the orbits and time windows."),
            ],
            outputs=[io.String.Output("dataset", tooltip="The training set, as MV4D Train Alignment Adapters lists it.")],
        )

    @classmethod
    def execute(cls, name, clips, views, frames, size, seed) -> io.NodeOutput:
        prefix = f"mv4d/training_sets/{name}"
        output = folder_paths.get_output_directory()
        with kernel_errors_as_node_errors(MAKE_SET, {"filename_prefix": "name"}):
            check_output_prefix(output, prefix)
        folder = Path(output) / prefix
        choice = f"{prefix} [output]"
        if folder.exists():  # made before: the same set again, so a workflow can run twice
            with kernel_errors_as_node_errors(MAKE_SET, {"dataset": "name"}):
                existing = read_training_set(output, folder)
            if len(existing) == clips and tuple(existing[0].video.images.shape[:4]) == (views, frames, size, size):
                return io.NodeOutput(choice, ui=ui.PreviewText(f"{choice} exists already with these settings: reused"))
            raise input_error(MAKE_SET, "name", f"output/{prefix} exists already with other clips", "pick another name, or delete that folder")
        with kernel_errors_as_node_errors(MAKE_SET):
            made = demo_clips(clips, views, frames, size, seed, on_image=host.progress())
            with atomic_folder(folder) as temporary:
                for index, clip in enumerate(made):
                    write_clip(temporary / f"clip_{index:04d}{SUFFIX}", clip)
        return io.NodeOutput(choice, ui=ui.PreviewText(f"{clips} clips of {views} views x {frames} frames at {size} px: {choice}"))


class LoadAlignmentAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadAlignmentAdapters",
            display_name=LOAD,
            category="mv4d/vivid-zoo",
            description="Loads alignment adapters (Vivid-ZOO) from models/mv4d_adapters: a file written by MV4D Train "
                        "Alignment Adapters, with the multi-view model and motion module it was made for in its metadata.",
            inputs=[io.Combo.Input("adapters", options=adapter_files(), tooltip="An adapter file in models/mv4d_adapters.")],
            outputs=[AlignmentAdaptersSocket.Output("alignment_adapters", tooltip="For MV4D Apply Alignment Adapters.")],
        )

    @classmethod
    def execute(cls, adapters) -> io.NodeOutput:
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapters)
        if path is None:
            raise input_error(LOAD, "adapters", f"{adapters!r} is not in models/mv4d_adapters", "put the file there and refresh (R)")
        with kernel_errors_as_node_errors(LOAD, {"file": "adapters"}):
            loaded, _ = load_adapters(path)
        info = loaded.info
        return io.NodeOutput(loaded, ui=ui.PreviewText(f"{info.spatial_model} + AnimateDiff {info.motion_model}: trained {info.steps_trained} "
                                                       f"steps on {info.views} views x {info.frames} frames at {info.resolution} px"))


class ApplyAlignmentAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ApplyAlignmentAdapters",
            display_name=APPLY,
            category="mv4d/vivid-zoo",
            description="Joins a multi-view model (MVDream) and its motion modules (AnimateDiff v2) with Vivid-ZOO's alignment "
                        "layers: per motion module one Linear beside proj_in and one beside proj_out. Without adapters "
                        "(not connected) the layers are zero and the model is exactly the naive composition.",
            inputs=[
                io.Model.Input("model", tooltip="MV4D Load Multi-view Model (MVDream) -> MV4D Apply Motion Module (AnimateDiff v2)."),
                AlignmentAdaptersSocket.Input("alignment_adapters", optional=True, tooltip="From MV4D Load / Train Alignment Adapters; empty = fresh (zero)."),
            ],
            outputs=[io.Model.Output("composite", display_name="model", tooltip="The multi-view video model.")],
        )

    @classmethod
    def execute(cls, model, alignment_adapters=None) -> io.NodeOutput:
        with kernel_errors_as_node_errors(APPLY, {"adapters": "alignment_adapters"}):
            adapters = alignment_adapters if alignment_adapters is not None else fresh_adapters(model)
            return io.NodeOutput(with_alignment_adapters(model, adapters))


class TrainAlignmentAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_TrainAlignmentAdapters",
            display_name=TRAIN,
            category="mv4d/vivid-zoo",
            description="Trains Vivid-ZOO's alignment layers (and only them: the multi-view model and the motion modules stay "
                        "frozen) on a training set of multi-view videos with cameras and captions, with the eps loss of the "
                        "composite as it samples. AdamW, bf16 autocast on CUDA, optional gradient checkpointing. Progress shows "
                        "the loss; Cancel stops at the next step. The adapters (with the optimizer state) are written to "
                        "models/mv4d_adapters/<adapter_name>.safetensors every checkpoint_every steps, each file whole; "
                        "resume continues from that file. For long runs outside ComfyUI: mv4d-train-adapters (README).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="MVDream -> MV4D Apply Motion Module (v2), without adapters (they are made here)."),
                io.Clip.Input("clip", tooltip="The multi-view model's text encoder (for the captions)."),
                io.Vae.Input("vae", tooltip="The multi-view model's VAE (to encode the clips)."),
                io.String.Input("dataset", default="mv4d/training_sets/demo [output]",
                                tooltip="A folder of *.mv4d_clip.safetensors clips, as 'folder [output]' or 'folder [input]' (MV4D Make "
                                        "Demo Training Set gives one); connect that node's output, or type the folder."),
                io.String.Input("adapter_name", default="vividzoo_adapters", tooltip="File name in models/mv4d_adapters."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=10_000_000, tooltip="Total optimizer steps (Vivid-ZOO: 100k)."),
                io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=1e-8, max=0.1, step=1e-5, tooltip="AdamW learning rate (Vivid-ZOO: 1e-4)."),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=256, tooltip="Clips per step (Vivid-ZOO: 16 on 8 GPUs)."),
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=2**31 - 1, control_after_generate=True, tooltip="Seed of clip, timestep and noise draws."),
                io.Int.Input("checkpoint_every", default=DEFAULTS.checkpoint_every, min=1, max=1_000_000, tooltip="Steps between checkpoints."),
                io.Boolean.Input("gradient_checkpointing", default=DEFAULTS.gradient_checkpointing, tooltip="Recompute activations in the backward pass: less VRAM, slower."),
                io.Boolean.Input("bf16", default=DEFAULTS.bf16, tooltip="bfloat16 autocast on CUDA GPUs."),
                io.Float.Input("caption_dropout", default=DEFAULTS.caption_dropout, min=0.0, max=1.0, step=0.01, tooltip="Share of steps on the empty prompt (for CFG)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue from models/mv4d_adapters/<adapter_name> (weights, optimizer, step count)."),
            ],
            outputs=[AlignmentAdaptersSocket.Output("alignment_adapters", tooltip="The trained adapters.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, adapter_name, steps, learning_rate, batch_size, seed, checkpoint_every,
                gradient_checkpointing, bf16, caption_dropout, resume) -> io.NodeOutput:
        check_numbers(TRAIN, locals())
        if alignment_adapters_of(model) is not None:
            raise input_error(TRAIN, "model", "this MODEL has alignment adapters already",
                              "connect the model before MV4D Apply Alignment Adapters (set resume to continue a saved training)")
        path = adapters_path(adapter_name)
        if path.exists() and not resume:
            raise input_error(TRAIN, "adapter_name", f"models/mv4d_adapters/{path.name} exists already",
                              "pick another name, or set resume to continue that training")
        with kernel_errors_as_node_errors(TRAIN):
            settings = TrainingSettings(steps, learning_rate, batch_size, seed, checkpoint_every, gradient_checkpointing, bf16, caption_dropout)
            settings.check()
            root, folder = resolve_training_set(dataset)
            clips = read_training_set(root, folder)
            video = clips[0].video
            adapters = fresh_adapters(model, video.num_views, video.num_frames, max(video.height, video.width))
            composite = with_alignment_adapters(model, adapters)
            encoded = encode_clips(clips, composite, vae, clip, host.progress())
            empty = text_context(clip, "").float()
            bar = host.progress()
            losses: list[float] = []

            def on_step(step: int, total: int, loss: float) -> None:
                losses.append(loss)
                bar(step, total)

            result = train_alignment_adapters(composite, encoded, settings, empty, path, resume, on_step)
        logging.info("%s: %d steps, loss %.4f -> %.4f, saved %s", TRAIN, result.steps, losses[0] if losses else float("nan"),
                     losses[-1] if losses else float("nan"), path)
        summary = (f"{result.steps} steps on {len(clips)} clips; mean loss per block: "
                   + ", ".join(f"{value:.4f}" for value in result.losses[-8:]) + f"; saved models/mv4d_adapters/{path.name}")
        return io.NodeOutput(result.adapters, ui=ui.PreviewText(summary))
