"""The ctypes layer over sdti's C ABI (include/sdti.h, ABI 1.5): constants, structs and
function signatures, declared once.

This file is the one declaration of the ABI in Python. The `sdti` package's API
(`sdti/__init__.py`) is built on it, and the ComfyUI node pack (plugin-manifests/comfyui)
loads it too: from the installed `sdti` package when there is one, else from its own copy
(scripts/install-comfyui.sh copies this file next to the pack) or from this repository. So
it imports nothing but the standard library, and it loads no library by itself:
`Library(path)` does.

Structs mirror the header field for field; `struct_size` comes from the library's `_init`
functions, so a newer library keeps working. Constants are checked against the header by
python/tests/test_capi.py.
"""

import ctypes
import json
import os
import sys
from typing import TYPE_CHECKING, Any

ABI_MAJOR = 1
# The minor ABI version every function below needs (sdti_trainer_family and friends).
ABI_MINOR_NEEDED = 4

# sdti_status
SDTI_OK = 0
SDTI_CANCELLED = 1
SDTI_ERR_INVALID_ARGUMENT = 2
SDTI_ERR_INVALID_UTF8 = 3
SDTI_ERR_STRUCT_SIZE = 4
SDTI_ERR_BUFFER_TOO_SMALL = 5
SDTI_ERR_INVALID_HANDLE = 6
SDTI_ERR_BUSY = 7
SDTI_ERR_POISONED = 8
SDTI_ERR_PANIC = 9
SDTI_ERR_IO = 10
SDTI_ERR_MODEL = 11
SDTI_ERR_DEVICE = 12
SDTI_ERR_IMAGE = 13
SDTI_ERR_EMBEDDING = 14
SDTI_ERR_CHECKPOINT = 15
SDTI_ERR_STATE = 16
SDTI_ERR_UNSUPPORTED = 17
SDTI_ERR_COMPUTE = 18
SDTI_ERR_EXISTS = 19
SDTI_ERR_MEMORY = 20  # ABI 1.5: sdti_trainer_new refuses a run that cannot fit

# sdti_precision
SDTI_PRECISION_F32 = 0
SDTI_PRECISION_F16 = 1
SDTI_PRECISION_BF16 = 2
SDTI_PRECISION_AUTO = 3

# sdti_pixel_format
SDTI_PIXEL_RGB8 = 0
SDTI_PIXEL_RGBA8 = 1

# sdti_family
SDTI_FAMILY_SD1 = 1
SDTI_FAMILY_SD2 = 2
SDTI_FAMILY_SDXL = 3

# sdti_format (names: sdti_format_from_name)
SDTI_FORMAT_AUTO = 0

# sdti_write_flags
SDTI_WRITE_OVERWRITE = 1

# sdti_recompute
SDTI_RECOMPUTE_OFF = 0
SDTI_RECOMPUTE_ON = 1
SDTI_RECOMPUTE_AUTO = 2

# sdti_prediction (ABI 1.5)
SDTI_PREDICTION_MODEL = 0
SDTI_PREDICTION_EPSILON = 1
SDTI_PREDICTION_V = 2

# sdti_zero_snr (ABI 1.5)
SDTI_ZERO_SNR_MODEL = 0
SDTI_ZERO_SNR_OFF = 1
SDTI_ZERO_SNR_ON = 2

# Chunk styles (sdti_encoder_set_chunk_style)
SDTI_CHUNKS_A1111 = 0
SDTI_CHUNKS_COMFYUI = 1


class Error(RuntimeError):
    """A failed sdti call: `status` (an SDTI_* code), `what` (the call, or what it did) and
    `message` (the library's explanation from sdti_last_error, else the status text)."""

    def __init__(self, status, what, message):
        super().__init__(f"{what}: {message}")
        self.status = status
        self.what = what
        self.message = message


class Cancelled(Error):
    """Training stopped early (sdti_trainer_cancel or the progress callback)."""


class ModelParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("precision", ctypes.c_uint32),
        ("model_path", ctypes.c_char_p),
        ("device", ctypes.c_char_p),
    ]


class Progress(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("steps_done", ctypes.c_uint32),
        ("step", ctypes.c_uint64),
        ("total_steps", ctypes.c_uint64),
        ("loss", ctypes.c_double),
        ("learning_rate", ctypes.c_double),
        ("seconds", ctypes.c_double),
    ]


# sdti_step_stats has the same fields as sdti_progress.
StepStats = type("StepStats", (ctypes.Structure,), {"_fields_": Progress._fields_})

PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(Progress))


class TrainerParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("precision", ctypes.c_uint32),
        ("model_path", ctypes.c_char_p),
        ("device", ctypes.c_char_p),
        ("token", ctypes.c_char_p),
        ("init_text", ctypes.c_char_p),
        ("vectors", ctypes.c_uint32),
        ("resolution", ctypes.c_uint32),
        ("learning_rate", ctypes.c_char_p),
        ("batch_size", ctypes.c_uint32),
        ("gradient_accumulation", ctypes.c_uint32),
        ("seed", ctypes.c_uint64),
        ("templates", ctypes.c_char_p),
        ("max_steps", ctypes.c_uint64),
        ("output_dir", ctypes.c_char_p),
        ("save_every", ctypes.c_uint64),
        ("resume_checkpoint", ctypes.c_char_p),
        ("progress", PROGRESS_FN),
        ("progress_user_data", ctypes.c_void_p),
        # Revision 2 (ABI 1.3).
        ("recompute", ctypes.c_uint32),
        ("memory_budget_mib", ctypes.c_uint32),
        # Revision 3 (ABI 1.5); an older library's sdti_trainer_params_init sets a smaller
        # struct_size, and it never reads these.
        ("prediction_type", ctypes.c_uint32),
        ("zero_terminal_snr", ctypes.c_uint32),
        ("clip_skip", ctypes.c_uint32),
        ("random_crop", ctypes.c_uint32),
    ]


def _signatures():
    c = ctypes
    i32, u32, size, vp, s = c.c_int32, c.c_uint32, c.c_size_t, c.c_void_p, c.c_char_p
    p_u32, p_size, p_f32 = c.POINTER(u32), c.POINTER(size), c.POINTER(c.c_float)
    p_i32, p_vp = c.POINTER(i32), c.POINTER(vp)
    return {
        "sdti_abi_version": (u32, []),
        "sdti_version_string": (s, []),
        "sdti_has_feature": (i32, [s]),
        "sdti_status_str": (s, [i32]),
        "sdti_last_error": (i32, [s, size, p_size]),
        "sdti_embedding_convert": (i32, [s, s, u32, u32]),
        "sdti_embedding_convert_ex": (i32, [s, s, u32, u32, u32]),
        "sdti_format_from_name": (i32, [s, p_u32]),
        "sdti_name_check": (i32, [s]),
        "sdti_embedding_inspect": (i32, [s, s, size, p_size]),
        "sdti_model_params_init": (i32, [c.POINTER(ModelParams)]),
        "sdti_encoder_new": (i32, [c.POINTER(ModelParams), p_vp]),
        "sdti_encoder_new_from_trainer": (i32, [vp, p_vp]),
        "sdti_encoder_register_trainer": (i32, [vp, vp]),
        "sdti_encoder_register_token": (i32, [vp, s, s]),
        "sdti_encoder_register_vectors": (i32, [vp, s, p_f32, size, size]),
        "sdti_encoder_dim": (i32, [vp, p_u32]),
        "sdti_encoder_family": (i32, [vp, p_u32]),
        "sdti_encoder_pooled_dim": (i32, [vp, p_u32]),
        "sdti_encoder_part_dims": (i32, [vp, p_u32, size, p_size]),
        "sdti_encoder_register_vectors_sdxl": (i32, [vp, s, p_f32, size, size, p_f32, size, size]),
        "sdti_encoder_set_chunk_style": (i32, [vp, u32]),
        "sdti_encoder_set_clip_skip": (i32, [vp, u32]),
        "sdti_encoder_set_clip_layer": (i32, [vp, i32]),
        "sdti_encoder_clip_skip": (i32, [vp, p_u32]),
        "sdti_encoder_tokenize": (i32, [vp, s, p_u32, p_i32, p_i32, size, p_size]),
        "sdti_encoder_encode": (i32, [vp, s, p_f32, size, p_size, p_u32]),
        "sdti_encoder_encode_pooled": (i32, [vp, s, p_f32, size, p_f32, size, p_size, p_u32]),
        "sdti_encoder_free": (None, [vp]),
        "sdti_trainer_params_init": (i32, [c.POINTER(TrainerParams)]),
        "sdti_trainer_new": (i32, [c.POINTER(TrainerParams), p_vp]),
        "sdti_trainer_add_image": (i32, [vp, s, u32, u32, size, u32, s]),
        "sdti_trainer_add_image_file": (i32, [vp, s]),
        "sdti_trainer_image_count": (i32, [vp, p_u32]),
        "sdti_trainer_recompute": (i32, [vp, p_u32]),
        "sdti_trainer_family": (i32, [vp, p_u32]),
        "sdti_trainer_resolution": (i32, [vp, p_u32]),
        "sdti_trainer_notes": (i32, [vp, s, size, p_size]),
        "sdti_trainer_step": (i32, [vp, u32, c.POINTER(StepStats)]),
        "sdti_trainer_cancel": (None, [vp]),
        "sdti_trainer_export": (i32, [vp, s, u32]),
        "sdti_trainer_export_ex": (i32, [vp, s, u32, u32]),
        "sdti_trainer_save_checkpoint": (i32, [vp, s]),
        "sdti_trainer_get_vectors": (i32, [vp, p_f32, size, p_size, p_u32]),
        "sdti_trainer_get_part_vectors": (i32, [vp, u32, p_f32, size, p_size, p_u32, p_u32]),
        "sdti_trainer_free": (None, [vp]),
    }


SIGNATURES = _signatures()

# Functions newer than ABI_MINOR_NEEDED: {name: (the minor that added it, restype,
# argtypes)}. Bound when the library has them; else calling one raises Error
# (SDTI_ERR_UNSUPPORTED) naming the ABI it needs.
def _newer_signatures():
    c = ctypes
    i32, u32, u64, size, vp, s = c.c_int32, c.c_uint32, c.c_uint64, c.c_size_t, c.c_void_p, c.c_char_p
    p_u32, p_size, p_f32, p_u8 = c.POINTER(u32), c.POINTER(size), c.POINTER(c.c_float), c.POINTER(c.c_uint8)
    return {
        "sdti_trainer_prediction": (5, i32, [vp, p_u32, p_u32]),
        # (trainer, prompt, seed, steps, size, rgb, cap, &width, &height)
        "sdti_trainer_preview": (5, i32, [vp, s, u64, u32, u32, p_u8, size, p_u32, p_u32]),
        "sdti_encoder_set_prompt_weights": (5, i32, [vp, u32]),
        "sdti_encoder_token_weights": (5, i32, [vp, s, p_f32, size, p_size]),
    }


NEWER_SIGNATURES = _newer_signatures()


def library_file_name():
    """The library's file name on this platform, as cargo names the cdylib."""
    if sys.platform == "darwin":
        return "libsdti.dylib"
    if sys.platform.startswith("win"):
        return "sdti.dll"
    return "libsdti.so"


class Library:
    """The loaded library: every function of SIGNATURES typed, as an attribute without the
    `sdti_` prefix (`lib.trainer_new(...)`), plus the helpers below. Refuses a library of
    another ABI major or one older than ABI_MINOR_NEEDED, saying which."""

    if TYPE_CHECKING:  # the typed C functions set in __init__, e.g. lib.trainer_new

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, path):
        self.path = os.fspath(path)
        lib = ctypes.CDLL(self.path)  # CDLL: each call releases the GIL
        self._lib = lib
        for name, (restype, argtypes) in SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:  # an older library: say which, not a bare ctypes error
                raise ImportError(
                    f"{self.path} lacks {name}: this needs sdti's C ABI "
                    f"{ABI_MAJOR}.{ABI_MINOR_NEEDED} or newer"
                ) from None
            fn.restype = restype
            fn.argtypes = argtypes
            short = name[len("sdti_"):]
            if not hasattr(type(self), short):  # methods below wrap these
                setattr(self, short, fn)
        for name, (minor, restype, argtypes) in NEWER_SIGNATURES.items():
            fn = getattr(lib, name, None)
            if fn is None:
                fn = self._missing(name, minor)
            else:
                fn.restype = restype
                fn.argtypes = argtypes
            setattr(self, name[len("sdti_"):], fn)
        major = self.abi_version() >> 16
        if major != ABI_MAJOR:
            raise ImportError(f"{self.path} has C ABI major {major}; this needs {ABI_MAJOR}")

    def _missing(self, name, minor):
        path = self.path

        def missing(*_args):
            raise Error(
                SDTI_ERR_UNSUPPORTED, name,
                f"{path} lacks {name}, which came with sdti's C ABI {ABI_MAJOR}.{minor}",
            )

        return missing

    def abi(self):
        """(major, minor) of the library's C ABI."""
        version = self.abi_version()
        return version >> 16, version & 0xFFFF

    def version(self):
        return self._lib.sdti_version_string().decode()

    def has_feature(self, feature_id):
        return bool(self._lib.sdti_has_feature(feature_id.encode()))

    def last_error(self):
        needed = ctypes.c_size_t(0)
        self._lib.sdti_last_error(None, 0, ctypes.byref(needed))
        buf = ctypes.create_string_buffer(max(needed.value, 1))
        self._lib.sdti_last_error(buf, len(buf), None)
        return buf.value.decode("utf-8", "replace")

    def error(self, status, what):
        """The exception for a non-OK status, with this thread's last error."""
        message = self.last_error() or self._lib.sdti_status_str(status).decode()
        cls = Cancelled if status == SDTI_CANCELLED else Error
        return cls(status, what, message)

    def check(self, status, what):
        """Raises Error (Cancelled for SDTI_CANCELLED) unless status is SDTI_OK."""
        if status != SDTI_OK:
            raise self.error(status, what)

    def status_name(self, status):
        return self._lib.sdti_status_str(status).decode()

    def name_check(self, name):
        """None when `name` can be a learned word's name and a file stem in a host's
        folder, else the library's reason (sdti_name_check)."""
        status = self._lib.sdti_name_check(name.encode("utf-8", "surrogatepass"))
        if status == SDTI_OK:
            return None
        return self.last_error() or self.status_name(status)

    def format_code(self, name):
        """The SDTI_FORMAT_* code of a format name (sdti_format_from_name); "auto" is 0."""
        if str(name).lower() == "auto":
            return SDTI_FORMAT_AUTO
        code = ctypes.c_uint32()
        self.check(
            self._lib.sdti_format_from_name(str(name).encode(), ctypes.byref(code)),
            f"format {name!r}",
        )
        return code.value

    def text(self, fn, handle, what):
        """A string out of a (handle, buf, len, &needed) call such as sdti_trainer_notes."""
        needed = ctypes.c_size_t(0)
        status = fn(handle, None, 0, ctypes.byref(needed))
        if status != SDTI_ERR_BUFFER_TOO_SMALL:
            self.check(status, what)
        buf = ctypes.create_string_buffer(max(needed.value, 1))
        self.check(fn(handle, buf, len(buf), ctypes.byref(needed)), what)
        return buf.value.decode("utf-8", "replace")

    def trainer_model(self, trainer):
        """What the trainer's model is: (family code, resolution in pixels, the text layer
        its prompts are encoded from as ComfyUI's CLIP Set Last Layer says it (-1 the last,
        -2 the penultimate), the notes on what loading decided from clues, one per line)."""
        family = ctypes.c_uint32()
        self.check(self._lib.sdti_trainer_family(trainer, ctypes.byref(family)), "sdti_trainer_family")
        resolution = ctypes.c_uint32()
        self.check(
            self._lib.sdti_trainer_resolution(trainer, ctypes.byref(resolution)),
            "sdti_trainer_resolution",
        )
        notes = self.text(self._lib.sdti_trainer_notes, trainer, "sdti_trainer_notes")
        # The trainer conditions as an encoder made from it encodes (the family's layer).
        encoder = ctypes.c_void_p()
        self.check(
            self._lib.sdti_encoder_new_from_trainer(trainer, ctypes.byref(encoder)),
            "sdti_encoder_new_from_trainer",
        )
        try:
            clip_skip = ctypes.c_uint32()
            self.check(
                self._lib.sdti_encoder_clip_skip(encoder, ctypes.byref(clip_skip)),
                "sdti_encoder_clip_skip",
            )
        finally:
            self._lib.sdti_encoder_free(encoder)
        lines = [line for line in notes.split("\n") if line]
        return family.value, resolution.value, -int(clip_skip.value), lines

    def preview_rgb(self, trainer, prompt=None, seed=0, steps=0, size=0):
        """sdti_trainer_preview (C ABI 1.5): the word as the run has learned it so far,
        drawn from `prompt` (None: "a photo of {}"; {} and the token stand for the word)
        with the noise of `seed`, `steps` DDIM steps (0: 20) at `size` pixels (0: the
        run's resolution). Returns (RGB8 bytes, width, height), rows tightly packed."""
        raw = None if prompt is None else str(prompt).encode("utf-8")
        seed, steps, size = int(seed), int(steps), int(size)
        for name, value, top in (("seed", seed, 2**64 - 1), ("steps", steps, 2**32 - 1), ("size", size, 2**32 - 1)):
            if not 0 <= value <= top:  # ctypes would wrap it silently
                raise ValueError(f"preview: {name} {value} is out of range 0..{top}")
        width, height = ctypes.c_uint32(), ctypes.c_uint32()
        status = self.trainer_preview(
            trainer, raw, seed, steps, size, None, 0, ctypes.byref(width), ctypes.byref(height))
        if status != SDTI_ERR_BUFFER_TOO_SMALL:
            self.check(status, "sdti_trainer_preview")
        n = width.value * height.value * 3
        buf = (ctypes.c_uint8 * n)()
        self.check(
            self.trainer_preview(
                trainer, raw, seed, steps, size, buf, n, ctypes.byref(width), ctypes.byref(height)),
            "sdti_trainer_preview",
        )
        return bytes(buf), width.value, height.value

    def inspect(self, path):
        """sdti_embedding_inspect's JSON, parsed."""
        raw = os.fsencode(path)

        def call(_handle, buf, length, needed):
            return self._lib.sdti_embedding_inspect(raw, buf, length, needed)

        return json.loads(self.text(call, None, f"inspect {os.fsdecode(raw)}"))
