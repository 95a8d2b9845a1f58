"""Tests the ComfyUI node pack without ComfyUI: the nodes come from the manifest, train
on the tiny model through the real library, convert and inspect; then again with stand-ins
for ComfyUI's modules (folders, progress bar, interrupt).

    SDTI_LIBRARY=target/debug/libsdti.so SDTI_TEST_MODEL=tests/fixtures/tiny-sd \
        SDTI_TEST_OUT=/tmp/out python3 plugin-manifests/comfyui/tests/test_nodes.py

Run by tests/suite/ffi.rs. numpy is used when installed, else IMAGE is nested lists.
"""

import importlib.util
import json
import os
import sys
import tempfile
import types

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(PACK))
MODEL = os.environ.get("SDTI_TEST_MODEL", os.path.join(REPO, "tests", "fixtures", "tiny-sd"))
OUT = os.environ.get("SDTI_TEST_OUT") or tempfile.mkdtemp(prefix="sdti-comfy-")

try:
    import numpy as np
except ImportError:
    np = None
    print("numpy not installed: IMAGE given as nested lists")


def load_pack(name):
    """Imports the pack as ComfyUI does (a package from its folder)."""
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(PACK, "__init__.py"), submodule_search_locations=[PACK]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def images(batch=2, size=64):
    """A batch of pictures: a disc moving across a gradient, floats in 0..1."""
    out = []
    for k in range(batch):
        img = []
        for y in range(size):
            row = []
            for x in range(size):
                inside = (x - 32 - 3 * k) ** 2 + (y - 30) ** 2 < 300
                row.append([0.86, 0.24, 0.16] if inside else [0.1 + 0.08 * k, 0.35, x / size])
            img.append(row)
        out.append(img)
    return np.asarray(out, dtype=np.float32) if np is not None else out


def train_args(**over):
    args = dict(
        checkpoint=MODEL, images=images(), token="pyword", init_text="toy", vectors=2,
        steps=3, learning_rate="0.005", batch_size=1, seed=1, template="object",
        resolution=64, device="cpu",
    )
    args.update(over)
    return args


def test_without_comfyui():
    for mod in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management"):
        sys.modules.pop(mod, None)
    pack = load_pack("sdti_pack_plain")
    with open(pack.nodes.find_manifest(), encoding="utf-8") as f:
        manifest = json.load(f)
    ids = [n["id"] for n in manifest["nodes"]]
    assert sorted(pack.NODE_CLASS_MAPPINGS) == sorted(ids), pack.NODE_CLASS_MAPPINGS
    for node in manifest["nodes"]:
        cls = pack.NODE_CLASS_MAPPINGS[node["id"]]
        required = cls.INPUT_TYPES()["required"]
        assert list(required) == [i["name"] for i in node["inputs"]], node["id"]
        for spec in node["inputs"]:
            entry = required[spec["name"]]
            for key in ("default", "min", "max"):
                if key in spec:
                    assert entry[1][key] == spec[key], (node["id"], spec["name"], key)
        assert cls.RETURN_TYPES == tuple(o["type"] for o in node["outputs"])
        assert cls.C_FUNCTIONS == tuple(node["c_functions"])
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node["id"]] == node["display_name"]

    os.environ["SDTI_EMBEDDINGS_DIR"] = os.path.join(OUT, "plain-embeddings")
    train = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]()
    prompt, path = train.run(**train_args())
    assert prompt == "embedding:pyword", prompt
    assert os.path.exists(path) and path.endswith("pyword.safetensors"), path

    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]()
    summary, vectors, text = inspect.run(embedding=path)
    info = json.loads(summary)
    assert vectors == 2 and info["width"] == "32" and info["name"] == "pyword", summary
    assert text == "embedding:pyword", summary

    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()
    (pt,) = convert.run(embedding=path, format="a1111-pt", precision="f16", name="")
    assert pt.endswith("pyword-a1111-pt.pt") and os.path.exists(pt), pt
    assert json.loads(inspect.run(embedding=pt)[0])["source_format"] == "a1111-pt"

    lib = pack.nodes.library()
    try:
        train.run(**train_args(token="two words"))
        raise AssertionError("a token with a space must fail")
    except pack.nodes.sdti_lib.SdtiError as e:
        assert e.status == 2 and "token" in str(e), e
    assert lib.has_feature("sdti.train/1") and not lib.has_feature("sdti.train/99")


class Interrupted(Exception):
    pass


def fake_comfyui(root, interrupt_after):
    """Stand-ins for the parts of ComfyUI the pack uses."""
    state = {"updates": [], "step": 0}
    folder_paths = types.ModuleType("folder_paths")
    folders = {
        "checkpoints": os.path.dirname(MODEL),
        "embeddings": os.path.join(root, "embeddings"),
    }
    folder_paths.get_filename_list = lambda f: sorted(os.listdir(folders[f])) if os.path.isdir(folders[f]) else []
    folder_paths.get_full_path = lambda f, name: os.path.join(folders[f], name) if os.path.exists(os.path.join(folders[f], name)) else None
    folder_paths.get_folder_paths = lambda f: [folders[f]]

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["updates"].append(value)
            state["step"] = value

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.processing_interrupted = lambda: interrupt_after is not None and state["step"] >= interrupt_after

    def throw():
        if mm.processing_interrupted():
            raise Interrupted()

    mm.throw_exception_if_processing_interrupted = throw
    comfy.utils, comfy.model_management = utils, mm
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm})
    return state


def test_with_comfyui_stand_ins():
    root = os.path.join(OUT, "comfy")
    state = fake_comfyui(root, interrupt_after=None)
    pack = load_pack("sdti_pack_comfy")
    node = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]
    choices = node.INPUT_TYPES()["required"]["checkpoint"][0]
    # The tiny model is a diffusers folder (its single-file form needs a config: 32 wide).
    name = os.path.basename(MODEL)
    assert name in choices, choices
    prompt, path = node().run(**train_args(checkpoint=name, token="comfyword", steps=4))
    assert prompt == "embedding:comfyword"
    assert path == os.path.join(root, "embeddings", "comfyword.safetensors"), path
    assert state["updates"] == [1, 2, 3, 4], state["updates"]
    assert "comfyword.safetensors" in pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"].INPUT_TYPES()["required"]["embedding"][0]

    # ComfyUI's interrupt stops training through the progress callback.
    state = fake_comfyui(root, interrupt_after=2)
    pack = load_pack("sdti_pack_comfy2")
    try:
        pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run(**train_args(checkpoint=name, token="stopped", steps=500))
        raise AssertionError("the interrupt must stop training")
    except Interrupted:
        pass
    assert state["updates"] == [1, 2], state["updates"]
    assert not os.path.exists(os.path.join(root, "embeddings", "stopped.safetensors"))


if __name__ == "__main__":
    test_without_comfyui()
    test_with_comfyui_stand_ins()
    print("comfyui pack: ok")
