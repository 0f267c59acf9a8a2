"""The model families the pack stands on, as plain PyTorch: what their checkpoints add to a stock ComfyUI model
(camera MLPs, image-prompt resamplers, motion modules, alignment layers, cross-video modules) and the key maps
between their released files and our modules. Modules take an `operations` namespace (Linear, Conv2d, GroupNorm,
LayerNorm), torch.nn by default, as ComfyUI's own ldm modules do, so ComfyUI's casting and offloading apply when
the integration layer passes comfy.ops."""
