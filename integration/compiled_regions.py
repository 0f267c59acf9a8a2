"""Regional compilation: torch.compile of a UNet's repeated blocks (ResBlocks, transformers, motion modules)
instead of the whole UNet, as a ModelPatcher patch active while it samples.

Why regions: blocks of one class and shape share one compiled graph (torch.compile treats module parameters as
inputs), so SVD and SV3D, which have the same blocks, and the input and output levels of one UNet reuse each
other's graphs, and compiling costs the unique blocks once instead of two whole UNets. The batch dimension is
marked dynamic, so every chunk size the composed guider picks (and CFG's cond-only calls) runs the same graph
instead of recompiling. The compiled code is cached on disk under ComfyUI's user folder, so a later process (or a
restarted machine) loads it instead of compiling again.

Blocks are compiled in place (`module._compiled_call_impl`, what nn.Module.compile sets) rather than swapped
for wrapper modules: the UNet dispatches on the block's class (`isinstance(layer, VideoResBlock)`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.patcher_extension
import folder_paths
import torch

WRAPPER_KEY = "mv4d_compiled_regions"
CACHE_FOLDER = "mv4d_compile_cache"  # under ComfyUI's user directory: kept across restarts, unlike its temp folder
# Every region class shares torch.nn.Module's call code, and torch.compile keeps at most recompile_limit graphs
# per code object (8 by default) before falling back to eager without a word: a SD UNet has about 20 unique blocks.
RECOMPILE_LIMIT = 256


def region_types() -> tuple[type, ...]:
    """The classes compiled as regions: the ResBlocks (with SVD's temporal ones) and the transformers' feed-forward
    layers, where eager PyTorch spends its time outside the matrix products (GroupNorm, SiLU, GEGLU and layout
    copies). Not the transformer blocks as a whole: they read ComfyUI's transformer_options (the block's position,
    for attention patches), which torch.compile would specialise on, compiling every block position again."""
    return (openaimodel.ResBlock, comfy_attention.FeedForward)


def region_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """The names of the outermost modules of the region classes, in forward order."""
    types, paths = region_types(), []
    for name, module in diffusion_model.named_modules():
        if isinstance(module, types) and not any(name.startswith(f"{outer}.") for outer in paths):
            paths.append(name)
    return paths


def cache_directory() -> Path:
    return Path(folder_paths.get_user_directory()) / CACHE_FOLDER


def use_persistent_caches(directory: Path) -> Path:
    """Point inductor's and Triton's on-disk caches into `directory`, unless the user has pointed them elsewhere
    (then theirs are used). Returns the inductor cache directory in use. Inductor writes its default (a folder
    in /tmp, which a restart empties) into the environment the first time it looks, so that value counts as unset."""
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


def _dynamic_batch(compiled):
    """Calls `compiled` with dimension 0 of every tensor argument marked dynamic (a hint: torch.compile keeps it
    static where the block's code needs a fixed value)."""
    def call(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return compiled(*args, **kwargs)
    return call


class CompiledRegions:
    """The APPLY_MODEL wrapper: installs the compiled call of each region for the duration of a model call."""

    def __init__(self, paths: list[str], backend: str, mode: str | None):
        self.paths, self.backend, self.mode = paths, backend, mode
        self.compiled: dict[int, object] = {}  # id(module) -> compiled call; one per module object it has run on

    def __deepcopy__(self, memo):  # ComfyUI 0.3.x deep-copies model_options on clone: share, do not copy
        return self

    def _compiled_call(self, module: torch.nn.Module):
        compiled = self.compiled.get(id(module))
        if compiled is None:
            compiled = _dynamic_batch(torch.compile(module._call_impl, backend=self.backend, mode=self.mode, dynamic=None))
            self.compiled[id(module)] = compiled
        return compiled

    def __call__(self, executor, *args, **kwargs):
        diffusion_model = executor.class_obj.diffusion_model
        modules = [diffusion_model.get_submodule(path) for path in self.paths]
        previous = [module.__dict__.get("_compiled_call_impl") for module in modules]
        for module in modules:
            module._compiled_call_impl = self._compiled_call(module)
        try:
            return executor(*args, **kwargs)
        finally:
            for module, call in zip(modules, previous):
                module._compiled_call_impl = call


def with_compiled_regions(model, backend: str = "inductor", mode: str | None = None, persistent_cache: bool = True):
    """A clone of the ModelPatcher whose repeated UNet blocks run compiled while it samples (compiled on first
    use). persistent_cache: keep compiled code under ComfyUI's user folder across processes."""
    if persistent_cache:
        logging.info("MV4D Compile Blocks: compiled code is cached in %s", use_persistent_caches(cache_directory()))
    _raise_recompile_limit()
    patched = model.clone()
    paths = region_paths(patched.get_model_object("diffusion_model"))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, CompiledRegions(paths, backend, mode))
    return patched
