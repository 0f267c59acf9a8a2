"""kernels/precompile.py without ComfyUI: the fingerprint that stands in for the guards PyTorch is told to drop,
the key's parts, the folder's clean-up of saves a killed process left behind, what a compile process is sent
(the module and the call on the meta device), and repeated blocks compiled once per signature."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import torch

from mv4d.kernels.precompile import (CompiledCall, CompiledStore, CompileKey, RepeatedBlock, blocks_as_regions, build,
                                    compiled_once, module_fingerprint, on_device, on_meta, tensors_in)


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


class Residual(torch.nn.Module):
    """A repeated block: its own weights, the same code at every position."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.project = torch.nn.LayerNorm(width), torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.project(self.norm(x)))


class Tower(torch.nn.Module):
    """An input layer (as a UNet's first convolution: a block fed the graph's own input is a signature of its own),
    three blocks at width 8, a widening, three blocks at width 16: two block signatures, six blocks."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.narrow = torch.nn.ModuleList(Residual(8) for _ in range(3))
        self.widen = torch.nn.Linear(8, 16)
        self.wide = torch.nn.ModuleList(Residual(16) for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        for block in self.narrow:
            x = block(x)
        x = self.widen(x)
        for block in self.wide:
            x = block(x)
        return x


RESIDUAL_BLOCKS = (RepeatedBlock(Residual, compiled_once(Residual.forward)),)


def tower_forward(module, x):
    return module(x)


def regions_traced(module, x, blocks) -> int:
    """How many block graphs Dynamo's trace of `module(x)` holds (its nested compile regions)."""
    graphs = []

    def count(graph_module, example_inputs):
        graphs.append(sum(name.startswith("subgraph") for name, _ in graph_module.named_children()))
        return graph_module.forward

    torch._dynamo.reset()
    with blocks_as_regions(module, blocks):
        torch.compile(tower_forward, backend=count, fullgraph=True, dynamic=False)(module, x)
    return graphs[0]


def test_repeated_blocks_are_traced_once_per_signature():
    tower = Tower()
    x = torch.randn(4, 8)
    assert regions_traced(tower, x, ()) == 0  # inlined: six copies of the block in one graph
    assert regions_traced(tower, x, RESIDUAL_BLOCKS) == 2  # one region per width, each used three times


def test_blocks_run_their_own_forward_outside_a_compile_and_are_left_as_they_were():
    tower = Tower()
    x = torch.randn(4, 8)
    expected = tower(x)
    with blocks_as_regions(tower, RESIDUAL_BLOCKS):
        assert all("forward" in vars(block) for block in tower.narrow)
        assert torch.equal(tower(x), expected)
    assert not any("forward" in vars(block) for block in tower.modules())
    assert module_fingerprint(tower) == module_fingerprint(Tower())


def test_a_build_with_regions_saves_a_file_that_gives_the_eager_result(tmp_path):
    torch.manual_seed(0)
    tower = Tower()
    x = torch.randn(4, 8)
    path = tmp_path / "tower.compiled"
    with torch.inference_mode():
        expected = tower(x)
        torch._dynamo.reset()
        build(tower_forward, tower, (x,), path, RESIDUAL_BLOCKS)
        loaded = CompiledCall.load(path)
        assert loaded.accepts(tower, x)
        torch.testing.assert_close(loaded(tower, x), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["tower.compiled"]
