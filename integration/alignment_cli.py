"""mv4d-train-adapters: train Vivid-ZOO's alignment adapters outside ComfyUI's server, for long runs, with the same
training function as MV4D Train Alignment Adapters (integration/alignment_training.py) and ComfyUI as a library.

    mv4d-train-adapters --multiview-model ~/ComfyUI/models/checkpoints/sd-v1.5-4view.pt \\
        --motion-module ~/ComfyUI/models/animatediff_models/mm_sd_v15_v2.ckpt \\
        --dataset ~/ComfyUI/output/mv4d/training_sets/demo --output ~/ComfyUI/models/mv4d_adapters/mine.safetensors \\
        --steps 100000 --batch-size 1 --checkpoint-every 500 [--resume] [--gradient-checkpointing]

COMFYUI_DIR (default ~/ComfyUI) names the ComfyUI source tree whose Python modules it uses. Ctrl-C stops after the
current step; the last checkpoint stays whole, and --resume continues from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_comfy() -> None:
    host = Path(os.environ.get("COMFYUI_DIR", Path.home() / "ComfyUI")).expanduser()
    if not (host / "comfy").is_dir():
        sys.exit(f"mv4d-train-adapters: no ComfyUI source tree at {host}: set COMFYUI_DIR")
    sys.path.insert(0, str(host))
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    if "mv4d" not in sys.modules:  # the pack's folder is the package mv4d
        spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mv4d"])


def parser() -> argparse.ArgumentParser:
    from mv4d.kernels.models.alignment import TrainingSettings

    defaults = TrainingSettings()
    p = argparse.ArgumentParser(prog="mv4d-train-adapters", description=__doc__.splitlines()[0])
    p.add_argument("--multiview-model", required=True, type=Path, help="MVDream checkpoint (with its text encoder and VAE)")
    p.add_argument("--motion-module", required=True, type=Path, help="AnimateDiff motion module (v2 for Vivid-ZOO)")
    p.add_argument("--dataset", required=True, type=Path, help="folder of *.mv4d_clip.safetensors clips")
    p.add_argument("--output", required=True, type=Path, help="adapter file to write (and resume from)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--gradient-checkpointing", action="store_true", default=defaults.gradient_checkpointing)
    p.add_argument("--no-bf16", action="store_true", help="train in float32 on CUDA too")
    p.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout)
    p.add_argument("--resume", action="store_true", help="continue from --output (weights, optimizer, steps)")
    return p


def load_components(multiview_path: Path, motion_path: Path):
    """(video model, text encoder, VAE) from the files, as the nodes load them."""
    from mv4d.integration.motion_models import load_motion_file
    from mv4d.integration.multiview_models import load_multiview_model
    from mv4d.integration.patches.motion import with_motion

    loaded = load_multiview_model(multiview_path)
    if loaded.clip is None or loaded.vae is None:
        sys.exit(f"mv4d-train-adapters: {multiview_path.name} holds no text encoder or VAE: {'; '.join(loaded.missing)}")
    return with_motion(loaded.model, load_motion_file(motion_path)), loaded.clip, loaded.vae


def main(argv=None, components=load_components) -> int:
    _import_comfy()
    import torch

    from mv4d.integration.alignment_training import encode_clips, text_context, train_alignment_adapters
    from mv4d.integration.patches.alignment import fresh_adapters, with_alignment_adapters
    from mv4d.kernels.errors import InvalidInput
    from mv4d.kernels.models.alignment import TrainingSettings
    from mv4d.kernels.training_data import read_training_set

    args = parser().parse_args(argv)
    if args.output.exists() and not args.resume:
        sys.exit(f"mv4d-train-adapters: {args.output} exists: pass --resume to continue it, or another --output")
    stop = {"asked": False}

    def on_signal(signum, frame):
        stop["asked"] = True
        print("\nmv4d-train-adapters: stopping after this step (Ctrl-C again to abort now)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_step(step: int, total: int, loss: float) -> None:
        if step % 10 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.5f}", file=sys.stderr, flush=True)
        if stop["asked"]:
            raise KeyboardInterrupt

    try:
        settings = TrainingSettings(args.steps, args.learning_rate, args.batch_size, args.seed, args.checkpoint_every,
                                    args.gradient_checkpointing, not args.no_bf16, args.caption_dropout)
        settings.check()
        clips = read_training_set(args.dataset.parent, args.dataset)
        with torch.inference_mode():  # as ComfyUI loads models (the trainer copes with it)
            video_model, text_encoder, vae = components(args.multiview_model, args.motion_module)
            video = clips[0].video
            adapters = fresh_adapters(video_model, video.num_views, video.num_frames, max(video.height, video.width))
            composite = with_alignment_adapters(video_model, adapters)
            encoded = encode_clips(clips, composite, vae, text_encoder)
            empty = text_context(text_encoder, "").float()
        signal.signal(signal.SIGINT, on_signal)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        result = train_alignment_adapters(composite, encoded, settings, empty, args.output, args.resume, on_step)
    except InvalidInput as error:
        print(f"mv4d-train-adapters: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mv4d-train-adapters: stopped; the last checkpoint in {args.output} is whole (--resume continues it)", file=sys.stderr)
        return 130
    print(f"mv4d-train-adapters: {result.steps} steps, wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
