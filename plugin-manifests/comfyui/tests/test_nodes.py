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
        types = cls.INPUT_TYPES()
        required, optional = types["required"], types.get("optional", {})
        assert list(required) == [i["name"] for i in node["inputs"] if not i.get("optional")], node["id"]
        assert list(optional) == [i["name"] for i in node["inputs"] if i.get("optional")], node["id"]
        for spec in node["inputs"]:
            entry = (optional if spec.get("optional") else required)[spec["name"]]
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
    # Chained after Train: its path output goes to the optional path input.
    assert inspect.run(embedding="", path=path) == (summary, vectors, text)

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
    # precision: auto is f32 on the CPU; bf16 there is refused with the reason.
    try:
        train.run(**train_args(precision="bf16"))
        raise AssertionError("bf16 on the CPU must fail")
    except pack.nodes.sdti_lib.SdtiError as e:
        assert "bf16 needs a GPU" in str(e), e


def fake_comfyui(root, interrupt_after, hook=True):
    """Stand-ins for the parts of ComfyUI the pack uses, behaving as ComfyUI 0.3.x does:
    get_filename_list lists only files with model extensions (recursively), get_full_path
    resolves only files, and the server's progress hook (main.py hijack_progress) calls
    throw_exception_if_processing_interrupted, which clears the flag and raises."""
    state = {"updates": [], "interrupt": False}
    folder_paths = types.ModuleType("folder_paths")
    folders = {
        "checkpoints": os.path.join(root, "checkpoints"),
        "embeddings": os.path.join(root, "embeddings"),
    }
    os.makedirs(folders["checkpoints"], exist_ok=True)
    link = os.path.join(folders["checkpoints"], os.path.basename(MODEL))
    if not os.path.exists(link):
        try:
            os.symlink(MODEL, link, target_is_directory=True)
        except OSError:
            import shutil
            shutil.copytree(MODEL, link)
    for name in ("single.safetensors", "notes.txt"):
        open(os.path.join(folders["checkpoints"], name), "wb").close()
    extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

    def get_filename_list(f):
        out = []
        for dirpath, _dirs, files in os.walk(folders[f], followlinks=True):
            for name in files:
                if os.path.splitext(name)[1].lower() in extensions:
                    out.append(os.path.relpath(os.path.join(dirpath, name), folders[f]))
        return sorted(out)

    def get_full_path(f, name):
        path = os.path.join(folders[f], name)
        return path if os.path.isfile(path) else None

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_folder_paths = lambda f: [folders[f]]

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    def processing_interrupted():
        return state["interrupt"]

    def throw():
        if state["interrupt"]:
            state["interrupt"] = False
            raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw

    def server_hook(value, total, preview, prompt_id=None, node_id=None):
        if interrupt_after is not None and value > interrupt_after:
            state["interrupt"] = True  # the user pressed Cancel while this step ran
        throw()  # as hijack_progress does, before it reports the step
        state["updates"].append(value)

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current = total, 0
            self.hook = server_hook if hook else None

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=None)

    utils.ProgressBar = ProgressBar
    comfy.utils, comfy.model_management = utils, mm
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm})
    return state


def test_with_comfyui_stand_ins():
    root = os.path.join(OUT, "comfy")
    state = fake_comfyui(root, interrupt_after=None)
    pack = load_pack("sdti_pack_comfy")
    node = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]
    choices = node.INPUT_TYPES()["required"]["checkpoint"][0]
    # The tiny model is a diffusers folder (its single-file form needs a config: 32 wide):
    # ComfyUI does not list folders, the pack adds those holding model_index.json.
    name = os.path.basename(MODEL)
    assert name in choices and "single.safetensors" in choices, choices
    assert "notes.txt" not in choices, choices
    assert not [c for c in choices if c.startswith(name + os.sep)], choices  # its parts
    assert pack.nodes.resolve_file("checkpoints", name) == os.path.join(root, "checkpoints", name)
    try:
        pack.nodes.resolve_file("checkpoints", os.path.join("..", "embeddings"))
        raise AssertionError("a folder outside the checkpoints must not resolve")
    except FileNotFoundError:
        pass
    prompt, path = node().run(**train_args(checkpoint=name, token="comfyword", steps=4))
    assert prompt == "embedding:comfyword"
    assert path == os.path.join(root, "embeddings", "comfyword.safetensors"), path
    assert state["updates"] == [1, 2, 3, 4], state["updates"]
    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]
    assert "comfyword.safetensors" in inspect.INPUT_TYPES()["optional"]["embedding"][0]
    assert inspect().run(path=path)[2] == "embedding:comfyword"
    (pt,) = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]().run(
        format="a1111-pt", precision="f32", name="", path=path)
    assert pt == os.path.join(root, "embeddings", "comfyword-a1111-pt.pt"), pt

    # ComfyUI's interrupt: the progress hook raises InterruptProcessingException; the
    # pack stops training and raises it again, so that ComfyUI reports
    # execution_interrupted rather than an error.
    state = fake_comfyui(root, interrupt_after=2)
    pack = load_pack("sdti_pack_comfy2")
    mm = sys.modules["comfy.model_management"]
    try:
        pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run(**train_args(checkpoint=name, token="stopped", steps=500))
        raise AssertionError("the interrupt must stop training")
    except mm.InterruptProcessingException:
        pass
    assert state["updates"] == [1, 2], state["updates"]
    assert not state["interrupt"], "the hook consumes the interrupt"
    assert not os.path.exists(os.path.join(root, "embeddings", "stopped.safetensors"))

    # Without the server's hook the pack polls the flag itself, and still raises
    # InterruptProcessingException.
    state = fake_comfyui(root, interrupt_after=None, hook=False)
    pack = load_pack("sdti_pack_comfy3")
    mm = sys.modules["comfy.model_management"]
    state["interrupt"] = True
    try:
        pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run(**train_args(checkpoint=name, token="stopped", steps=500))
        raise AssertionError("the interrupt must stop training")
    except mm.InterruptProcessingException:
        pass
    assert not state["interrupt"]
    assert not os.path.exists(os.path.join(root, "embeddings", "stopped.safetensors"))


if __name__ == "__main__":
    test_without_comfyui()
    test_with_comfyui_stand_ins()
    print("comfyui pack: ok")
