"""The workflow: loading, the input node, --set overrides, and the checks against /object_info."""

import copy
import json

import pytest
from runner_fake_comfyui import OBJECT_INFO, image_workflow

from mv4d.runner.errors import RunnerError
from mv4d.runner.workflow import (apply_overrides, check_against_object_info, combo_options, find_input_node, format_prompt_errors,
                                  load_workflow, parse_override, set_input, workflow_sha256)


def test_load_refuses_ui_workflows_and_non_json(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(RunnerError, match=r"UI workflow.*Export \(API\)"):
        load_workflow(ui)
    broken = tmp_path / "broken.json"
    broken.write_text('{"1": {"class_type": ')
    with pytest.raises(RunnerError, match="not JSON"):
        load_workflow(broken)
    with pytest.raises(RunnerError, match="cannot read the workflow"):
        load_workflow(tmp_path / "missing.json")


def test_workflow_hash_ignores_key_order_and_whitespace():
    workflow = image_workflow()
    reordered = json.loads(json.dumps(dict(reversed(list(workflow.items()))), indent=4))
    assert workflow_sha256(workflow) == workflow_sha256(reordered)
    workflow["4"]["inputs"]["filename_prefix"] = "other"
    assert workflow_sha256(workflow) != workflow_sha256(reordered)


def test_input_node_by_class_type():
    node = find_input_node(image_workflow())
    assert (node.node_id, node.input_name, node.takes) == ("1", "image", "image")
    video = {"7": {"class_type": "LoadVideo", "inputs": {"file": "x.mp4"}}}
    assert find_input_node(video).input_name == "file"
    multiview = {"3": {"class_type": "MV4D_LoadMultiviewImages", "inputs": {"folder": "x", "size": 576}}}
    assert (find_input_node(multiview).input_name, find_input_node(multiview).takes) == ("folder", "multiview")


def test_no_or_several_input_nodes_are_errors_that_suggest_input_node():
    workflow = image_workflow()
    with pytest.raises(RunnerError, match="no input node"):
        find_input_node({key: node for key, node in workflow.items() if key != "1"})
    workflow["9"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}, "_meta": {"title": "Mask"}}
    with pytest.raises(RunnerError, match=r"several input nodes: node 1 'Load Image' \(LoadImage\), node 9 'Mask'.*--input-node"):
        find_input_node(workflow)
    assert find_input_node(workflow, "9").node_id == "9"
    with pytest.raises(RunnerError, match="it is a SaveImage"):
        find_input_node(workflow, "4")


def test_set_input_patches_a_copy():
    workflow = image_workflow()
    patched = set_input(workflow, find_input_node(workflow), "mv4d_batch/0123abcd/a.png")
    assert patched["1"]["inputs"]["image"] == "mv4d_batch/0123abcd/a.png" and workflow["1"]["inputs"]["image"] == "example.png"


@pytest.mark.parametrize("text, expected", [
    ("seed=5", ("seed", 5)), ("cfg=2.5", ("cfg", 2.5)), ("flag=true", ("flag", True)), ("prefix=out/x", ("prefix", "out/x")),
    ("prefix=007", ("prefix", "007")), ('name="a b"', ("name", "a b")), ("4.filename_prefix=run=2", ("4.filename_prefix", "run=2")),
])
def test_override_values_are_json_when_they_parse(text, expected):
    assert parse_override(text) == expected


def test_override_needs_key_and_value():
    with pytest.raises(RunnerError, match="expected KEY=VALUE"):
        parse_override("seed")


def test_node_id_dot_input_sets_that_input():
    patched = apply_overrides(image_workflow(), {"4.filename_prefix": "night", "3.upscale_method": "area"})
    assert patched["4"]["inputs"]["filename_prefix"] == "night" and patched["3"]["inputs"]["upscale_method"] == "area"
    assert patched["5"]["inputs"]["filename_prefix"] == "batch"
    with pytest.raises(RunnerError, match="has no input 'prefix'.*its inputs: images, filename_prefix"):
        apply_overrides(image_workflow(), {"4.prefix": "x"})
    with pytest.raises(RunnerError, match="the workflow has no node 42"):
        apply_overrides(image_workflow(), {"42.seed": 1})


def test_a_bare_key_sets_the_value_of_nodes_with_that_title_case_insensitively():
    patched = apply_overrides(image_workflow(), {"SIZE": 32})
    assert patched["2"]["inputs"]["value"] == 32
    assert patched["3"]["inputs"]["width"] == ["2", 0]  # the link is untouched: it carries the new value


def test_a_bare_key_sets_that_literal_input_on_every_node():
    patched = apply_overrides(image_workflow(), {"filename_prefix": "x"})
    assert patched["4"]["inputs"]["filename_prefix"] == patched["5"]["inputs"]["filename_prefix"] == "x"


def test_linked_inputs_are_never_overwritten():
    with pytest.raises(RunnerError, match=r"input 'width' of node 3 'Scale' \(ImageScale\) is linked to node 2"):
        apply_overrides(image_workflow(), {"width": 100})
    with pytest.raises(RunnerError, match="is linked to node 1"):
        apply_overrides(image_workflow(), {"3.image": "x"})


def test_an_override_matching_nothing_lists_what_could_match():
    with pytest.raises(RunnerError) as caught:
        apply_overrides(image_workflow(), {"seed": 1})
    message = str(caught.value)
    assert "nothing in the workflow matches" in message and "titled value nodes: size" in message
    assert "filename_prefix" in message and "upscale_method" in message and "NODE_ID.INPUT" in message


def test_combo_options_in_both_object_info_formats():
    assert combo_options([["euler", "dpmpp_2m"]]) == ["euler", "dpmpp_2m"]
    assert combo_options(["COMBO", {"options": ["karras", "normal"]}]) == ["karras", "normal"]
    assert combo_options(["COMBO", {"options": [], "remote": {"route": "/x"}}]) is None
    assert combo_options(["INT", {"default": 3}]) is None and combo_options(None) is None


def sampler_workflow(**changes) -> dict:
    workflow = image_workflow()
    workflow["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}
    workflow["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "lora_name": "detail.safetensors", "strength_model": 1.0}}
    workflow["12"] = {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 1, "steps": 20, "sampler_name": "euler",
                                                           "scheduler": "karras"}}
    for key, value in changes.items():
        node_id, input_name = key.split("_", 1)
        workflow[node_id]["inputs"][input_name] = value
    return workflow


def test_a_valid_workflow_passes_even_though_its_input_file_is_not_listed():
    workflow = sampler_workflow()
    workflow["1"]["inputs"]["image"] = "mv4d_batch/0123abcd/a.png"  # uploaded per item, never in the list
    assert check_against_object_info(workflow, OBJECT_INFO, find_input_node(workflow)) == []


def test_unknown_node_types_are_listed_with_their_nodes():
    workflow = image_workflow()
    workflow["8"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["1", 0]}}
    workflow["9"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["8", 0]}}
    [problem] = check_against_object_info(workflow, OBJECT_INFO, find_input_node(workflow))
    assert "FancyUpscaler (node 8, 9)" in problem and "install the custom node pack" in problem


@pytest.mark.parametrize("change, expected", [
    ({"10_ckpt_name": "sdxl.safetensors"},  # COMBO format
     "node 10 (CheckpointLoaderSimple) input 'ckpt_name': model file 'sdxl.safetensors' not found in models/checkpoints"),
    ({"11_lora_name": "style.safetensors"},  # classic list format
     "node 11 (LoraLoader) input 'lora_name': model file 'style.safetensors' not found in models/loras"),
    ({"12_sampler_name": "heun"}, "node 12 (KSampler) input 'sampler_name': 'heun' is not one of 'euler', 'dpmpp_2m'"),
    ({"12_scheduler": "simple"}, "node 12 (KSampler) input 'scheduler': 'simple' is not one of 'karras', 'normal'"),
])
def test_combo_values_must_be_options_and_missing_models_name_their_folder(change, expected):
    workflow = sampler_workflow(**change)
    [problem] = check_against_object_info(workflow, OBJECT_INFO, find_input_node(workflow))
    assert problem.startswith(expected)


def test_an_unknown_loader_names_its_class_for_the_folder():
    info = copy.deepcopy(OBJECT_INFO)
    info["UpscaleModelLoader"] = {"input": {"required": {"model_name": [["4x.pth"]]}}}
    workflow = image_workflow()
    workflow["9"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "8x.pth"}}
    [problem] = check_against_object_info(workflow, info, find_input_node(workflow))
    assert "model file '8x.pth' not found in the model folder of UpscaleModelLoader" in problem and "available: '4x.pth'" in problem


def test_prompt_validation_errors_are_one_line_per_node_and_input():
    answer = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": ""},
              "node_errors": {"12": {"class_type": "KSampler", "errors": [
                  {"type": "value_bigger_than_max", "message": "Value 20000 bigger than max of 10000", "details": "steps",
                   "extra_info": {"input_name": "steps"}}]},
                  "1": {"class_type": "LoadImage", "errors": [
                      {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                       "details": "image - Invalid image file: a.png", "extra_info": {}}]}}}
    assert format_prompt_errors(answer, sampler_workflow()) == [
        "node 12 (KSampler) input 'steps': Value 20000 bigger than max of 10000 (steps)",
        "node 1 'Load Image' (LoadImage): Custom validation failed for node (image - Invalid image file: a.png)",
    ]
    answer = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Foo does not exist.", "details": ""},
              "node_errors": {}}
    assert format_prompt_errors(answer, {}) == ["Cannot execute because node Foo does not exist."]


def test_4dms_two_files_name_their_folders():
    info = copy.deepcopy(OBJECT_INFO)
    info["MV4D_Load4DM"] = {"input": {"required": {"fourdm": ["COMBO", {"options": ["mm_sd_v15_v2.ckpt"]}],
                                                   "base_ckpt": ["COMBO", {"options": ["sd15.safetensors"]}]}}}
    workflow = image_workflow()
    workflow["9"] = {"class_type": "MV4D_Load4DM", "inputs": {"fourdm": "4dm.ckpt", "base_ckpt": "sd-v2.1-base-4view-ipmv.pt"}}
    fourdm, base = check_against_object_info(workflow, info, find_input_node(workflow))
    assert fourdm.startswith("node 9 (MV4D_Load4DM) input 'fourdm': model file '4dm.ckpt' not found in models/animatediff_models")
    assert base.startswith("node 9 (MV4D_Load4DM) input 'base_ckpt': model file 'sd-v2.1-base-4view-ipmv.pt' not found in models/checkpoints")
