"""The patch behind MV4D Compile Blocks: torch.compile of a UNet's blocks (ResBlocks, transformers, down- and
upsamplers) instead of the whole UNet, while the ModelPatcher samples.

Why blocks, and why these choices (bench/RESULTS.md has the figures):
- One graph per block *shape*, not per block: torch.compile treats a module's parameters as inputs, so every block
  with the same class and parameter shapes runs one compiled graph: the two transformers of a level, the input and
  output levels, and SVD and SV3D (same blocks) share it. A whole-UNet compile (core TorchCompileModel) compiles
  each model's UNet whole, once per model and per shape.
- Shapes are symbolic from the first call (dynamic=True): the batch (every chunk size the composed guider picks,
  cond-only calls) and the frame count (SVD's 25 frames, SV3D's 21 views) run the same graph instead of
  recompiling per call size.
- ComfyUI hands every transformer its position in the UNet ("block", "block_index", "transformer_index") in
  transformer_options, for attention patches to look up. torch.compile specialises on what a block reads, so those
  values would compile each position again. While the model has no attention patches registered they change
  nothing, so blocks get transformer_options without them (everything else is kept, and guarded as usual); with
  patches registered blocks get it whole: correct, one graph per position.
- Inputs are made contiguous before a block: eager convolutions hand some blocks channels-last activations, and a
  graph is specialised on its inputs' strides.
- Compiled code is cached on disk under ComfyUI's user folder, so a later process, or a restarted machine, loads it
  instead of compiling again (PyTorch's default cache lives in /tmp).

Blocks are compiled in place (`module._compiled_call_impl`, what nn.Module.compile sets) rather than swapped for
wrapper modules: ComfyUI's UNet dispatches on the block's class (`isinstance(layer, VideoResBlock)`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.patcher_extension
import torch

from .multi_gpu import keep_clones_matched

WRAPPER_KEY = "mv4d_compiled_blocks"
CACHE_FOLDER = "mv4d_compile_cache"  # under ComfyUI's user directory: kept across restarts, unlike /tmp
# All blocks share nn.Module's call code, and torch.compile keeps at most recompile_limit graphs per code object
# (8 by default) before falling back to eager without a word: an SD-family UNet has about 20 block shapes.
RECOMPILE_LIMIT = 256
# transformer_options entries that only say where a block sits in the UNet (read by attention patches)
POSITION_KEYS = ("block", "block_index", "transformer_index", "activations_shape", "original_shape")
PATCH_KEYS = ("patches", "patches_replace")
REGISTRY_KEYS = ("wrappers", "callbacks")


def block_types() -> tuple[type, ...]:
    """The classes compiled as blocks: every child of the UNet's TimestepEmbedSequential levels that carries work
    (SVD's VideoResBlock and SpatialVideoTransformer are subclasses)."""
    return (openaimodel.ResBlock, comfy_attention.SpatialTransformer, openaimodel.Downsample, openaimodel.Upsample)


def block_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """The names of the outermost modules of the block classes, in forward order."""
    types, paths = block_types(), []
    for name, module in diffusion_model.named_modules():
        if isinstance(module, types) and not any(name.startswith(f"{outer}.") for outer in paths):
            paths.append(name)
    return paths


def use_persistent_caches(directory: Path) -> Path:
    """Point inductor's and Triton's on-disk caches into `directory`, unless the user has pointed them elsewhere
    (then theirs are used). Returns the inductor cache directory in use. Inductor writes its default (a folder in
    /tmp) into the environment the first time it looks, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inductor is None or os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)


def has_attention_patches(transformer_options: dict) -> bool:
    return any(bool(transformer_options.get(key)) for key in PATCH_KEYS)


def options_without_positions(transformer_options: dict) -> dict:
    """transformer_options as a block sees it when no attention patches are registered: without the entries that say
    where the block sits (and ComfyUI's wrapper / callback registries, which no block reads), so every block of one
    shape matches one compiled graph. A fresh dict per block call: blocks write their position into it."""
    return {key: value for key, value in transformer_options.items() if key not in POSITION_KEYS + REGISTRY_KEYS}


def _call_block(module: torch.nn.Module, *args, **kwargs):
    return module._call_impl(*args, **kwargs)


@functools.cache
def compiled_block_call(backend: str, mode: str | None):
    """One compiled caller per setting for the process, shared by every block of every patched model: their graphs
    live in one cache, which is what lets blocks of one shape share a graph."""
    return torch.compile(_call_block, backend=backend, mode=mode, dynamic=True)


class BlockCall:
    """A block's call through the compiled caller (installed as the block's `_compiled_call_impl`)."""

    def __init__(self, compiled, module: torch.nn.Module, keep_positions: bool):
        self.compiled, self.module, self.keep_positions = compiled, module, keep_positions

    def __call__(self, *args, **kwargs):
        # forward_timestep_embed passes transformer_options as the last positional argument
        if args and isinstance(args[-1], dict) and "transformer_options" not in kwargs:
            args, kwargs = args[:-1], {**kwargs, "transformer_options": args[-1]}
        if "transformer_options" in kwargs and not self.keep_positions:
            kwargs["transformer_options"] = options_without_positions(kwargs["transformer_options"])
        args = tuple(value.contiguous() if isinstance(value, torch.Tensor) else value for value in args)
        return self.compiled(self.module, *args, **kwargs)


class CompiledBlocks:
    """The APPLY_MODEL wrapper: installs the compiled call on each block for the duration of a model call."""

    def __init__(self, paths: list[str], backend: str, mode: str | None):
        self.paths, self.backend, self.mode = paths, backend, mode

    def __deepcopy__(self, memo):  # ComfyUI 0.3.x deep-copies model_options on clone: share, do not copy
        return self

    def __call__(self, executor, *args, **kwargs):
        diffusion_model = executor.class_obj.diffusion_model
        transformer_options = (args[5] if len(args) > 5 else kwargs.get("transformer_options")) or {}
        compiled = compiled_block_call(self.backend, self.mode)
        keep_positions = has_attention_patches(transformer_options)
        modules = [diffusion_model.get_submodule(path) for path in self.paths]
        previous = [module.__dict__.get("_compiled_call_impl") for module in modules]
        for module in modules:
            module._compiled_call_impl = BlockCall(compiled, module, keep_positions)
        try:
            return executor(*args, **kwargs)
        finally:
            for module, call in zip(modules, previous):
                module._compiled_call_impl = call


def cache_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_user_directory()) / CACHE_FOLDER


def with_compiled_blocks(model, backend: str = "inductor", mode: str | None = None, persistent_cache: bool = True):
    """A clone of the ModelPatcher whose UNet blocks run compiled while it samples (compiled on first use, or loaded
    from the on-disk cache). persistent_cache: keep compiled code under ComfyUI's user folder across processes."""
    if persistent_cache:
        logging.info("MV4D Compile Blocks: compiled code is cached in %s", use_persistent_caches(cache_directory()))
    _raise_recompile_limit()
    patched = model.clone()
    paths = block_paths(patched.get_model_object("diffusion_model"))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, CompiledBlocks(paths, backend, mode))
    keep_clones_matched(patched)
    return patched


def compiled_block_count(model) -> int:
    """How many UNet blocks this clone runs compiled (0 for a model without the patch)."""
    wrappers = model.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).get(WRAPPER_KEY, [])
    return sum(len(wrapper.paths) for wrapper in wrappers)
