"""ctypes binding of the sdti C ABI (include/sdti.h), for the node pack.

Only what the nodes use. Structs mirror the header field for field; struct_size comes
from the library's _init functions, so a newer library keeps working.
"""

import ctypes
import json
import os
import sys

ABI_MAJOR = 1
SDTI_OK = 0
SDTI_CANCELLED = 1
SDTI_ERR_INVALID_ARGUMENT = 2
SDTI_ERR_BUFFER_TOO_SMALL = 5
SDTI_ERR_EXISTS = 19  # the destination exists and SDTI_WRITE_OVERWRITE was not given (ABI 1.2)
SDTI_WRITE_OVERWRITE = 1  # flag of sdti_trainer_export_ex / sdti_embedding_convert_ex
# sdti_trainer_family's answers (ABI 1.4).
SDTI_FAMILY_SD1 = 1
SDTI_FAMILY_SD2 = 2
SDTI_FAMILY_SDXL = 3
# The minor ABI version the functions below need (sdti_trainer_family and friends).
ABI_MINOR_NEEDED = 4


class SdtiError(RuntimeError):
    """A failed sdti call: its status, the status text and the library's message."""

    def __init__(self, status, what, message):
        super().__init__(f"{what}: {message}")
        self.status = status
        self.what = what
        self.message = message


class SdtiCancelled(SdtiError):
    """Training stopped early (sdti_trainer_cancel or the progress callback)."""


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
    ]


def _library_name():
    if sys.platform == "darwin":
        return "libsdti.dylib"
    if sys.platform.startswith("win"):
        return "sdti.dll"
    return "libsdti.so"


def find_library(pack_dir):
    """SDTI_LIBRARY, else next to the pack, else the repository's target folder."""
    env = os.environ.get("SDTI_LIBRARY")
    if env:
        return env
    name = _library_name()
    repo = os.path.normpath(os.path.join(pack_dir, "..", ".."))
    candidates = [os.path.join(pack_dir, name)] + [
        os.path.join(repo, "target", profile, name) for profile in ("release", "debug")
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{name} not found: set SDTI_LIBRARY, or put it into {pack_dir} "
        f"(looked at {', '.join(candidates)})"
    )


class Library:
    """The loaded library with typed functions."""

    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        self._lib = lib
        c = ctypes
        sig = {
            "sdti_abi_version": (c.c_uint32, []),
            "sdti_version_string": (c.c_char_p, []),
            "sdti_has_feature": (c.c_int32, [c.c_char_p]),
            "sdti_status_str": (c.c_char_p, [c.c_int32]),
            "sdti_last_error": (c.c_int32, [c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)]),
            "sdti_trainer_params_init": (c.c_int32, [c.POINTER(TrainerParams)]),
            "sdti_trainer_new": (c.c_int32, [c.POINTER(TrainerParams), c.POINTER(c.c_void_p)]),
            "sdti_trainer_recompute": (c.c_int32, [c.c_void_p, c.POINTER(c.c_uint32)]),
            "sdti_trainer_family": (c.c_int32, [c.c_void_p, c.POINTER(c.c_uint32)]),
            "sdti_trainer_resolution": (c.c_int32, [c.c_void_p, c.POINTER(c.c_uint32)]),
            "sdti_encoder_new_from_trainer": (c.c_int32, [c.c_void_p, c.POINTER(c.c_void_p)]),
            "sdti_encoder_clip_skip": (c.c_int32, [c.c_void_p, c.POINTER(c.c_uint32)]),
            "sdti_encoder_free": (None, [c.c_void_p]),
            "sdti_trainer_notes": (
                c.c_int32,
                [c.c_void_p, c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)],
            ),
            "sdti_trainer_add_image": (
                c.c_int32,
                [c.c_void_p, c.c_char_p, c.c_uint32, c.c_uint32, c.c_size_t, c.c_uint32, c.c_char_p],
            ),
            "sdti_trainer_step": (c.c_int32, [c.c_void_p, c.c_uint32, c.POINTER(StepStats)]),
            "sdti_trainer_cancel": (None, [c.c_void_p]),
            "sdti_trainer_export": (c.c_int32, [c.c_void_p, c.c_char_p, c.c_uint32]),
            "sdti_trainer_export_ex": (c.c_int32, [c.c_void_p, c.c_char_p, c.c_uint32, c.c_uint32]),
            "sdti_trainer_free": (None, [c.c_void_p]),
            "sdti_embedding_convert": (c.c_int32, [c.c_char_p, c.c_char_p, c.c_uint32, c.c_uint32]),
            "sdti_embedding_convert_ex": (
                c.c_int32,
                [c.c_char_p, c.c_char_p, c.c_uint32, c.c_uint32, c.c_uint32],
            ),
            "sdti_name_check": (c.c_int32, [c.c_char_p]),
            "sdti_embedding_inspect": (
                c.c_int32,
                [c.c_char_p, c.c_char_p, c.c_size_t, c.POINTER(c.c_size_t)],
            ),
        }
        for name, (restype, argtypes) in sig.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:  # an older library: say which, not a bare ctypes error
                raise ImportError(
                    f"{path} lacks {name}: this pack needs sdti's C ABI "
                    f"{ABI_MAJOR}.{ABI_MINOR_NEEDED} or newer"
                ) from None
            fn.restype = restype
            fn.argtypes = argtypes
            short = name[len("sdti_"):]
            if not hasattr(type(self), short):  # methods below wrap these
                setattr(self, short, fn)
        major = self.abi_version() >> 16
        if major != ABI_MAJOR:
            raise ImportError(f"{path} has ABI major {major}; this pack needs {ABI_MAJOR}")

    def version(self):
        return self.version_string().decode()

    def has_feature(self, feature_id):
        return bool(self._lib.sdti_has_feature(feature_id.encode()))

    def last_error(self):
        needed = ctypes.c_size_t(0)
        self._lib.sdti_last_error(None, 0, ctypes.byref(needed))
        buf = ctypes.create_string_buffer(max(needed.value, 1))
        self._lib.sdti_last_error(buf, len(buf), None)
        return buf.value.decode("utf-8", "replace")

    def check(self, status, what):
        """Raises SdtiError (SdtiCancelled for SDTI_CANCELLED) unless status is SDTI_OK."""
        if status == SDTI_OK:
            return
        message = self.last_error() or self.status_str(status).decode()
        cls = SdtiCancelled if status == SDTI_CANCELLED else SdtiError
        raise cls(status, what, message)

    def name_check(self, name):
        """None when `name` can be a learned word's name and a file stem in a host's
        folder, else the library's reason (sdti_name_check)."""
        status = self._lib.sdti_name_check(name.encode("utf-8", "surrogatepass"))
        if status == SDTI_OK:
            return None
        return self.last_error() or self.status_str(status).decode()

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
        needed = ctypes.c_size_t(0)
        status = self._lib.sdti_trainer_notes(trainer, None, 0, ctypes.byref(needed))
        if status != SDTI_ERR_BUFFER_TOO_SMALL:
            self.check(status, "sdti_trainer_notes")
        buf = ctypes.create_string_buffer(max(needed.value, 1))
        self.check(
            self._lib.sdti_trainer_notes(trainer, buf, len(buf), ctypes.byref(needed)),
            "sdti_trainer_notes",
        )
        notes = [line for line in buf.value.decode("utf-8", "replace").split("\n") if line]
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
        return family.value, resolution.value, -int(clip_skip.value), notes

    def inspect(self, path):
        needed = ctypes.c_size_t(0)
        raw = os.fsencode(path)
        status = self._lib.sdti_embedding_inspect(raw, None, 0, ctypes.byref(needed))
        if status != SDTI_ERR_BUFFER_TOO_SMALL:
            self.check(status, f"inspect {path}")
        buf = ctypes.create_string_buffer(needed.value)
        self.check(
            self._lib.sdti_embedding_inspect(raw, buf, len(buf), ctypes.byref(needed)),
            f"inspect {path}",
        )
        return json.loads(buf.value.decode())
