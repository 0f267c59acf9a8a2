"""mv4d-batch: run one ComfyUI API workflow over many inputs (images, videos or multi-view folders) on one or
more ComfyUI servers, through their HTTP API, with a resumable manifest of what was made.

Pure Python + aiohttp: it imports nothing of torch or of the rest of mv4d, so it runs from any Python that has
aiohttp (ComfyUI's own included). Entry point: `mv4d.runner.cli.main`.
"""
