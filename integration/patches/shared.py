"""A base for patch objects that hold references to shared modules."""


class SharedPatch:
    """A model patch that ModelPatcher.clone must share, not copy: ComfyUI 0.3.x deep-copies model_options (where
    patches and wrappers live) on every clone, which would duplicate the module a patch uses (the adapter that
    ComfyUI loads to the GPU as an additional model) and leave the copy behind on the CPU."""

    def __deepcopy__(self, memo):
        return self
