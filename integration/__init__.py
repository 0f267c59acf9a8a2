"""ComfyUI glue that is not a node: guiders, conditioning builders, model patches, loaders and the few host
services the nodes use (devices, progress, model folders, output paths).

Everything here imports `comfy` / `folder_paths` but never `comfy_api`, so tests and benchmarks can use it where
ComfyUI's node API layer (and its own dependencies) is missing; `nodes/` is the thin V3 shell over it.
"""
