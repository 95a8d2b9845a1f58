"""The sdti nodes for ComfyUI: Train, Convert and Inspect Embedding.

Each node is an ordinary ComfyUI node class (at the end of this file). The host-neutral
manifest, sdti.plugin.json, describes the same nodes (types, defaults, ranges, the C
functions behind them) and stays the source of truth: tests/test_nodes.py checks every
class against it. At run time the pack reads from the manifest only the ABI it needs and
the library's constants (format and precision codes, write flags, file extensions).
ComfyUI's modules are optional: without them the nodes take plain paths and run the same
code (that is how tests/test_nodes.py runs them).
"""

import ctypes
import json
import logging
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
log = logging.getLogger("sdti")


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
        lib = sdti_lib.Library(sdti_lib.find_library(PACK_DIR))
        minor = lib.abi_version() & 0xFFFF
        if minor < max(MANIFEST["abi"]["minor"], sdti_lib.ABI_MINOR_NEEDED):
            raise ImportError(
                f"{lib.path} has C ABI 1.{minor}; this pack needs "
                f"1.{max(MANIFEST['abi']['minor'], sdti_lib.ABI_MINOR_NEEDED)} or newer "
                "(install a newer sdti library)"
            )
        for feature in MANIFEST["abi"]["required_features"]:
            if not lib.has_feature(feature):
                raise ImportError(f"{lib.path} lacks {feature}")
        _library = lib  # only a library that passed the checks is kept
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


def _inside(path, folder):
    """Whether `path` is `folder` or below it (both absolute, compared as given)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive (Windows)
        return False


def resolve_file(folder, name):
    """A name from a ComfyUI model folder (a file, or a diffusers folder among the
    checkpoints) or, without ComfyUI, a path, to a path."""
    if folder_paths is None:
        if os.path.exists(name):
            return os.path.abspath(name)
        raise FileNotFoundError(f"{name}: no such file or folder")
    # The name as get_full_path reads it: relative, never above the folder.
    try:
        rel = os.path.relpath(os.path.join("/", name), "/")
    except ValueError:
        rel = ""
    # A diffusers folder first: get_full_path finds only files, and for a folder linked
    # into models/checkpoints it logs "exists but doesn't link anywhere" on every run.
    if rel not in ("", os.curdir):
        for base in folder_paths.get_folder_paths(folder):
            path = os.path.join(base, rel)
            if os.path.isfile(os.path.join(path, "model_index.json")):
                return path
    path = folder_paths.get_full_path(folder, name)
    if path:
        return path
    raise FileNotFoundError(f"{name}: not in ComfyUI's '{folder}' folder")


def output_folder(folder):
    """Where a node writes: ComfyUI's first folder of that kind, else SDTI_<FOLDER>_DIR or
    ./<folder>."""
    if folder_paths is not None:
        dirs = folder_paths.get_folder_paths(folder)
        if dirs:
            return dirs[0]
    return os.environ.get(f"SDTI_{folder.upper()}_DIR", os.path.abspath(folder))


def _host_folders(kinds):
    """ComfyUI's folders for the manifest's 'within' names: 'input' and 'output' are its
    input and output directories, anything else a model folder kind (all its paths)."""
    folders = []
    for kind in kinds:
        if kind == "input":
            folders.append(folder_paths.get_input_directory())
        elif kind == "output":
            folders.append(folder_paths.get_output_directory())
        else:
            folders.extend(folder_paths.get_folder_paths(kind))
    return [os.path.abspath(f) for f in folders]


def path_input(label, value, within):
    """A path input's file. With ComfyUI only files that lie, after resolving links, in
    the folders named by `within` are read; any other value gets one message that says
    nothing about the file (a shared workflow must not probe the server's disk).
    Without ComfyUI it is a plain path."""
    value = str(value).strip()
    if folder_paths is None:
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{value}: no such embedding file")
        return os.path.abspath(value)
    folders = _host_folders(within)
    real_folders = [os.path.realpath(f) for f in folders]
    # A relative value is a name inside one of the folders, never relative to the
    # server's working directory.
    candidates = [value] if os.path.isabs(value) else [os.path.join(f, value) for f in folders]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if any(_inside(real, f) for f in real_folders) and os.path.isfile(real):
            return os.path.abspath(candidate)
    raise ValueError(
        f"{label}: path {value!r} is not a file in ComfyUI's {' or '.join(within)} "
        "folder; only files there are read"
    )


def check_name(label, input_name, value):
    """sdti_name_check on a token or file stem, before anything runs."""
    reason = library().name_check(value)
    if reason:
        raise ValueError(f"{label}: {input_name}: {reason}")  # the reason quotes the value


def _kind(path):
    if os.path.islink(path):
        return "a link" if os.path.exists(path) else "a link to nothing"
    return "a folder" if os.path.isdir(path) else "a file"


def destination(label, stem, ext, overwrite, input_name, check_existing=True):
    """The embeddings folder's <stem>.<ext>, checked to stay in that folder after
    resolving links and, unless overwrite is on (or check_existing is off, when the
    library's write checks it), not to exist as anything (a file, a folder, a link, a
    dangling one included)."""
    folder = os.path.abspath(output_folder("embeddings"))
    path = os.path.join(folder, f"{stem}.{ext}")
    if not _inside(os.path.realpath(os.path.dirname(path)), os.path.realpath(folder)):
        raise ValueError(
            f"{label}: {path} is not inside the embeddings folder {folder} "
            f"(after resolving links); choose another {input_name}"
        )
    if check_existing and not overwrite and os.path.lexists(path):
        raise FileExistsError(_exists_message(label, path, input_name))
    return path


def _exists_message(label, path, input_name):
    return (
        f"{label}: {path} already exists ({_kind(path)}); turn on 'overwrite' to replace "
        f"it, or choose another {input_name}"
    )


def _check_write(lib, status, label, path, input_name, what, others=()):
    """A write's status: SDTI_ERR_EXISTS (something appeared at the path, or at one of
    the other files the write makes, after the early check) as the same message as that
    check's, naming the one that is there."""
    if status == sdti_lib.SDTI_ERR_EXISTS:
        there = next((p for p in (path, *others) if os.path.lexists(p)), path)
        raise FileExistsError(_exists_message(label, there, input_name))
    lib.check(status, what)


def _write_flags(overwrite):
    return MANIFEST["constants"]["write_flags"]["overwrite"] if overwrite else 0


# ---------------------------------------------------------------- re-running after a file goes

# ComfyUI keeps a node's outputs while its inputs and IS_CHANGED value stay the same, so a
# node whose file was deleted would not run again. IS_CHANGED cannot be the file's stat
# itself: it is computed before the run (no file yet), and the next queue would then always
# differ and run again, to fail on the file it wrote. So it is a generation per output,
# bumped when the file is no longer the one this process wrote (gone, replaced, changed).
_written = {}  # key -> [path, the state this process left there, generation]


def _file_state(paths):
    """The state of the files an output wrote (diffusers-sdxl writes two)."""
    states = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            states.append(None)
            continue
        states.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(states)


def _remember_written(keys, *paths):
    for key in keys:
        generation = _written[key][2] if key in _written else 0
        _written[key] = [paths, _file_state(paths), generation]


def _output_fingerprint(key):
    entry = _written.get(key)
    if entry is not None:
        state = _file_state(entry[0])
        if state != entry[1]:
            entry[1] = state
            entry[2] += 1
    return f"{key}#{entry[2] if entry else 0}"


def _train_output_keys(token):
    folder = os.path.abspath(output_folder("embeddings"))
    return [("SDTI_TrainEmbedding", os.path.join(folder, f"{token}.safetensors"))]


def is_changed_train(token=None, **_inputs):
    # A linked token (None here) has no path yet: the upstream node's own key decides.
    return _output_fingerprint(_train_output_keys(token)[0] if token else ("SDTI_TrainEmbedding",))


def _convert_output_keys(format, name, embedding, path):
    """The keys a convert's output is remembered under: its path when IS_CHANGED can know
    it from constant inputs, and (format, name, embedding) for a linked path input."""
    keys = [("SDTI_ConvertEmbedding", format, name, embedding)]
    ext = MANIFEST["constants"]["format_extension"].get(format)
    stem = None
    if name and str(name).strip():
        stem = str(name)
    elif path is not None and str(path).strip():
        stem = f"{os.path.splitext(os.path.basename(str(path).strip()))[0]}-{format}"
    elif path is not None and embedding:
        stem = f"{os.path.splitext(os.path.basename(str(embedding)))[0]}-{format}"
    if stem and ext:
        folder = os.path.abspath(output_folder("embeddings"))
        keys.insert(0, ("SDTI_ConvertEmbedding", os.path.join(folder, f"{stem}.{ext}")))
    return keys


def is_changed_convert(format=None, name="", embedding="", path="", **_inputs):
    # path is None when it is linked (ComfyUI passes only constants to IS_CHANGED).
    return _output_fingerprint(_convert_output_keys(format, name, embedding, path)[0])


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


# ---------------------------------------------------------------- shared by the nodes

def _constant(table, name):
    return MANIFEST["constants"][table][name]


def _model_hint(error):
    """The library's message about a model, with where ComfyUI wants the fix."""
    if folder_paths is not None and "diffusers folder" in error.message:
        return sdti_lib.SdtiError(
            error.status,
            error.what,
            f"{error.message} (in ComfyUI: put that folder, holding model_index.json, "
            "into models/checkpoints and choose it as the checkpoint)",
        )
    return error


def _embedding_source(label, embedding, path):
    """The optional path input (e.g. Train's path output), else the dropdown's file."""
    if path and str(path).strip():
        return path_input(label, path, PATH_WITHIN)
    if not embedding:
        raise ValueError(f"{label}: choose an embedding file or connect a path")
    return resolve_file("embeddings", embedding)


def _is_changed(fingerprint, kwargs):
    # ComfyUI calls IS_CHANGED with the constant inputs (linked ones are None); an
    # exception would make it run the node on every queue, so none escapes.
    try:
        return fingerprint(**kwargs)
    except Exception as e:  # noqa: BLE001
        return f"unknown: {e}"


# The folders whose files the path inputs of Convert and Inspect may read (the
# manifest's "within"; see path_input).
PATH_WITHIN = ("embeddings", "input")

# Inputs that Convert and Inspect share, word for word (as the manifest has them).
_EMBEDDING_TOOLTIP = "A file from the embeddings folder (unused when path is given)."
_PATH_TOOLTIP = (
    "A file in the embeddings or input folder (such as Train Embedding's path output); "
    "when not empty it is {verb} instead of 'embedding'."
)


def _embedding_input():
    return (_folder_files("embeddings"), {"tooltip": _EMBEDDING_TOOLTIP})


def _path_input(verb):
    return ("STRING", {"default": "", "tooltip": _PATH_TOOLTIP.format(verb=verb), "multiline": False})


# The formats that hold an SDXL word (a clip_l and a clip_g part), and those that hold
# only SDXL words; the library refuses the others (checked in tests/test_nodes.py).
SDXL_FORMATS = ("sdxl", "kohya-pt", "onetrainer", "diffusers-sdxl")
SDXL_ONLY_FORMATS = ("sdxl", "diffusers-sdxl")
# diffusers' SDXL pair: NAME.safetensors (clip_l) and NAME_2.safetensors (clip_g).
_SECOND_FILES = {"diffusers-sdxl": ("_2",)}
_FORMAT_TOOLTIP = (
    "SD 1.x and SD 2.x words: any but sdxl and diffusers-sdxl. SDXL words (clip_l + "
    "clip_g): sdxl (what ComfyUI and A1111 load), kohya-pt, onetrainer or diffusers-sdxl "
    "(two files for diffusers: NAME.safetensors and NAME_2.safetensors)."
)


def _is_sdxl_word(info):
    return [p.get("encoder") for p in info.get("parts", [])] == ["clip_l", "clip_g"]


def _check_format_fits(label, lib, src, format):
    """An SDXL word goes only into a format that holds both its parts, and only an SDXL
    word into sdxl or diffusers-sdxl: said before anything is written, with the formats
    that fit."""
    sdxl = _is_sdxl_word(lib.inspect(src))
    if sdxl and format not in SDXL_FORMATS:
        raise ValueError(
            f"{label}: format: {os.path.basename(src)} is an SDXL word (clip_l + clip_g), "
            f"which {format} cannot hold; choose {', '.join(SDXL_FORMATS)}"
        )
    if not sdxl and format in SDXL_ONLY_FORMATS:
        raise ValueError(
            f"{label}: format: {format} holds SDXL words (clip_l + clip_g); "
            f"{os.path.basename(src)} has one part (an SD 1.x or SD 2.x word): choose "
            "another format"
        )


# sdti_trainer_family's answers: the name shown and the format a trained word is written
# in (an SDXL word has two tables, clip_l and clip_g, which ComfyUI's and A1111's loaders
# read from one safetensors file; SD 1.x and 2.x words are one table, emb_params).
_FAMILIES = {
    sdti_lib.SDTI_FAMILY_SD1: ("SD 1.x", "safetensors"),
    sdti_lib.SDTI_FAMILY_SD2: ("SD 2.x", "safetensors"),
    sdti_lib.SDTI_FAMILY_SDXL: ("SDXL", "sdxl"),
}
# The prediction_type and zero_terminal_snr choices and their codes in the C params
# (ABI 1.5); the choices are the manifest's options.
_PREDICTION_TYPES = {
    "model": sdti_lib.SDTI_PREDICTION_MODEL,
    "epsilon": sdti_lib.SDTI_PREDICTION_EPSILON,
    "v_prediction": sdti_lib.SDTI_PREDICTION_V,
}
_ZERO_SNR = {
    "model": sdti_lib.SDTI_ZERO_SNR_MODEL,
    "off": sdti_lib.SDTI_ZERO_SNR_OFF,
    "on": sdti_lib.SDTI_ZERO_SNR_ON,
}


def _run_line(lib, trainer, prediction_type, zero_terminal_snr, random_crop):
    """What the run uses, for the report: its prediction type and noise schedule
    (sdti_trainer_prediction), each said to be the input's or the model's, and its crops."""
    prediction, zero_snr = ctypes.c_uint32(), ctypes.c_uint32()
    lib.check(
        lib.trainer_prediction(trainer, ctypes.byref(prediction), ctypes.byref(zero_snr)),
        "sdti_trainer_prediction",
    )
    names = {code: name for name, code in _PREDICTION_TYPES.items() if name != "model"}
    predicts = names.get(prediction.value, f"prediction type {prediction.value}")
    zsnr = "on" if zero_snr.value == sdti_lib.SDTI_ZERO_SNR_ON else "off"

    def source(choice):
        return "the model's" if choice == "model" else "as set"

    return (
        f"predicts {predicts} ({source(prediction_type)}), zero terminal SNR {zsnr} "
        f"({source(zero_terminal_snr)}), {'random' if random_crop else 'center'} crops"
    )


def _preview_max_size():
    """The size ComfyUI shows previews at (--preview-size, 512 unless set), as its
    samplers' previews (latent_preview.py) are sent."""
    try:
        from comfy.cli_args import args

        return int(args.preview_size)
    except Exception:  # noqa: BLE001 - not ComfyUI, or an older one: its default
        return 512


class _Previews:
    """The Train node's previews: the word as learned so far, drawn by the library
    (sdti_trainer_preview) before the first step and every `every` steps, as a progress
    bar's preview: ("JPEG", a PIL image, the largest side to show), what ComfyUI's
    samplers send (latent_preview.py) and its server resizes, encodes and shows on the
    node. Without ComfyUI's progress bar nothing would show them, and without PIL none can
    be made: then none are drawn (said in the log) and the run trains as without. A preview
    that fails during the run stops the previews, not the run (said in the report)."""

    def __init__(self, lib, trainer, label, prompt, seed, every, bar):
        self.lib, self.trainer, self.label = lib, trainer, label
        self.prompt, self.seed, self.every = str(prompt), int(seed), int(every)
        self.stopped = None
        self.pil = None
        if self.every <= 0:
            return
        if bar is None:
            log.info("%s: previews go to ComfyUI's progress display; none are drawn without it", label)
            self.every = 0
            return
        try:
            from PIL import Image
        except ImportError:
            log.warning("%s: previews need PIL (pip install pillow); training without them", label)
            self.every = 0
            return
        self.pil = Image

    def first(self):
        """The initial word, before the first step; a failure is raised (nothing is lost)."""
        if self.every <= 0:
            return None
        try:
            return self._draw()
        except sdti_lib.SdtiError as e:
            raise sdti_lib.SdtiError(e.status, f"{self.label}: preview", e.message) from None

    def after(self, step, total):
        """The preview after `step`, when one is due (every `every` steps and the last)."""
        if self.every <= 0 or self.stopped or (step % self.every and step != total):
            return None
        try:
            return self._draw()
        except sdti_lib.SdtiError as e:
            self.stopped = f"previews stopped at step {step}: {e}"
            log.warning("%s: %s", self.label, self.stopped)
            return None

    def _draw(self):
        data, width, height = self.lib.preview_rgb(self.trainer, self.prompt, self.seed)
        image = self.pil.frombytes("RGB", (width, height), data)
        return ("JPEG", image, _preview_max_size())


_CHECKPOINT_TOOLTIP = (
    "The checkpoint to train on: SD 1.x, SD 2.x (512 or 768-v) or SDXL (base 1.0 and its "
    "fine-tunes such as Pony or Illustrious), a .safetensors file or a diffusers folder. "
    "Refiners, inpainting and other variants are refused, saying what was found."
)


# ---------------------------------------------------------------- the nodes
#
# Written out as ComfyUI node classes; plugin-manifests/sdti.plugin.json describes the same
# nodes for any host, and tests/test_nodes.py checks every class against it (inputs, their
# order, types, defaults, ranges, options and tooltips; outputs; names; C functions).
# Change both together. INPUT_TYPES is evaluated on every call: ComfyUI asks again when
# its model folders change.


class SDTI_TrainEmbedding:
    DISPLAY_NAME = "Train Embedding (sdti)"
    CATEGORY = "sdti"
    DESCRIPTION = (
        "Learns a new word (Textual Inversion) from a batch of pictures on an SD 1.x, "
        "SD 2.x or SDXL checkpoint and writes it to the embeddings folder (SDXL words as "
        "clip_l + clip_g, the layout ComfyUI and A1111 load; an existing file is replaced "
        "only when overwrite is on). Use the returned text in a prompt. With preview_every "
        "set, ComfyUI's progress display shows what the word draws as it trains."
    )
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "path")
    OUTPUT_TOOLTIPS = (
        "embedding:<token>, to put into a prompt",
        "the written .safetensors file (an SDXL word's holds clip_l and clip_g)",
    )
    FUNCTION = "run"
    OUTPUT_NODE = True
    # The C functions behind the node (the manifest's c_functions).
    C_FUNCTIONS = (
        "sdti_trainer_params_init",
        "sdti_trainer_new",
        "sdti_trainer_recompute",
        "sdti_trainer_family",
        "sdti_trainer_resolution",
        "sdti_trainer_prediction",
        "sdti_trainer_notes",
        "sdti_encoder_new_from_trainer",
        "sdti_encoder_clip_skip",
        "sdti_encoder_free",
        "sdti_trainer_add_image",
        "sdti_trainer_step",
        "sdti_trainer_preview",
        "sdti_trainer_cancel",
        "sdti_name_check",
        "sdti_trainer_export_ex",
        "sdti_trainer_free",
        "sdti_last_error",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (
                    _folder_files("checkpoints"),
                    {"tooltip": _CHECKPOINT_TOOLTIP},
                ),
                "images": (
                    "IMAGE",
                    {"tooltip": "The pictures of the new concept (a few are enough)."},
                ),
                "token": ("STRING", {
                    "default": "my-word",
                    "tooltip": "The word to learn: a name, not a path (no spaces, slashes, '..' "
                    "or leading dot); also the file name, <token>.safetensors in the "
                    "embeddings folder.",
                    "multiline": False,
                }),
                "init_text": ("STRING", {
                    "default": "*",
                    "tooltip": "Text whose token vectors start the word (A1111); for SDXL both "
                    "of its tables (clip_l and clip_g) start from it.",
                    "multiline": False,
                }),
                "vectors": ("INT", {"default": 1, "min": 1, "max": 75, "step": 1}),
                "steps": ("INT", {"default": 3000, "min": 1, "max": 1_000_000, "step": 1}),
                "learning_rate": ("STRING", {
                    "default": "0.005",
                    "tooltip": "A number or an A1111 schedule such as 0.005:100, 1e-3:1000, 1e-5.",
                    "multiline": False,
                }),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "step": 1}),
                # The seed is a u64 in the C params.
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1}),
                "template": (["object", "style"], {
                    "default": "object",
                    "tooltip": "Prompt templates: an object ('a photo of a {}') or a style "
                    "('a painting in the style of {}').",
                }),
                "resolution": ("INT", {
                    "default": 0, "min": 0, "max": 4096, "step": 8,
                    "tooltip": "Training size in pixels, a multiple of 8 from 64. 0: the "
                    "model's own, as it was trained: SDXL 1024, SD 2.x v-prediction (768-v) "
                    "768, SD 1.x and SD 2.x base 512. Smaller is faster and needs less memory.",
                }),
                "device": (["auto", "cpu", "cuda", "metal"], {
                    "default": "auto",
                    "tooltip": "auto: cuda when this build has it (sdti.cuda/1), else cpu.",
                }),
                "precision": (["auto", "f32", "bf16", "f16"], {
                    "default": "auto",
                    "tooltip": "The UNet's and VAE's precision (the learned vectors stay f32). "
                    "auto: bf16 on cuda, f32 elsewhere.",
                }),
                "recompute": (["auto", "off", "on"], {
                    "default": "auto",
                    "tooltip": "on: rerun each UNet block in the backward pass instead of keeping "
                    "its activations (the same result, less memory, one more UNet forward pass "
                    "per step). auto: only when a step would not fit in the memory available, "
                    "and then for as few of the UNet's transformers as it takes.",
                }),
                "overwrite": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Replace <token>.safetensors when the embeddings folder already "
                    "has it. Off: stop with an error before training starts.",
                }),
            },
            "optional": {
                "prediction_type": (list(_PREDICTION_TYPES), {
                    "default": "model",
                    "tooltip": "What the UNet predicts. model: what the checkpoint's files say "
                    "(the report tells what was used); set v_prediction for a v-prediction "
                    "fine-tune whose file does not say so.",
                }),
                "zero_terminal_snr": (list(_ZERO_SNR), {
                    "default": "model",
                    "tooltip": "Rescale the noise schedule to zero terminal SNR, as v-prediction "
                    "SDXL fine-tunes are trained. model: what the checkpoint's files say.",
                }),
                "clip_skip": ("INT", {
                    "default": 0, "min": 0, "max": 24, "step": 1,
                    "tooltip": "Train on this text encoder layer from the end: 1 the last, 2 the "
                    "penultimate (CLIP Set Last Layer -1 and -2). 0: the model's own, 1 for "
                    "SD 1.x, 2 for SD 2.x and SDXL.",
                }),
                "random_crop": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: each picture is cropped at its center. On: one random crop "
                    "per picture (fixed by the seed).",
                }),
                "preview_prompt": ("STRING", {
                    "default": "a photo of {}",
                    "tooltip": "What the previews draw; {} stands for the word.",
                    "multiline": False,
                }),
                "preview_every": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000, "step": 1,
                    "tooltip": "Every this many steps (and before the first), draw the preview "
                    "prompt with the word as learned so far into the progress display. 0: no "
                    "previews. Each costs about 20 sampling steps.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return _is_changed(is_changed_train, inputs)

    def run(self, checkpoint, images, token, init_text, vectors, steps, learning_rate,
            batch_size, seed, template, resolution, device="auto", precision="auto",
            recompute="auto", overwrite=False, prediction_type="model",
            zero_terminal_snr="model", clip_skip=0, random_crop=False,
            preview_prompt="a photo of {}", preview_every=0):
        label = self.DISPLAY_NAME
        lib = library()
        token = str(token)
        for name, value, table in (("prediction_type", prediction_type, _PREDICTION_TYPES),
                                   ("zero_terminal_snr", zero_terminal_snr, _ZERO_SNR)):
            if value not in table:
                raise ValueError(f"{label}: {name}: {value!r} is not one of {', '.join(table)}")
        preview_every = int(preview_every)
        if preview_every < 0:
            raise ValueError(f"{label}: preview_every: {preview_every} is below 0")
        # Everything that can be known before training is checked first: a run can take hours.
        check_name(label, "token", token)
        if not str(init_text).strip():
            raise ValueError(
                f"{label}: init_text is empty; type a word close to the concept (such as "
                "'cat' or 'painting'): its token vectors are where the new word starts"
            )
        destination(label, token, "safetensors", overwrite, "token")
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

        params.model_path = os.fsencode(model_path)
        keep.append(params.model_path)
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
        params.recompute = _constant("recompute", recompute)
        params.prediction_type = _PREDICTION_TYPES[prediction_type]
        params.zero_terminal_snr = _ZERO_SNR[zero_terminal_snr]
        params.clip_skip = int(clip_skip)
        params.random_crop = 1 if random_crop else 0

        bar = comfy_utils.ProgressBar(int(steps)) if comfy_utils is not None else None
        trainer = ctypes.c_void_p()
        previews = _Previews(lib, trainer, label, preview_prompt, seed, preview_every, bar)

        raised = []  # an exception from the callback, raised again once the step returns

        def on_progress(_user_data, progress):
            try:
                step, total = progress.contents.step, progress.contents.total_steps
                # Drawn here, between steps: the library unlocks the trainer for the callback.
                image = previews.after(step, total)
                # With ComfyUI's server, the bar's hook raises InterruptProcessingException
                # (and clears the interrupt flag) when the user interrupts.
                if bar is not None:
                    bar.update_absolute(step, total, image)
                if model_management is not None and model_management.processing_interrupted():
                    return 1  # ComfyUI's interrupt cancels the run
                return 0
            except Exception as e:  # an exception must not unwind through ctypes: keep it
                raised.append(e)
                return 1

        callback = sdti_lib.PROGRESS_FN(on_progress)
        params.progress = callback
        try:
            lib.check(lib.trainer_new(ctypes.byref(params), ctypes.byref(trainer)), "sdti_trainer_new")
        except sdti_lib.SdtiError as e:
            raise _model_hint(e) from None
        try:
            # What recompute auto chose, for the report.
            chosen = ctypes.c_uint32()
            lib.check(lib.trainer_recompute(trainer, ctypes.byref(chosen)), "sdti_trainer_recompute")
            recomputed = chosen.value == _constant("recompute", "on")
            # What the model is and what follows from it, shown before a long run starts.
            family, trained_at, clip_layer, notes = lib.trainer_model(trainer)
            family_name, export_format = _FAMILIES.get(family, (f"family {family}", None))
            if export_format is None:
                raise ValueError(f"{label}: {checkpoint}: this pack does not know model {family_name}")
            model_line = (
                f"{family_name} at {trained_at} px"
                f"{' (the model default)' if int(resolution) == 0 else ''}, text from CLIP "
                f"layer {clip_layer}, word written as {export_format}"
            )
            run_line = _run_line(lib, trainer, prediction_type, zero_terminal_snr, random_crop)
            log.info("%s: %s: %s", label, checkpoint, "; ".join([model_line, run_line] + notes))
            for data, width, height in image_batch_to_rgb8(images):
                lib.check(
                    lib.trainer_add_image(trainer, data, width, height, 0, 0, None),
                    "sdti_trainer_add_image",
                )
            # The word before training, where previews start (and a preview prompt the
            # library cannot read is said now, not hours later).
            first = previews.first()
            if bar is not None and first is not None:
                bar.update_absolute(0, int(steps), first)
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
            os.makedirs(output_folder("embeddings"), exist_ok=True)
            # The folder again, now that it exists; whether something appeared at the path
            # during training is the library's check as it writes (without
            # SDTI_WRITE_OVERWRITE it refuses to replace anything).
            path = destination(label, token, "safetensors", overwrite, "token", check_existing=False)
            _check_write(
                lib,
                lib.trainer_export_ex(
                    trainer, os.fsencode(path), _constant("format", export_format),
                    _write_flags(overwrite),
                ),
                label, path, "token", "sdti_trainer_export_ex",
            )
        finally:
            lib.trainer_free(trainer)
        _remember_written(_train_output_keys(token) + [("SDTI_TrainEmbedding",)], path)
        prompt = f"embedding:{token}"
        report = (
            f"{token}: {stats.step} steps in {stats.seconds:.0f} s, loss {stats.loss:.4f}"
            f"{' (recompute on)' if recomputed else ''}\n"
            f"model: {model_line}\n"
            f"run: {run_line}\n"
            + "".join(f"note: {n}\n" for n in notes)
            + (f"note: {previews.stopped}\n" if previews.stopped else "")
            + f"wrote {path}\nprompt: {prompt}"
        )
        # "ui" is what ComfyUI sends to the browser (web/sdti.js shows it on the node).
        return {"ui": {"text": [report]}, "result": (prompt, path)}


class SDTI_ConvertEmbedding:
    DISPLAY_NAME = "Convert Embedding (sdti)"
    CATEGORY = "sdti"
    DESCRIPTION = (
        "Rewrites a learned-embedding file in another format (A1111 .pt, safetensors, "
        "diffusers, PNG, kohya, OneTrainer; for SDXL words sdxl, kohya-pt, onetrainer or "
        "diffusers-sdxl) into the embeddings folder; an existing file is replaced only when "
        "overwrite is on."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("the written file",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    C_FUNCTIONS = ("sdti_name_check", "sdti_embedding_convert_ex", "sdti_last_error")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "format": ([
                    "safetensors", "a1111-pt", "diffusers", "diffusers-bin", "png",
                    "kohya-pt", "kohya-safetensors", "onetrainer", "sdxl", "diffusers-sdxl",
                ], {"default": "safetensors", "tooltip": _FORMAT_TOOLTIP}),
                "precision": (["f32", "f16"], {"default": "f32"}),
                "name": ("STRING", {
                    "default": "",
                    "tooltip": "The new file's stem, a name and not a path (empty: the "
                    "source's stem plus the format).",
                    "multiline": False,
                }),
            },
            "optional": {
                "embedding": _embedding_input(),
                "path": _path_input("converted"),
                "overwrite": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Replace the new file when the embeddings folder already has "
                    "it. Off: stop with an error.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return _is_changed(is_changed_convert, inputs)

    def run(self, format, precision, name="", embedding="", path="", overwrite=False):
        label = self.DISPLAY_NAME
        lib = library()
        name = str(name)
        if name.strip():
            check_name(label, "name", name)
        src = _embedding_source(label, embedding, path)
        _check_format_fits(label, lib, src, format)
        stem = name if name.strip() else f"{os.path.splitext(os.path.basename(src))[0]}-{format}"
        if not name.strip():
            # The stem made from the source's file name: checked all the same.
            check_name(label, "name (made from the source file's name; type one)", stem)
        ext = MANIFEST["constants"]["format_extension"][format]
        os.makedirs(output_folder("embeddings"), exist_ok=True)
        dst = destination(label, stem, ext, overwrite, "name")
        # diffusers-sdxl writes a second file beside the first: checked the same way.
        second = [
            destination(label, f"{stem}{suffix}", ext, overwrite, "name")
            for suffix in _SECOND_FILES.get(format, ())
        ]
        _check_write(
            lib,
            lib.embedding_convert_ex(
                os.fsencode(src),
                os.fsencode(dst),
                _constant("format", format),
                _constant("precision", precision),
                _write_flags(overwrite),
            ),
            label, dst, "name", "sdti_embedding_convert_ex", second,
        )
        _remember_written(_convert_output_keys(format, name, embedding, path), dst, *second)
        return {"ui": {"text": [f"wrote {' and '.join([dst] + second)}"]}, "result": (dst,)}


class SDTI_InspectEmbedding:
    DISPLAY_NAME = "Inspect Embedding (sdti)"
    CATEGORY = "sdti"
    DESCRIPTION = (
        "Reads a learned-embedding file and reports its name, vectors, width, model family, "
        "format, step and A1111 checksum."
    )
    RETURN_TYPES = ("STRING", "INT", "STRING")
    RETURN_NAMES = ("summary", "vectors", "prompt")
    OUTPUT_TOOLTIPS = ("the inspection as JSON", "vectors per token", "embedding:<file stem>")
    FUNCTION = "run"
    OUTPUT_NODE = False
    C_FUNCTIONS = ("sdti_embedding_inspect", "sdti_last_error")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {},
            "optional": {
                "embedding": _embedding_input(),
                "path": _path_input("read"),
            },
        }

    def run(self, embedding="", path=""):
        path = _embedding_source(self.DISPLAY_NAME, embedding, path)
        info = library().inspect(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return (json.dumps(info, indent=1), int(info.get("vectors") or 0), f"embedding:{stem}")


NODES = (SDTI_TrainEmbedding, SDTI_ConvertEmbedding, SDTI_InspectEmbedding)
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in NODES}
