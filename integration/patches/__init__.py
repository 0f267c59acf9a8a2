"""Model patches: everything that changes how a ComfyUI MODEL computes, applied to a ModelPatcher clone through
its own hooks (wrappers, attention replaces, embedding patches, injections, additional models), so stock samplers,
LoRA and offloading keep working and nothing global is touched."""
