"""ComfyUI nodes built from sdti.plugin.json at import time.

The manifest says what each node takes and returns (types, defaults, ranges) and which
C functions run it; this module turns each entry into a ComfyUI node class and supplies
only the behaviour (RUNNERS). ComfyUI's modules are optional: without them the nodes
take plain paths and run the same code (that is how tests/test_nodes.py runs them).
"""

import ctypes
import json
import os

from . import sdti_lib

try:  # ComfyUI
    import folder_paths
except ImportError:
    folder_paths = None
try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
except ImportError:
    model_management = None
    comfy_utils = None

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def find_manifest():
    """sdti.plugin.json next to the pack (installed), else in plugin-manifests/ (repo)."""
    for path in (
        os.path.join(PACK_DIR, "sdti.plugin.json"),
        os.path.join(PACK_DIR, "..", "sdti.plugin.json"),
    ):
        if os.path.exists(path):
            return os.path.normpath(path)
    raise FileNotFoundError(f"sdti.plugin.json not found next to {PACK_DIR} or above it")


with open(find_manifest(), encoding="utf-8") as f:
    MANIFEST = json.load(f)

_library = None


def library():
    """The sdti library, loaded on first use (so that importing never fails on it)."""
    global _library
    if _library is None:
        _library = sdti_lib.Library(sdti_lib.find_library(PACK_DIR))
        for feature in MANIFEST["abi"]["required_features"]:
            if not _library.has_feature(feature):
                raise ImportError(f"{_library.path} lacks {feature}")
    return _library


# ---------------------------------------------------------------- folders

def _diffusers_folders(folder):
    """Diffusers model folders (those holding model_index.json) under ComfyUI's folders of
    that kind, as names relative to them; ComfyUI itself lists only files."""
    names = []
    for base in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            if "model_index.json" in filenames and dirpath != base:
                names.append(os.path.relpath(dirpath, base))
                dirnames[:] = []  # its parts are not models of their own
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return names


def _folder_files(folder):
    if folder_paths is None:
        return []
    names = list(folder_paths.get_filename_list(folder))
    if folder == "checkpoints":
        # A diffusers folder is one choice; the files in it are its parts, not models.
        folders = _diffusers_folders(folder)
        inside = tuple(f + os.sep for f in folders)
        names = [n for n in names if not n.startswith(inside)]
        names += [f for f in folders if f not in names]
    return sorted(names)


def resolve_file(folder, name):
    """A name from a ComfyUI model folder (a file, or a diffusers folder among the
    checkpoints) or, without ComfyUI, a path, to a path."""
    if folder_paths is not None:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
        for base in folder_paths.get_folder_paths(folder):
            base = os.path.abspath(base)
            path = os.path.normpath(os.path.join(base, name))
            try:
                inside = os.path.commonpath([base, path]) == base
            except ValueError:  # another drive (Windows)
                inside = False
            if inside and os.path.isfile(os.path.join(path, "model_index.json")):
                return path
    if os.path.exists(name):
        return os.path.abspath(name)
    raise FileNotFoundError(f"{name}: not in the '{folder}' folder")


def output_folder(folder):
    """Where a node writes: ComfyUI's first folder of that kind, else SDTI_<FOLDER>_DIR or
    ./<folder>."""
    if folder_paths is not None:
        dirs = folder_paths.get_folder_paths(folder)
        if dirs:
            return dirs[0]
    return os.environ.get(f"SDTI_{folder.upper()}_DIR", os.path.abspath(folder))


# ---------------------------------------------------------------- images

def image_batch_to_rgb8(images):
    """IMAGE ([B, H, W, 3] floats in 0..1: a torch tensor, numpy array or nested lists)
    to a list of (bytes, width, height)."""
    if hasattr(images, "cpu"):  # torch
        images = images.cpu().numpy()
    try:
        import numpy as np
    except ImportError:
        np = None
    out = []
    if np is not None and not isinstance(images, list):
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"IMAGE must be [batch, height, width, 3], got {list(arr.shape)}")
        arr = (np.clip(arr[..., :3], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        for img in arr:
            out.append((np.ascontiguousarray(img).tobytes(), img.shape[1], img.shape[0]))
        return out
    for img in images:  # nested lists
        height, width = len(img), len(img[0])
        data = bytearray()
        for row in img:
            for px in row:
                data.extend(int(min(max(v, 0.0), 1.0) * 255.0 + 0.5) for v in px[:3])
        out.append((bytes(data), width, height))
    return out


# ---------------------------------------------------------------- runners

def _constant(table, name):
    return MANIFEST["constants"][table][name]


def run_train(checkpoint, images, token, init_text, vectors, steps, learning_rate,
              batch_size, seed, template, resolution, device="auto", precision="auto"):
    lib = library()
    model_path = resolve_file("checkpoints", checkpoint)
    if device == "auto":
        device = "cuda" if lib.has_feature("sdti.cuda/1") else "cpu"
    params = sdti_lib.TrainerParams()
    lib.check(lib.trainer_params_init(ctypes.byref(params)), "sdti_trainer_params_init")
    keep = []  # the bytes the params point to, alive until sdti_trainer_new returns

    def text(value):
        b = str(value).encode("utf-8")
        keep.append(b)
        return b

    params.model_path = text(model_path)
    params.device = text(device)
    params.precision = _constant("precision", precision)
    params.token = text(token)
    params.init_text = text(init_text)
    params.vectors = int(vectors)
    params.resolution = int(resolution)
    params.learning_rate = text(learning_rate)
    params.batch_size = int(batch_size)
    params.seed = int(seed)
    params.templates = text(template)
    params.max_steps = int(steps)

    bar = comfy_utils.ProgressBar(int(steps)) if comfy_utils is not None else None

    raised = []  # an exception from the callback, raised again once the step returns

    def on_progress(_user_data, progress):
        try:
            # With ComfyUI's server, the bar's hook raises InterruptProcessingException
            # (and clears the interrupt flag) when the user interrupts.
            if bar is not None:
                bar.update_absolute(progress.contents.step, progress.contents.total_steps)
            if model_management is not None and model_management.processing_interrupted():
                return 1  # ComfyUI's interrupt cancels the run
            return 0
        except Exception as e:  # an exception must not unwind through ctypes: keep it
            raised.append(e)
            return 1

    callback = sdti_lib.PROGRESS_FN(on_progress)
    params.progress = callback
    trainer = ctypes.c_void_p()
    lib.check(lib.trainer_new(ctypes.byref(params), ctypes.byref(trainer)), "sdti_trainer_new")
    try:
        for data, width, height in image_batch_to_rgb8(images):
            lib.check(
                lib.trainer_add_image(trainer, data, width, height, 0, 0, None),
                "sdti_trainer_add_image",
            )
        stats = sdti_lib.StepStats()
        stats.struct_size = ctypes.sizeof(stats)
        status = lib.trainer_step(trainer, int(steps), ctypes.byref(stats))
        if raised:
            raise raised[0]
        if status == sdti_lib.SDTI_CANCELLED and model_management is not None:
            # Cancelled by ComfyUI's interrupt: report it as one (execution_interrupted),
            # not as an error.
            model_management.throw_exception_if_processing_interrupted()
            raise model_management.InterruptProcessingException()
        lib.check(status, "sdti_trainer_step")
        folder = output_folder("embeddings")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{token}.safetensors")
        lib.check(
            lib.trainer_export(trainer, path.encode("utf-8"), _constant("format", "safetensors")),
            "sdti_trainer_export",
        )
    finally:
        lib.trainer_free(trainer)
    return (f"embedding:{token}", path)


def _embedding_path(embedding, path):
    """The optional path input (e.g. Train's path output), else the dropdown's file."""
    if path and str(path).strip():
        path = str(path).strip()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such embedding file")
        return os.path.abspath(path)
    if not embedding:
        raise ValueError("choose an embedding file or connect a path")
    return resolve_file("embeddings", embedding)


def run_convert(format, precision, name="", embedding="", path=""):
    lib = library()
    src = _embedding_path(embedding, path)
    stem = name or f"{os.path.splitext(os.path.basename(src))[0]}-{format}"
    ext = MANIFEST["constants"]["format_extension"][format]
    folder = output_folder("embeddings")
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, f"{stem}.{ext}")
    lib.check(
        lib.embedding_convert(
            src.encode("utf-8"),
            dst.encode("utf-8"),
            _constant("format", format),
            _constant("precision", precision),
        ),
        "sdti_embedding_convert",
    )
    return (dst,)


def run_inspect(embedding="", path=""):
    path = _embedding_path(embedding, path)
    info = library().inspect(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return (json.dumps(info, indent=1), int(info.get("vectors") or 0), f"embedding:{stem}")


RUNNERS = {
    "SDTI_TrainEmbedding": run_train,
    "SDTI_ConvertEmbedding": run_convert,
    "SDTI_InspectEmbedding": run_inspect,
}


# ---------------------------------------------------------------- classes from the manifest

def comfy_input(spec):
    """One manifest input as ComfyUI's INPUT_TYPES entry."""
    kind = spec["type"]
    options = {k: spec[k] for k in ("default", "min", "max", "step", "tooltip") if k in spec}
    if kind in ("MODEL_FILE", "EMBEDDING_FILE"):
        extra = {"tooltip": spec["tooltip"]} if "tooltip" in spec else {}
        return (_folder_files(spec["folder"]),) + ((extra,) if extra else ())
    if kind == "CHOICE":
        return (list(spec["options"]), options)
    if kind == "STRING":
        return ("STRING", dict(options, multiline=False))
    if kind in ("INT", "FLOAT", "IMAGE"):
        return (kind, options) if options else (kind,)
    raise ValueError(f"manifest input type {kind} has no ComfyUI mapping")


def make_node(node):
    runner = RUNNERS[node["id"]]

    def input_types(cls):
        # Evaluated on every call: ComfyUI asks again when its model folders change.
        types = {"required": {
            spec["name"]: comfy_input(spec) for spec in node["inputs"] if not spec.get("optional")
        }}
        optional = {spec["name"]: comfy_input(spec) for spec in node["inputs"] if spec.get("optional")}
        if optional:
            types["optional"] = optional
        return types

    def run(self, **kwargs):
        return runner(**kwargs)

    return type(
        node["id"],
        (),
        {
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(o["type"] for o in node["outputs"]),
            "RETURN_NAMES": tuple(o["name"] for o in node["outputs"]),
            "FUNCTION": "run",
            "CATEGORY": node["category"],
            "DESCRIPTION": node["description"],
            "OUTPUT_NODE": bool(node.get("output_node")),
            "C_FUNCTIONS": tuple(node["c_functions"]),
            "run": run,
        },
    )


NODE_CLASS_MAPPINGS = {node["id"]: make_node(node) for node in MANIFEST["nodes"]}
NODE_DISPLAY_NAME_MAPPINGS = {node["id"]: node["display_name"] for node in MANIFEST["nodes"]}
