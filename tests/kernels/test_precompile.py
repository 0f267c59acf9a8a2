"""kernels/precompile.py without ComfyUI: the fingerprint that stands in for the guards PyTorch is told to drop,
the key's parts, the folder's clean-up of saves a killed process left behind, and what a compile process is sent
(the module and the call on the meta device)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import torch

from mv4d.kernels.precompile import CompiledStore, CompileKey, module_fingerprint, on_device, on_meta, tensors_in


class Attention(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.project = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.project(x)


def test_the_fingerprint_follows_structure_not_weights():
    torch.manual_seed(0)
    first, other_weights = Attention(8, 2), Attention(8, 2)
    assert not torch.equal(first.project.weight, other_weights.project.weight)
    assert module_fingerprint(first) == module_fingerprint(other_weights)
    assert module_fingerprint(first) != module_fingerprint(Attention(8, 4))  # a simple attribute the code reads
    assert module_fingerprint(first) != module_fingerprint(Attention(16, 2))  # tensor shapes
    assert module_fingerprint(first) != module_fingerprint(Attention(8, 2).to(torch.bfloat16))  # dtypes
    swapped = Attention(8, 2)
    swapped.project = torch.nn.Sequential(torch.nn.Linear(8, 8))  # another module tree (an object patch)
    assert module_fingerprint(first) != module_fingerprint(swapped)


def test_the_key_changes_with_the_call_and_its_autograd_state():
    module = Attention(8, 2)
    x = torch.zeros(3, 8)
    key = CompileKey.of(module, {"x": x}).digest
    assert CompileKey.of(Attention(8, 2), {"x": torch.ones(3, 8)}).digest == key  # values do not matter
    assert CompileKey.of(module, {"x": torch.zeros(4, 8)}).digest != key
    assert CompileKey.of(module, {"x": torch.zeros(8, 3).t()}).digest != key  # strides
    with torch.no_grad():
        no_grad = CompileKey.of(module, {"x": x}).digest
    with torch.inference_mode():
        inference = CompileKey.of(module, {"x": x}).digest
    assert len({key, no_grad, inference}) == 3  # compiled code is specialised to the autograd state


def test_partial_saves_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    dead = tmp_path / f"a.compiled.partial-{dead_pid}"
    live = tmp_path / f"b.compiled.partial-{os.getpid()}"
    kept = tmp_path / "c.compiled"
    for path in (dead, live, kept):
        path.write_bytes(b"x")
    assert CompiledStore(tmp_path).remove_stale_partials() == [dead]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, kept.name])


def test_a_module_sent_on_the_meta_device_comes_back_with_its_fingerprint_and_no_weights():
    """What a compile process gets: the module's structure without its data (pickled in bytes, not megabytes),
    rebuilt with uninitialised tensors of the same layout; the original is left as it was."""
    module = torch.nn.Sequential(Attention(64, 2), torch.nn.Linear(64, 256).to(torch.bfloat16))
    module[0].project.weight.data = module[0].project.weight.data.t().contiguous().t()  # a strided weight
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    sent = io.BytesIO()
    torch.save(on_meta(module), sent)
    assert sent.tell() < 20_000  # 4 * 64 * 64 + 2 * 64 * 256 bytes of weights would be over 49 kB
    rebuilt = on_device(torch.load(io.BytesIO(sent.getvalue()), weights_only=False), torch.device("cpu"))
    assert module_fingerprint(rebuilt) == module_fingerprint(module)
    assert all(tensor.device.type == "cpu" for tensor in rebuilt.state_dict().values())
    assert all(torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())


def test_arguments_sent_on_the_meta_device_keep_layout_order_and_inference_flags():
    with torch.inference_mode():
        x = torch.randn(2, 3, 4).transpose(1, 2)
    arguments = (x, torch.zeros(5), None, {"b": torch.ones(2, dtype=torch.int64), "a": 3}, [torch.zeros(1)])
    flags = [tensor.is_inference() for tensor in tensors_in(arguments)]
    assert flags == [True, False, False, False]
    rebuilt = on_device(on_meta(arguments), torch.device("cpu"), flags)
    assert [tensor.is_inference() for tensor in tensors_in(rebuilt)] == flags
    for original, copy in zip(tensors_in(arguments), tensors_in(rebuilt)):
        assert (copy.shape, copy.stride(), copy.dtype) == (original.shape, original.stride(), original.dtype)
    assert rebuilt[2] is None and rebuilt[3]["a"] == 3 and list(rebuilt[3]) == ["b", "a"]
