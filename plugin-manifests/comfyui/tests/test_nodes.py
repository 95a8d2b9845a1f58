"""Tests the ComfyUI node pack without ComfyUI: the node classes match the manifest, train
on the tiny models through the real library (SD 1.x, and the tiny SD 2.x and SDXL beside it
in tests/fixtures), convert and inspect; then again with stand-ins for ComfyUI's modules
(folders, progress bar, interrupt, logging) that behave as ComfyUI 0.3.x does where the
pack depends on it.

    SDTI_LIBRARY=target/debug/libsdti.so SDTI_TEST_MODEL=tests/fixtures/tiny-sd \
        SDTI_TEST_OUT="$(mktemp -d)" python3 plugin-manifests/comfyui/tests/test_nodes.py

Run by tests/suite/ffi.rs. numpy is used when installed, else IMAGE is nested lists.
"""

import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import types
from inspect import signature

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(PACK))
MODEL = os.environ.get("SDTI_TEST_MODEL", os.path.join(REPO, "tests", "fixtures", "tiny-sd"))
# The tiny model's single-file form: 32 wide, so its head count is unknown without a config.
SINGLE_FILE = os.path.normpath(MODEL) + ".safetensors"
OUT = os.environ.get("SDTI_TEST_OUT") or tempfile.mkdtemp(prefix="sdti-comfy-")
# The other families' tiny models (diffusers folders) and the SDXL embedding fixture:
# beside the SD 1.x one in tests/fixtures, unless given.
FIXTURES = os.path.dirname(os.path.normpath(MODEL))
SD2_MODEL = os.environ.get("SDTI_TEST_SD2_MODEL", os.path.join(FIXTURES, "tiny-sd2"))
SDXL_MODEL = os.environ.get("SDTI_TEST_SDXL_MODEL", os.path.join(FIXTURES, "tiny-sdxl"))
SDXL_WORD = os.path.join(FIXTURES, "embeddings", "sdxl.safetensors")

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
    if size < 64:  # a size the library refuses
        return np.zeros((batch, size, size, 3), np.float32) if np is not None else \
            [[[[0.0] * 3] * size] * size] * batch
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


def safetensors_shapes(path):
    """{key: shape} of a safetensors file, read from its header (no torch needed)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def text_width(model, part="text_encoder"):
    """The width of a diffusers folder's text encoder, from its config.json."""
    with open(os.path.join(model, part, "config.json"), encoding="utf-8") as f:
        return json.load(f)["hidden_size"]


def v_prediction_copy(model, where):
    """The diffusers folder `model` as a v-prediction model (an SD 2.x 768-v): its parts
    linked (copied where links fail), its scheduler config saying v_prediction."""
    os.makedirs(where, exist_ok=True)
    for part in os.listdir(model):
        src, dst = os.path.join(model, part), os.path.join(where, part)
        if part == "scheduler" or os.path.lexists(dst):
            continue
        try:
            os.symlink(os.path.abspath(src), dst, target_is_directory=os.path.isdir(src))
        except OSError:
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    os.makedirs(os.path.join(where, "scheduler"), exist_ok=True)
    with open(os.path.join(model, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["prediction_type"] == "epsilon", config
    config["prediction_type"] = "v_prediction"
    with open(os.path.join(where, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return where


def train_args(**over):
    args = dict(
        checkpoint=MODEL, images=images(), token="pyword", init_text="toy", vectors=2,
        steps=3, learning_rate="0.005", batch_size=1, seed=1, template="object",
        resolution=64, device="cpu",
    )
    args.update(over)
    return args


def expect(error, fn, *args, **kwargs):
    """Runs fn, which must raise `error`; returns the message."""
    try:
        fn(*args, **kwargs)
    except error as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} did not raise {error.__name__}")


def as_comfyui_merges(returned):
    """A node's return value as ComfyUI's get_output_from_returns reads it: a dict gives
    'ui' (each value a list, concatenated over calls) and 'result'; a tuple is the result."""
    if isinstance(returned, dict):
        ui = {k: [y for x in [returned["ui"]] for y in x[k]] for k in returned["ui"]}
        return returned["result"], ui
    return returned, {}


def expected_input(spec, files):
    """One manifest input as ComfyUI's INPUT_TYPES entry must read, written from the
    manifest's type descriptions (types); files(folder) lists a model folder."""
    kind = spec["type"]
    options = {k: spec[k] for k in ("default", "min", "max", "step", "tooltip") if k in spec}
    if kind in ("MODEL_FILE", "EMBEDDING_FILE"):
        extra = {"tooltip": spec["tooltip"]} if "tooltip" in spec else {}
        return (files(spec["folder"]),) + ((extra,) if extra else ())
    if kind == "CHOICE":
        return (list(spec["options"]), options)
    if kind in ("STRING", "NAME"):
        return ("STRING", dict(options, multiline=False))
    if kind in ("INT", "FLOAT", "IMAGE", "BOOLEAN"):
        return (kind, options) if options else (kind,)
    raise AssertionError(f"manifest input type {kind} has no ComfyUI mapping in this test")


def check_classes_match_manifest(pack, manifest):
    """Item 7: the node classes are written out; the manifest stays the source of truth.
    Every class says what the manifest says: inputs (names, order, required or optional,
    types, defaults, ranges, options, tooltips), outputs, names, category, description, the
    C functions, and the constants its choices name."""
    nodes = pack.nodes
    assert list(pack.NODE_CLASS_MAPPINGS) == [n["id"] for n in manifest["nodes"]], \
        list(pack.NODE_CLASS_MAPPINGS)
    assert set(manifest["types"]) >= {i["type"] for n in manifest["nodes"] for i in n["inputs"]}
    constants = manifest["constants"]
    for node in manifest["nodes"]:
        nid = node["id"]
        cls = pack.NODE_CLASS_MAPPINGS[nid]
        assert cls.__name__ == nid, cls
        want = {"required": {}}
        for spec in node["inputs"]:
            group = want.setdefault("optional", {}) if spec.get("optional") else want["required"]
            group[spec["name"]] = expected_input(spec, nodes._folder_files)
        got = cls.INPUT_TYPES()
        assert list(got) == list(want), (nid, list(got))
        for group in want:
            # Order matters: ComfyUI draws the widgets in this order.
            assert list(got[group]) == list(want[group]), (nid, group, list(got[group]))
            for name, entry in want[group].items():
                assert got[group][name] == entry, (nid, name, got[group][name], entry)
                assert type(got[group][name]) is tuple, (nid, name)
        # The node's run takes exactly the manifest's inputs.
        params = list(signature(getattr(cls, cls.FUNCTION)).parameters)
        assert params[0] == "self" and set(params[1:]) == {i["name"] for i in node["inputs"]}, \
            (nid, params)
        for spec in node["inputs"]:
            if "within" in spec:
                assert tuple(spec["within"]) == nodes.PATH_WITHIN, (nid, spec["name"])
            if "flag" in spec:
                assert spec["type"] == "BOOLEAN" and spec["flag"] in constants["write_flags"], spec
            if spec["type"] == "CHOICE" and spec["name"] in ("format", "precision", "recompute"):
                unknown = set(spec["options"]) - set(constants[spec["name"]])
                assert not unknown, (nid, spec["name"], unknown)
                if spec["name"] == "format":
                    assert set(spec["options"]) <= set(constants["format_extension"]), nid
        assert cls.RETURN_TYPES == tuple(o["type"] for o in node["outputs"]), nid
        assert cls.RETURN_NAMES == tuple(o["name"] for o in node["outputs"]), nid
        assert cls.OUTPUT_TOOLTIPS == tuple(o["description"] for o in node["outputs"]), nid
        assert cls.CATEGORY == node["category"], nid
        assert cls.DESCRIPTION == node["description"], nid
        assert cls.DISPLAY_NAME == node["display_name"], nid
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[nid] == node["display_name"], nid
        assert cls.OUTPUT_NODE is bool(node.get("output_node")), nid
        assert cls.C_FUNCTIONS == tuple(node["c_functions"]), nid
        # A node that writes a file runs again when that file goes (test_is_changed).
        assert hasattr(cls, "IS_CHANGED") == (node["output_folder"] is not None), nid
        if node["output_folder"] is not None:
            assert node["output_folder"] == "embeddings", nid
    assert list(pack.NODE_DISPLAY_NAME_MAPPINGS) == list(pack.NODE_CLASS_MAPPINGS)


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
    check_classes_match_manifest(pack, manifest)
    # overwrite is a BOOLEAN widget, off unless asked for.
    train_inputs = {i["name"]: i for i in manifest["nodes"][0]["inputs"]}
    assert pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"].INPUT_TYPES()["required"]["overwrite"] == (
        "BOOLEAN", {"default": False, "tooltip": train_inputs["overwrite"]["tooltip"]})
    # ABI 1.5's settings are optional inputs (older workflows load unchanged), each choice
    # one of the library's codes.
    optional = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"].INPUT_TYPES()["optional"]
    assert list(optional) == ["prediction_type", "zero_terminal_snr", "clip_skip", "random_crop",
                              "preview_prompt", "preview_every"], list(optional)
    lib_codes = pack.nodes.sdti_lib
    assert pack.nodes._PREDICTION_TYPES == {
        "model": lib_codes.SDTI_PREDICTION_MODEL, "epsilon": lib_codes.SDTI_PREDICTION_EPSILON,
        "v_prediction": lib_codes.SDTI_PREDICTION_V}
    assert pack.nodes._ZERO_SNR == {
        "model": lib_codes.SDTI_ZERO_SNR_MODEL, "off": lib_codes.SDTI_ZERO_SNR_OFF,
        "on": lib_codes.SDTI_ZERO_SNR_ON}
    for name, table in (("prediction_type", pack.nodes._PREDICTION_TYPES),
                        ("zero_terminal_snr", pack.nodes._ZERO_SNR)):
        assert train_inputs[name]["options"] == list(table), name

    lib = pack.nodes.library()
    abi = lib.abi_version()
    assert abi >> 16 == manifest["abi"]["major"] and abi & 0xFFFF >= manifest["abi"]["minor"], hex(abi)
    for feature in manifest["abi"]["required_features"]:
        assert lib.has_feature(feature), feature
    assert lib.name_check("pyword") is None
    assert lib.name_check("../x")

    os.environ["SDTI_EMBEDDINGS_DIR"] = os.path.join(OUT, "plain-embeddings")
    train = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]()
    (prompt, path), ui = as_comfyui_merges(train.run(**train_args()))
    assert prompt == "embedding:pyword", prompt
    assert os.path.exists(path) and path.endswith("pyword.safetensors"), path
    assert len(ui["text"]) == 1 and path in ui["text"][0] and "3 steps" in ui["text"][0], ui
    # The tiny model fits anywhere: auto keeps recompute off; asked for, it is on, and the
    # report says so.
    assert "recompute" not in ui["text"][0], ui
    # What the run uses: the model's prediction type and schedule, center crops.
    assert "\nrun: predicts epsilon (the model's), zero terminal SNR off (the model's), " \
        "center crops\n" in ui["text"][0], ui
    _, ui = as_comfyui_merges(
        train.run(**train_args(token="pyword-on", recompute="on")))
    assert "(recompute on)" in ui["text"][0], ui

    # ABI 1.5's run settings reach the library (sdti_trainer_prediction and the encoder
    # made from the trainer say what the run uses).
    _, ui = as_comfyui_merges(train.run(**train_args(
        token="pyword-v", prediction_type="v_prediction", zero_terminal_snr="on", clip_skip=2,
        random_crop=True)))
    report = ui["text"][0]
    assert "\nrun: predicts v_prediction (as set), zero terminal SNR on (as set), random " \
        "crops\n" in report, report
    assert "text from CLIP layer -2" in report, report
    message = expect(ValueError, train.run, **train_args(token="badpred", prediction_type="v"))
    assert "prediction_type" in message and "'v'" in message, message
    message = expect(ValueError, train.run, **train_args(token="badsnr", zero_terminal_snr="yes"))
    assert "zero_terminal_snr" in message, message
    # The tiny text encoder has 3 layers: the library refuses a deeper clip skip.
    message = expect(pack.nodes.sdti_lib.SdtiError, train.run, **train_args(token="deep", clip_skip=9))
    assert "9" in message and "3 layers" in message, message

    # Outside ComfyUI no progress display shows previews: none are drawn, the run trains.
    lib = pack.nodes.library()

    def no_preview(*_args):
        raise AssertionError("a preview was drawn without ComfyUI")

    lib.preview_rgb = no_preview
    try:
        _, ui = as_comfyui_merges(train.run(**train_args(token="pyword-previews", preview_every=1)))
        assert "3 steps" in ui["text"][0], ui
    finally:
        del lib.preview_rgb

    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]()
    summary, vectors, text = inspect.run(embedding=path)
    info = json.loads(summary)
    assert info["widths"] == [32], summary  # numbers, one per part
    assert text == "embedding:pyword", summary
    # Chained after Train: its path output goes to the optional path input. Without
    # ComfyUI any path is read (plain use).
    assert inspect.run(embedding="", path=path) == (summary, vectors, text)
    outside = os.path.join(OUT, "plain-elsewhere.safetensors")
    shutil.copy(path, outside)
    assert inspect.run(path=outside)[2] == "embedding:plain-elsewhere"

    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()
    (pt,), _ = as_comfyui_merges(convert.run(embedding=path, format="a1111-pt", precision="f16", name=""))
    assert pt.endswith("pyword-a1111-pt.pt") and os.path.exists(pt), pt
    assert json.loads(inspect.run(embedding=pt)[0])["source_format"] == "a1111-pt"

    # A token is a name: refused by the pack, naming the input, before the library runs.
    message = expect(ValueError, train.run, **train_args(token="two words"))
    assert "token" in message and "two words" in message, message
    assert lib.has_feature("sdti.train/1") and not lib.has_feature("sdti.train/99")
    # precision: auto is f32 on the CPU; bf16 there is refused with the reason.
    message = expect(pack.nodes.sdti_lib.SdtiError, train.run, **train_args(token="bf", precision="bf16"))
    assert "bf16 needs a GPU" in message, message

    # An empty init text is an error on the node, not a silent '*'.
    for empty in ("", "   "):
        message = expect(ValueError, train.run, **train_args(token="noinit", init_text=empty))
        assert "init_text" in message and "'*'" not in message, message
    # Hints name only what a front end has: no CLI options ("pass a model config").
    if os.path.exists(SINGLE_FILE):
        message = expect(pack.nodes.sdti_lib.SdtiError, train.run,
                         **train_args(checkpoint=SINGLE_FILE, token="single"))
        assert "head count" in message and "diffusers folder" in message, message
        assert "model config" not in message, message
    else:
        print(f"SKIPPED: {SINGLE_FILE} missing; the model hint was not tested")


def test_families():
    """Issue 13: the Train node trains SD 2.x and SDXL checkpoints, each with its family's
    defaults, writes SDXL words as clip_l + clip_g (what ComfyUI loads) and says what it
    found; Convert offers the SDXL formats for SDXL words and only there."""
    for mod in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management"):
        sys.modules.pop(mod, None)
    pack = load_pack("sdti_pack_families")
    nodes = pack.nodes
    lib = nodes.library()
    os.environ["SDTI_EMBEDDINGS_DIR"] = os.path.join(OUT, "family-embeddings")
    train = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]()
    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]()
    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()
    # Not set, the resolution is the model's: 0 is the default.
    resolution = train.INPUT_TYPES()["required"]["resolution"]
    assert resolution[1]["default"] == 0 and resolution[1]["min"] == 0, resolution
    for family in ("SDXL 1024", "768", "512"):
        assert family in resolution[1]["tooltip"], resolution

    # SD 2.x: one table as wide as its text encoder (1024 for the real ViT-H), written in
    # SD 1.x's layout, which ComfyUI and A1111 load for SD 2.x too.
    for model in (SD2_MODEL, SDXL_MODEL):
        if not os.path.isdir(model):
            raise AssertionError(f"{model}: the tiny model is missing (tests/fixtures)")
    (prompt, path), ui = as_comfyui_merges(
        train.run(**train_args(checkpoint=SD2_MODEL, token="sd2word")))
    assert prompt == "embedding:sd2word", prompt
    assert safetensors_shapes(path) == {"emb_params": [2, text_width(SD2_MODEL)]}, path
    report = ui["text"][0]
    # Its text from the penultimate layer, ComfyUI's own default for SD 2.x.
    assert "model: SD 2.x at 64 px, text from CLIP layer -2, word written as safetensors" \
        in report, report
    info = json.loads(inspect.run(path=path)[0])
    assert info["widths"] == [text_width(SD2_MODEL)], info

    # SDXL: two tables, clip_l as wide as text_encoder and clip_g as text_encoder_2 (32
    # and 48 in the tiny model, 768 and 1280 in SDXL), in one file.
    (prompt, path), ui = as_comfyui_merges(
        train.run(**train_args(checkpoint=SDXL_MODEL, token="xlword")))
    assert prompt == "embedding:xlword", prompt
    widths = [text_width(SDXL_MODEL), text_width(SDXL_MODEL, "text_encoder_2")]
    assert widths[0] != widths[1], widths  # a swap would show
    assert safetensors_shapes(path) == {"clip_l": [2, widths[0]], "clip_g": [2, widths[1]]}, \
        safetensors_shapes(path)
    report = ui["text"][0]
    assert "model: SDXL at 64 px, text from CLIP layer -2, word written as sdxl" in report, report
    assert "3 steps" in report, report
    info = json.loads(inspect.run(path=path)[0])
    assert info["widths"] == widths, info
    assert [p["encoder"] for p in info["parts"]] == ["clip_l", "clip_g"], info

    # Resolution 0 (not set): the family's, logged as soon as the model is loaded, before
    # the pictures are encoded (a 1x1 picture, refused by the library, ends the run there:
    # 1024 px is slow on a CPU even for the tiny model).
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    logger = logging.getLogger("sdti")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        for model, said in ((MODEL, "SD 1.x at 512 px (the model default), text from CLIP "
                             "layer -1"),
                            (SD2_MODEL, "SD 2.x at 512 px (the model default), text from CLIP "
                             "layer -2"),
                            # SD 2.x 768-v: v-prediction models were trained at 768.
                            (v_prediction_copy(SD2_MODEL, os.path.join(OUT, "tiny-sd2-v")),
                             "SD 2.x at 768 px (the model default), text from CLIP layer -2"),
                            (SDXL_MODEL, "SDXL at 1024 px (the model default), text from CLIP "
                             "layer -2")):
            del lines.lines[:]
            message = expect(nodes.sdti_lib.SdtiError, train.run, **train_args(
                checkpoint=model, token="default", resolution=0, images=images(1, 1)))
            assert "1x1" in message, message
            assert len(lines.lines) == 1, lines.lines
            assert f"{said}, word written as" in lines.lines[0], lines.lines
            if "768" in said:
                assert "v_prediction" in lines.lines[0] or "v-prediction" in lines.lines[0], \
                    lines.lines
        # SDXL's notes: what loading found (the prediction type and where it came from).
        assert "folder: epsilon" in lines.lines[0], lines.lines
    finally:
        logger.removeHandler(lines)
    # A size the library does not take is its clear error, naming the field.
    message = expect(nodes.sdti_lib.SdtiError, train.run, **train_args(token="tiny", resolution=32))
    assert "resolution" in message and "32" in message, message

    # Convert: an SDXL word goes into the formats that hold both tables, and the pack's
    # list is the library's (each option tried directly too).
    options = convert.INPUT_TYPES()["required"]["format"][0]
    assert set(nodes.SDXL_FORMATS) <= set(options), options
    (_, sd1_word), _ = as_comfyui_merges(train.run(**train_args(token="sd1word", steps=1)))
    for source, sdxl in ((path, True), (SDXL_WORD, True), (sd1_word, False)):
        stem = os.path.splitext(os.path.basename(source))[0]
        for fmt in options:
            dst = os.path.join(OUT, f"family-direct-{stem}-{fmt}.safetensors")
            status = lib.embedding_convert_ex(
                os.fsencode(source), os.fsencode(dst), nodes._constant("format", fmt),
                nodes._constant("precision", "f32"), 0)
            fits = fmt in nodes.SDXL_FORMATS if sdxl else fmt not in nodes.SDXL_ONLY_FORMATS
            assert (status == 0) == fits, (stem, fmt, status, lib.last_error())
            name = f"{stem}-{fmt}-node"
            if not fits:
                message = expect(ValueError, convert.run, format=fmt, precision="f32",
                                 name=name, path=source)
                assert message.startswith("Convert Embedding (sdti): format: "), message
                if sdxl:
                    assert "SDXL word" in message and "sdxl, kohya-pt" in message, message
                else:
                    assert "holds SDXL words" in message, message
                continue
            (dst,), ui = as_comfyui_merges(convert.run(format=fmt, precision="f32", name=name,
                                                       path=source))
            if fmt == "sdxl":
                shapes = safetensors_shapes(dst)
                assert sorted(shapes) == ["clip_g", "clip_l"], shapes
                assert json.loads(inspect.run(path=dst)[0])["widths"] == \
                    json.loads(inspect.run(path=source)[0])["widths"]
            if fmt == "diffusers-sdxl":
                # diffusers' pair: clip_l's table in NAME, clip_g's in NAME_2.
                second = dst[: -len(".safetensors")] + "_2.safetensors"
                assert ui["text"] == [f"wrote {dst} and {second}"], ui
                want = json.loads(inspect.run(path=source)[0])["widths"]
                assert [list(safetensors_shapes(f).values())[0][1] for f in (dst, second)] == want
                # Both are checked before writing: an existing second file stops it.
                os.remove(dst)
                message = expect(FileExistsError, convert.run, format=fmt, precision="f32",
                                 name=name, path=source)
                assert second in message and "'overwrite'" in message, message

    # A file that is not a checkpoint: the library's error, naming the file and saying why,
    # before any training.
    bad = os.path.join(OUT, "not-a-checkpoint.safetensors")
    with open(bad, "wb") as f:
        f.write(b"these are not weights")
    message = expect(nodes.sdti_lib.SdtiError, train.run, **train_args(checkpoint=bad, token="bad"))
    assert "not-a-checkpoint.safetensors: not a readable safetensors file" in message, message
    # An SDXL word picked as the checkpoint (both are .safetensors in ComfyUI's lists).
    message = expect(nodes.sdti_lib.SdtiError, train.run,
                     **train_args(checkpoint=SDXL_WORD, token="bad"))
    assert "not a Stable Diffusion checkpoint" in message and "clip_l" in message, message
    assert not os.path.exists(os.path.join(OUT, "family-embeddings", "bad.safetensors"))


def fake_comfyui(root, interrupt_after=None, hook=True):
    """Stand-ins for the parts of ComfyUI the pack uses, behaving as ComfyUI 0.3.x does
    (folder_paths.py, comfy/utils.py, comfy/model_management.py, main.py):
    - get_folder_paths gives a copy of a kind's folders (embeddings has two here, as with
      extra_model_paths.yaml); get_input_directory/get_output_directory their folders;
    - get_filename_list lists files with model extensions, recursively, following linked
      folders (os.path.isdir) and skipping .git;
    - get_full_path reads the name as relpath(join('/', name), '/'), returns the first
      folder's path that isfile, and for a link that is not a file logs
      "WARNING path ... exists but doesn't link anywhere, skipping." through logging;
    - the server's progress hook (main.py hijack_progress) calls
      throw_exception_if_processing_interrupted, which clears the flag and raises.
    The state's "warnings" are the logging warnings recorded meanwhile."""
    state = {"updates": [], "previews": [], "interrupt": False, "warnings": [], "on_step": None}
    folder_paths = types.ModuleType("folder_paths")
    extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    names_and_paths = {
        "checkpoints": ([os.path.join(root, "models", "checkpoints")], extensions),
        "embeddings": (
            [os.path.join(root, "models", "embeddings"), os.path.join(root, "extra", "embeddings")],
            extensions,
        ),
    }
    directories = {"input": os.path.join(root, "input"), "output": os.path.join(root, "output")}
    for d in [names_and_paths["checkpoints"][0][0], *directories.values()]:
        os.makedirs(d, exist_ok=True)
    checkpoints = names_and_paths["checkpoints"][0][0]
    link = os.path.join(checkpoints, os.path.basename(MODEL))
    if not os.path.lexists(link):
        try:  # a diffusers folder linked into models/checkpoints, as users do
            os.symlink(os.path.abspath(MODEL), link, target_is_directory=True)
        except OSError:
            shutil.copytree(MODEL, link)
    for name in ("single.safetensors", "notes.txt"):
        open(os.path.join(checkpoints, name), "wb").close()

    def get_folder_paths(kind):
        return names_and_paths[kind][0][:]

    def recursive_search(directory):
        if not os.path.isdir(directory):
            return []
        result = []

        def handle(path):
            if not os.path.isdir(path):
                result.append(os.path.relpath(path, directory))
                return
            for sub in os.listdir(path):
                if sub != ".git":
                    handle(os.path.join(path, sub))

        handle(directory)
        return result

    def get_filename_list(kind):
        paths, exts = names_and_paths[kind]
        out = set()
        for base in paths:
            out.update(f for f in recursive_search(base) if os.path.splitext(f)[-1].lower() in exts)
        return sorted(out)

    def get_full_path(kind, filename):
        if kind not in names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for base in names_and_paths[kind][0]:
            full_path = os.path.join(base, filename)
            if os.path.isfile(full_path):
                return full_path
            elif os.path.islink(full_path):
                logging.warning(
                    "WARNING path {} exists but doesn't link anywhere, skipping.".format(full_path))
        return None

    def get_annotated_filepath(name, default_dir=None):
        for tag, kind in (("[output]", "output"), ("[input]", "input")):
            if name.endswith(tag):
                return os.path.join(directories[kind], name[: -len(tag) - 1])
        return os.path.join(default_dir or directories["input"], name)

    folder_paths.folder_names_and_paths = names_and_paths
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_annotated_filepath = get_annotated_filepath
    folder_paths.get_input_directory = lambda: directories["input"]
    folder_paths.get_output_directory = lambda: directories["output"]

    class Recorder(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                state["warnings"].append(record.getMessage())

    root_logger = logging.getLogger()
    for handler in [h for h in root_logger.handlers if getattr(h, "sdti_test", False)]:
        root_logger.removeHandler(handler)
    recorder = Recorder()
    recorder.sdti_test = True
    root_logger.addHandler(recorder)

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
        state["previews"].append((value, preview))
        if state["on_step"] is not None:
            state["on_step"](value)

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


class FakeImage:
    """What the pack makes of a preview when PIL is not installed here: PIL's frombytes
    as a record (ComfyUI always has PIL; this Python may not)."""

    def __init__(self, mode, size, data):
        assert mode == "RGB" and len(data) == size[0] * size[1] * 3, (mode, size, len(data))
        self.mode, self.size, self.data = mode, size, bytes(data)

    def tobytes(self):
        return self.data


class pil_modules:
    """PIL as this Python has it, or a stand-in for PIL.Image.frombytes (available=True);
    or none at all, an import that fails (available=False)."""

    def __init__(self, available=True):
        self.available = available
        self.saved = {}

    def __enter__(self):
        for name in ("PIL", "PIL.Image"):
            self.saved[name] = sys.modules.get(name)
        if not self.available:
            sys.modules["PIL"] = sys.modules["PIL.Image"] = None  # import fails
            return None
        try:
            from PIL import Image  # noqa: F401
            return "PIL"
        except ImportError:
            pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
            image.frombytes = FakeImage
            pil.Image = image
            sys.modules.update({"PIL": pil, "PIL.Image": image})
            return "stand-in"

    def __exit__(self, *_exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def check_previews(state, pack, name):
    """Item 5: the Train node sends previews to ComfyUI's progress display as it trains:
    before the first step, every preview_every steps and at the last, each as ComfyUI's
    samplers send theirs (latent_preview.py): ("JPEG", a PIL image, the size to show)."""
    node = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]
    lib = pack.nodes.library()
    with pil_modules() as kind:
        print(f"previews made with {kind}")
        del state["updates"][:], state["previews"][:]
        (_, path), ui = as_comfyui_merges(node().run(**train_args(
            checkpoint=name, token="previewed", steps=5, preview_every=2, learning_rate="0.1",
            preview_prompt="a photo of {} on a table")))
        assert "5 steps" in ui["text"][0] and os.path.exists(path), ui
        assert state["updates"] == [0, 1, 2, 3, 4, 5], state["updates"]
        sent = [(value, preview) for value, preview in state["previews"] if preview is not None]
        assert [value for value, _ in sent] == [0, 2, 4, 5], state["previews"]
        for _, (kind_, image, max_size) in sent:
            assert kind_ == "JPEG" and max_size == 512, (kind_, max_size)
            assert image.mode == "RGB" and tuple(image.size) == (64, 64), (image.mode, image.size)
        pictures = [image.tobytes() for _, (_, image, _) in sent]
        assert pictures[0] != pictures[-1], "the word's preview did not change as it trained"

        # The previews are the library's: its picture of the prompt with the word, the
        # node's seed (1), the library's default steps, at the run's resolution.
        params = sdti_lib_params(pack, name, token="previewed")
        alone = ctypes_trainer(pack, params)
        try:
            data, width, height = lib.preview_rgb(alone, "a photo of {} on a table", 1)
        finally:
            lib.trainer_free(alone)
        assert (width, height) == (64, 64)
        assert data == pictures[0], "the first preview is not the initial word's picture"

        # A preview that fails during the run stops the previews, not the run; the report
        # says so.
        calls = []
        real = lib.preview_rgb

        def flaky(*args):
            calls.append(args)
            if len(calls) == fail_at:
                raise pack.nodes.sdti_lib.SdtiError(18, "sdti_trainer_preview", "a test failure")
            return real(*args)

        lib.preview_rgb, fail_at = flaky, 2
        try:
            del state["previews"][:]
            (_, path), ui = as_comfyui_merges(node().run(**train_args(
                checkpoint=name, token="flaky", steps=5, preview_every=2)))
            assert "note: previews stopped at step 2: sdti_trainer_preview: a test failure\n" \
                in ui["text"][0], ui
            assert os.path.exists(path)
            assert [v for v, p in state["previews"] if p is not None] == [0], state["previews"]
            # The first one fails before training starts: raised, nothing trained.
            calls[:], fail_at = [], 1
            del state["updates"][:]
            message = expect(pack.nodes.sdti_lib.SdtiError, node().run, **train_args(
                checkpoint=name, token="flaky-first", steps=5, preview_every=2))
            assert "Train Embedding (sdti): preview: a test failure" in message, message
            assert state["updates"] == [], state["updates"]
        finally:
            del lib.preview_rgb

    # Without PIL no preview can be made: said in the log, and the run trains as without.
    with pil_modules(available=False):
        del state["updates"][:], state["previews"][:], state["warnings"][:]
        (_, path), _ = as_comfyui_merges(node().run(**train_args(
            checkpoint=name, token="no-pil", steps=3, preview_every=1)))
        assert os.path.exists(path) and state["updates"] == [1, 2, 3], state["updates"]
        assert all(p is None for _, p in state["previews"]), state["previews"]
        assert any("previews need PIL" in w for w in state["warnings"]), state["warnings"]


def sdti_lib_params(pack, name, token):
    """The Train node's params for the tiny model (as train_args gives them) as a C host
    fills them, to compare the node with the library alone."""
    import ctypes

    lib, sdti_lib = pack.nodes.library(), pack.nodes.sdti_lib
    params = sdti_lib.TrainerParams()
    lib.check(lib.trainer_params_init(ctypes.byref(params)), "sdti_trainer_params_init")
    keep = [os.fsencode(pack.nodes.resolve_file("checkpoints", name)), token.encode(), b"toy",
            b"cpu", b"0.1"]
    params.model_path, params.token, params.init_text, params.device, params.learning_rate = keep
    params.vectors, params.resolution, params.seed, params.max_steps = 2, 64, 1, 5
    return params, keep


def ctypes_trainer(pack, params_and_strings):
    import ctypes

    params, _keep = params_and_strings
    lib = pack.nodes.library()
    trainer = ctypes.c_void_p()
    lib.check(lib.trainer_new(ctypes.byref(params), ctypes.byref(trainer)), "sdti_trainer_new")
    return trainer


def comfy_pack(root, module, **kwargs):
    state = fake_comfyui(root, **kwargs)
    return state, load_pack(module)


def test_with_comfyui_stand_ins():
    root = os.path.join(OUT, "comfy")
    state, pack = comfy_pack(root, "sdti_pack_comfy")
    node = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]
    choices = node.INPUT_TYPES()["required"]["checkpoint"][0]
    # The tiny model is a diffusers folder (its single-file form needs a config: 32 wide):
    # ComfyUI does not list folders, the pack adds those holding model_index.json.
    name = os.path.basename(MODEL)
    assert name in choices and "single.safetensors" in choices, choices
    assert "notes.txt" not in choices, choices
    assert not [c for c in choices if c.startswith(name + os.sep)], choices  # its parts
    with open(pack.nodes.find_manifest(), encoding="utf-8") as f:
        check_classes_match_manifest(pack, json.load(f))  # with files in the lists
    checkpoints = os.path.join(root, "models", "checkpoints")
    embeddings = os.path.join(root, "models", "embeddings")
    assert pack.nodes.resolve_file("checkpoints", name) == os.path.join(checkpoints, name)
    expect(FileNotFoundError, pack.nodes.resolve_file, "checkpoints", os.path.join("..", "embeddings"))

    # Item 9: the pack looks for a diffusers folder before asking get_full_path, which
    # logs a warning for a linked folder (as the stand-in shows it would).
    del state["warnings"][:]
    (prompt, path), ui = as_comfyui_merges(node().run(**train_args(checkpoint=name, token="comfyword", steps=4)))
    assert not state["warnings"], state["warnings"]
    if os.path.islink(os.path.join(checkpoints, name)):
        sys.modules["folder_paths"].get_full_path("checkpoints", name)
        assert any("doesn't link anywhere" in w for w in state["warnings"]), state["warnings"]
    assert prompt == "embedding:comfyword"
    assert path == os.path.join(embeddings, "comfyword.safetensors"), path
    assert ui["text"] and "embedding:comfyword" in ui["text"][0], ui
    assert state["updates"] == [1, 2, 3, 4], state["updates"]
    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]
    assert "comfyword.safetensors" in inspect.INPUT_TYPES()["optional"]["embedding"][0]
    assert inspect().run(path=path)[2] == "embedding:comfyword"
    (pt,), _ = as_comfyui_merges(pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]().run(
        format="a1111-pt", precision="f32", name="", path=path))
    assert pt == os.path.join(embeddings, "comfyword-a1111-pt.pt"), pt
    check_previews(state, pack, name)

    # A file in the checkpoints folder that is not a model: the library's reason, naming it.
    message = expect(pack.nodes.sdti_lib.SdtiError, node().run,
                     **train_args(checkpoint="single.safetensors", token="single"))
    assert os.path.join(checkpoints, "single.safetensors") in message, message
    assert "not a readable safetensors file" in message, message

    # The model hint in ComfyUI's terms.
    if os.path.exists(SINGLE_FILE):
        shutil.copy(SINGLE_FILE, os.path.join(checkpoints, "tiny-single.safetensors"))
        message = expect(pack.nodes.sdti_lib.SdtiError, node().run,
                         **train_args(checkpoint="tiny-single.safetensors", token="single"))
        assert "model_index.json" in message and "model config" not in message, message

    # ComfyUI's interrupt: the progress hook raises InterruptProcessingException; the
    # pack stops training and raises it again, so that ComfyUI reports
    # execution_interrupted rather than an error.
    state, pack = comfy_pack(root, "sdti_pack_comfy2", interrupt_after=2)
    mm = sys.modules["comfy.model_management"]
    expect(mm.InterruptProcessingException, pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run,
           **train_args(checkpoint=name, token="stopped", steps=500))
    assert state["updates"] == [1, 2], state["updates"]
    assert not state["interrupt"], "the hook consumes the interrupt"
    assert not os.path.exists(os.path.join(embeddings, "stopped.safetensors"))

    # Without the server's hook the pack polls the flag itself, and still raises
    # InterruptProcessingException.
    state, pack = comfy_pack(root, "sdti_pack_comfy3", hook=False)
    mm = sys.modules["comfy.model_management"]
    state["interrupt"] = True
    expect(mm.InterruptProcessingException, pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run,
           **train_args(checkpoint=name, token="stopped", steps=500))
    assert not state["interrupt"]
    assert not os.path.exists(os.path.join(embeddings, "stopped.safetensors"))


def snapshot(root):
    """Every path under root with its bytes (links as their target), to show nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[p] = f.read()
            else:
                out[p] = "dir"
    return out


def test_names_stay_in_the_folder():
    """Item 1: a workflow's token or name cannot write outside models/embeddings."""
    root = os.path.join(OUT, "comfy-names")
    state, pack = comfy_pack(root, "sdti_pack_names")
    checkpoints = os.path.join(root, "models", "checkpoints")
    victim = os.path.join(checkpoints, "victim.safetensors")
    with open(victim, "wb") as f:
        f.write(b"a checkpoint the workflow must not replace")
    name = os.path.basename(MODEL)
    train = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]()
    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()
    (_, source), _ = as_comfyui_merges(train.run(**train_args(checkpoint=name, token="source")))
    before = snapshot(OUT)
    bad = [
        "../checkpoints/victim", "../../evil", os.path.join(OUT, "absolute-evil"),
        "sub/word", "sub\\word", "..", ".hidden", "CON", "nul", "com1", "two words",
        "tab\tword", "new\nline", "",
    ]
    for token in bad:
        for overwrite in (False, True):
            del state["updates"][:]
            message = expect(ValueError, train.run,
                             **train_args(checkpoint=name, token=token, overwrite=overwrite))
            assert message.startswith("Train Embedding (sdti): token: "), message
            assert not state["updates"], f"{token!r}: training started"
            message = expect(ValueError, convert.run, format="a1111-pt", precision="f32",
                             name=token, path=source, overwrite=overwrite) if token else None
            assert message is None or message.startswith("Convert Embedding (sdti): name: "), message
    assert snapshot(OUT) == before, "a refused name changed files"

    # Second line of defence: were the library to accept such a name, the pack still
    # refuses to write anywhere but the embeddings folder (after resolving links).
    lib = pack.nodes.library()
    lib.name_check = lambda _name: None
    try:
        for token in ("../checkpoints/victim", "../../evil", os.path.join(OUT, "absolute-evil")):
            message = expect(ValueError, train.run,
                             **train_args(checkpoint=name, token=token, overwrite=True))
            assert "not inside the embeddings folder" in message, message
            message = expect(ValueError, convert.run, format="safetensors", precision="f32",
                             name=token, path=source, overwrite=True)
            assert "not inside the embeddings folder" in message, message
    finally:
        del lib.name_check
    assert snapshot(OUT) == before, "a refused name changed files"
    # The library refuses such tokens by itself too (sdti_trainer_new).
    assert lib.name_check("../checkpoints/victim")


def test_overwrite():
    """Item 1/5: an existing destination of any kind is an error unless overwrite is on,
    found before training starts, and again by the library as it writes."""
    root = os.path.join(OUT, "comfy-overwrite")
    state, pack = comfy_pack(root, "sdti_pack_overwrite")
    embeddings = os.path.join(root, "models", "embeddings")
    os.makedirs(embeddings, exist_ok=True)
    name = os.path.basename(MODEL)
    train = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]()
    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()
    outside = os.path.join(OUT, "overwrite-outside.bin")
    with open(outside, "wb") as f:
        f.write(b"not the node's")

    def make(kind, path):
        if kind == "file":
            with open(path, "wb") as f:
                f.write(b"someone's embedding")
        elif kind == "folder":
            os.mkdir(path)
        elif kind == "dangling link":
            os.symlink(os.path.join(root, "nowhere"), path)
        elif kind == "looping link":
            os.symlink(os.path.basename(path), path)
        elif kind == "link outside":
            os.symlink(outside, path)

    (_, source), _ = as_comfyui_merges(train.run(**train_args(checkpoint=name, token="source")))
    kinds = ["file", "folder", "dangling link", "looping link", "link outside"]
    for i, kind in enumerate(kinds):
        token = f"taken{i}"
        path = os.path.join(embeddings, f"{token}.safetensors")
        make(kind, path)
        del state["updates"][:]
        message = expect(FileExistsError, train.run, **train_args(checkpoint=name, token=token))
        assert path in message and "'overwrite'" in message and "token" in message, message
        assert not state["updates"], f"{kind}: training started before the check"
        message = expect(FileExistsError, convert.run, format="safetensors", precision="f32",
                         name=token, path=source)
        assert path in message and "'overwrite'" in message and "name" in message, message
    assert open(outside, "rb").read() == b"not the node's"

    # On: replaced; a link is replaced by the file, its target left alone.
    for i, kind in enumerate(k for k in kinds if k != "folder"):
        token = f"replaced{i}"
        path = os.path.join(embeddings, f"{token}.safetensors")
        make(kind, path)
        (_, written), _ = as_comfyui_merges(train.run(**train_args(checkpoint=name, token=token, overwrite=True)))
        assert written == path and os.path.isfile(path) and not os.path.islink(path), kind
        assert pack.nodes.library().inspect(path)["name"] == token, kind
    assert open(outside, "rb").read() == b"not the node's"
    assert not os.path.exists(os.path.join(root, "nowhere"))

    # Something appears at the destination while training runs: the library's own check
    # (export without SDTI_WRITE_OVERWRITE) refuses, with the same message.
    late = os.path.join(embeddings, "late.safetensors")

    def appear(step):
        if step == 2 and not os.path.lexists(late):
            with open(late, "wb") as f:
                f.write(b"written meanwhile")

    state["on_step"] = appear
    del state["updates"][:]
    message = expect(FileExistsError, train.run, **train_args(checkpoint=name, token="late"))
    state["on_step"] = None
    assert late in message and "'overwrite'" in message, message
    assert state["updates"] == [1, 2, 3], state["updates"]
    assert open(late, "rb").read() == b"written meanwhile"

    # Convert: the same rule.
    (dst,), _ = as_comfyui_merges(convert.run(format="a1111-pt", precision="f32", name="conv",
                                              path=source))
    with open(dst, "rb") as f:
        before = f.read()
    message = expect(FileExistsError, convert.run, format="a1111-pt", precision="f16",
                     name="conv", path=source)
    assert dst in message and "name" in message, message
    with open(dst, "rb") as f:
        assert f.read() == before
    convert.run(format="a1111-pt", precision="f16", name="conv", path=source, overwrite=True)
    with open(dst, "rb") as f:
        assert f.read() != before, "overwrite on: the f16 file replaced the f32 one"


def test_path_inputs():
    """Item 1: Inspect's and Convert's path inputs read only files in the embeddings and
    input folders; anything else gets one message that tells nothing about the file."""
    root = os.path.join(OUT, "comfy-paths")
    state, pack = comfy_pack(root, "sdti_pack_paths")
    embeddings = os.path.join(root, "models", "embeddings")
    extra = os.path.join(root, "extra", "embeddings")
    inputs = os.path.join(root, "input")
    for d in (embeddings, extra):
        os.makedirs(d, exist_ok=True)
    name = os.path.basename(MODEL)
    (_, trained), _ = as_comfyui_merges(
        pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]().run(**train_args(checkpoint=name, token="pathword")))
    shutil.copy(trained, os.path.join(extra, "extra-word.safetensors"))
    shutil.copy(trained, os.path.join(inputs, "uploaded.safetensors"))
    inspect = pack.NODE_CLASS_MAPPINGS["SDTI_InspectEmbedding"]()
    convert = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]()

    # Accepted: in either embeddings folder or the input folder, absolute or relative.
    for value, stem in [
        (trained, "pathword"), ("pathword.safetensors", "pathword"),
        (os.path.join(extra, "extra-word.safetensors"), "extra-word"),
        ("extra-word.safetensors", "extra-word"),
        (os.path.join(inputs, "uploaded.safetensors"), "uploaded"),
        ("uploaded.safetensors", "uploaded"),
        (os.path.join(embeddings, "..", "embeddings", "pathword.safetensors"), "pathword"),
    ]:
        assert inspect.run(path=value)[2] == f"embedding:{stem}", value
    (dst,), _ = as_comfyui_merges(convert.run(format="a1111-pt", precision="f32", name="", path="uploaded.safetensors"))
    assert dst == os.path.join(embeddings, "uploaded-a1111-pt.pt"), dst

    # Refused, all with the same words: a secret outside, a missing file, a device, a
    # link in the folder that leads out, a relative climb, the server's working folder.
    secret = os.path.join(OUT, "secret.bin")
    with open(secret, "wb") as f:
        f.write(b"SECRET!!" + bytes(range(256)))
    os.symlink(secret, os.path.join(embeddings, "leak.safetensors"))
    os.symlink(os.path.dirname(secret), os.path.join(embeddings, "up"))
    fifo = os.path.join(embeddings, "pipe.pt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    refused = [
        secret, os.path.join(OUT, "missing.pt"), "/dev/zero", "leak.safetensors",
        os.path.join(embeddings, "leak.safetensors"), os.path.join("up", "secret.bin"),
        os.path.join("..", "..", "..", os.path.basename(OUT), "secret.bin"),
        os.path.join(embeddings, "..", "checkpoints", "single.safetensors"),
        "pipe.pt", embeddings, "no-such.pt",
    ]
    messages = set()
    for value in refused:
        for run in (lambda v: inspect.run(path=v),
                    lambda v: convert.run(format="safetensors", precision="f32", name="x", path=v)):
            message = expect(ValueError, run, value)
            assert "SECRET" not in message and "53 45" not in message, message
            messages.add(message.split(": ", 1)[1].replace(repr(value), "<path>"))
    assert len(messages) == 1, messages
    assert not os.path.exists(os.path.join(embeddings, "x.safetensors"))


def test_is_changed():
    """Item 9: after the output file is deleted, re-queuing runs the node again; while it
    is there, the same workflow stays cached."""
    root = os.path.join(OUT, "comfy-cache")
    state, pack = comfy_pack(root, "sdti_pack_cache")
    name = os.path.basename(MODEL)
    train_cls = pack.NODE_CLASS_MAPPINGS["SDTI_TrainEmbedding"]
    # What ComfyUI passes: the constant inputs, a linked one (images) as None.
    constants = dict(train_args(checkpoint=name, token="cached"), images=None, overwrite=False)
    v0 = train_cls.IS_CHANGED(**constants)
    (_, path), _ = as_comfyui_merges(train_cls().run(**train_args(checkpoint=name, token="cached")))
    v1 = train_cls.IS_CHANGED(**constants)
    assert v1 == v0, (v0, v1)  # the same workflow again: cached, no error on its own file
    os.remove(path)
    v2 = train_cls.IS_CHANGED(**constants)
    assert v2 != v1, v2  # deleted: runs again
    train_cls().run(**train_args(checkpoint=name, token="cached"))
    assert train_cls.IS_CHANGED(**constants) == v2

    convert_cls = pack.NODE_CLASS_MAPPINGS["SDTI_ConvertEmbedding"]
    source = os.path.join(root, "models", "embeddings", "cached.safetensors")
    for linked in (True, False):
        constants = dict(format="a1111-pt", precision="f32", name="" if linked else "conv",
                         embedding="", path=None if linked else source, overwrite=False)
        u0 = convert_cls.IS_CHANGED(**constants)
        (dst,), _ = as_comfyui_merges(convert_cls().run(
            format="a1111-pt", precision="f32", name=constants["name"], path=source))
        assert convert_cls.IS_CHANGED(**constants) == u0
        os.remove(dst)
        u2 = convert_cls.IS_CHANGED(**constants)
        assert u2 != u0, (linked, u2)

    # diffusers-sdxl writes two files: either one deleted runs it again.
    sdxl_word = os.path.join(root, "models", "embeddings", "xl.safetensors")
    shutil.copy(SDXL_WORD, sdxl_word)
    constants = dict(format="diffusers-sdxl", precision="f32", name="pair", embedding="",
                     path=sdxl_word, overwrite=False)
    u0 = convert_cls.IS_CHANGED(**constants)
    (first,), _ = as_comfyui_merges(convert_cls().run(**constants))
    assert convert_cls.IS_CHANGED(**constants) == u0
    os.remove(first[: -len(".safetensors")] + "_2.safetensors")
    assert convert_cls.IS_CHANGED(**constants) != u0

    constants = dict(train_args(checkpoint=name, token="cached"), images=None, overwrite=False)
    with open(path, "ab") as f:  # changed by someone else: run again
        f.write(b"\0")
    assert train_cls.IS_CHANGED(**constants) != v2


def test_web_extension():
    """Train shows its report on the node: ComfyUI serves WEB_DIRECTORY's .js files."""
    for mod in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management"):
        sys.modules.pop(mod, None)
    pack = load_pack("sdti_pack_web")
    web = os.path.normpath(os.path.join(PACK, pack.WEB_DIRECTORY))
    script = os.path.join(web, "sdti.js")
    with open(script, encoding="utf-8") as f:
        text = f.read()
    for needle in ("SDTI_TrainEmbedding", "onExecuted", "message?.text", "registerExtension"):
        assert needle in text, needle
    node = shutil.which("node")
    if node:
        check = os.path.join(tempfile.mkdtemp(prefix="sdti-js-"), "sdti.mjs")
        shutil.copy(script, check)
        subprocess.run([node, "--check", check], check=True)
    else:
        print("SKIPPED: node not found; web/sdti.js was not syntax-checked")


def test_layer_and_library_sources():
    """Where the pack's ctypes layer and library come from (sdti_lib.py says the order),
    with the pack loaded as ComfyUI loads a folder named sdti: registered as the module
    'sdti', which hides an installed sdti package from import."""
    for mod in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management"):
        sys.modules.pop(mod, None)
    saved = sys.modules.get("sdti")
    try:
        pack = load_pack("sdti")
        sdti_lib = pack.nodes.sdti_lib
        library = pack.nodes.library().path
        print(f"ctypes layer: {sdti_lib.CAPI_PATH}; library: {library}")
        package = os.environ.get("SDTI_TEST_EXPECT_PACKAGE")
        if package:  # run with the wheel installed (python/tests/test_comfyui_pack.py)
            assert "SDTI_LIBRARY" not in os.environ
            assert os.path.samefile(os.path.dirname(sdti_lib.CAPI_PATH), package), sdti_lib.CAPI_PATH
            assert os.path.samefile(os.path.dirname(library), package), library
        # A library next to the pack comes before the package's and the repository's.
        other = tempfile.mkdtemp(prefix="sdti-pack-")
        beside = os.path.join(other, sdti_lib._library_name())
        open(beside, "wb").close()
        saved_env = os.environ.pop("SDTI_LIBRARY", None)
        try:
            assert sdti_lib.find_library(other) == beside
            os.remove(beside)
            candidates = sdti_lib.library_candidates(other)
            assert candidates[0] == beside, candidates
            if package:
                assert sdti_lib.find_library(other) == os.path.join(package, sdti_lib._library_name())
            # SDTI_LIBRARY comes first, taken as given.
            os.environ["SDTI_LIBRARY"] = beside
            assert sdti_lib.find_library(other) == beside
        finally:
            os.environ.pop("SDTI_LIBRARY", None)
            if saved_env is not None:
                os.environ["SDTI_LIBRARY"] = saved_env
    finally:
        sys.modules.pop("sdti", None)
        if saved is not None:
            sys.modules["sdti"] = saved


if __name__ == "__main__":
    test_layer_and_library_sources()
    test_without_comfyui()
    test_families()
    test_with_comfyui_stand_ins()
    test_names_stay_in_the_folder()
    test_path_inputs()
    test_overwrite()
    test_is_changed()
    test_web_extension()
    print("comfyui pack: ok")
