"""sdti: native Textual Inversion for Stable Diffusion (SD 1.x, SD 2.x, SDXL), from Python.

The package holds sdti's native library (libsdti, the same one C hosts and the ComfyUI
pack load) and calls it through its C ABI with ctypes (`sdti._capi`), without any Python
C API, so one wheel serves every Python 3 version of a platform.

    import sdti

    with sdti.Trainer("path/to/model", token="my-cat", init="cat", vectors=2) as trainer:
        for image in ("cat1.png", "cat2.png"):
            trainer.add_image(image)
        trainer.train(200, progress=lambda p: print(p.step, p.loss))
        trainer.export("my-cat.safetensors")

Failures raise `sdti.Error` with the status (`.status`, an `sdti.Status`) and the
library's message. The library is found next to this file, or at `SDTI_LIBRARY` when that
is set (a development build).
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple, TypeVar, Union

from . import _capi
from ._capi import Cancelled, Error

if TYPE_CHECKING:
    import numpy

__all__ = [
    "Cancelled",
    "Encoder",
    "Error",
    "Progress",
    "Status",
    "Tokens",
    "Trainer",
    "abi_version",
    "check_name",
    "convert",
    "has_feature",
    "inspect",
    "library",
    "library_path",
    "version",
]

PathLike = Union[str, "os.PathLike[str]"]


def _package_version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("sdti")
    except Exception:  # noqa: BLE001 - not installed (a source checkout): no version
        return "0+unknown"


__version__ = _package_version()


class Status(enum.IntEnum):
    """sdti_status codes (never renumbered); `Error.status` is one of these."""

    OK = _capi.SDTI_OK
    CANCELLED = _capi.SDTI_CANCELLED
    INVALID_ARGUMENT = _capi.SDTI_ERR_INVALID_ARGUMENT
    INVALID_UTF8 = _capi.SDTI_ERR_INVALID_UTF8
    STRUCT_SIZE = _capi.SDTI_ERR_STRUCT_SIZE
    BUFFER_TOO_SMALL = _capi.SDTI_ERR_BUFFER_TOO_SMALL
    INVALID_HANDLE = _capi.SDTI_ERR_INVALID_HANDLE
    BUSY = _capi.SDTI_ERR_BUSY
    POISONED = _capi.SDTI_ERR_POISONED
    PANIC = _capi.SDTI_ERR_PANIC
    IO = _capi.SDTI_ERR_IO
    MODEL = _capi.SDTI_ERR_MODEL
    DEVICE = _capi.SDTI_ERR_DEVICE
    IMAGE = _capi.SDTI_ERR_IMAGE
    EMBEDDING = _capi.SDTI_ERR_EMBEDDING
    CHECKPOINT = _capi.SDTI_ERR_CHECKPOINT
    STATE = _capi.SDTI_ERR_STATE
    UNSUPPORTED = _capi.SDTI_ERR_UNSUPPORTED
    COMPUTE = _capi.SDTI_ERR_COMPUTE
    EXISTS = _capi.SDTI_ERR_EXISTS
    MEMORY = _capi.SDTI_ERR_MEMORY


_PRECISIONS = {
    "auto": _capi.SDTI_PRECISION_AUTO,
    "f32": _capi.SDTI_PRECISION_F32,
    "f16": _capi.SDTI_PRECISION_F16,
    "bf16": _capi.SDTI_PRECISION_BF16,
}
_RECOMPUTE = {
    "auto": _capi.SDTI_RECOMPUTE_AUTO,
    "off": _capi.SDTI_RECOMPUTE_OFF,
    "on": _capi.SDTI_RECOMPUTE_ON,
}
_PREDICTIONS = {
    "model": _capi.SDTI_PREDICTION_MODEL,
    "epsilon": _capi.SDTI_PREDICTION_EPSILON,
    "v_prediction": _capi.SDTI_PREDICTION_V,
    "v": _capi.SDTI_PREDICTION_V,  # short for v_prediction
}
# What the library says a run predicts, by diffusers' names (as `sdti train` prints them).
_PREDICTION_NAMES = {_capi.SDTI_PREDICTION_EPSILON: "epsilon", _capi.SDTI_PREDICTION_V: "v_prediction"}
_ZERO_SNR = {"model": _capi.SDTI_ZERO_SNR_MODEL, "off": _capi.SDTI_ZERO_SNR_OFF, "on": _capi.SDTI_ZERO_SNR_ON}
_FAMILIES = {_capi.SDTI_FAMILY_SD1: "sd1", _capi.SDTI_FAMILY_SD2: "sd2", _capi.SDTI_FAMILY_SDXL: "sdxl"}
_CHUNK_STYLES = {"a1111": _capi.SDTI_CHUNKS_A1111, "comfyui": _capi.SDTI_CHUNKS_COMFYUI}

# ---------------------------------------------------------------- the library

_library: Optional[_capi.Library] = None
_library_lock = threading.Lock()


def library_path() -> str:
    """Where the native library is loaded from: `SDTI_LIBRARY` when set, else the copy
    inside this package."""
    env = os.environ.get("SDTI_LIBRARY")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _capi.library_file_name())


def library() -> _capi.Library:
    """The loaded library (loaded on first use; importing sdti loads nothing)."""
    global _library
    with _library_lock:
        if _library is None:
            path = library_path()
            if not os.path.exists(path):
                raise ImportError(
                    f"sdti's native library is not at {path}: install sdti from a wheel "
                    "(pip install sdti, or build one with pip wheel ./python), or point "
                    "SDTI_LIBRARY at a libsdti built with cargo"
                )
            _library = _capi.Library(path)
        return _library


def version() -> str:
    """The native library's version (the crate's, e.g. "0.1.0")."""
    return library().version()


def abi_version() -> Tuple[int, int]:
    """(major, minor) of the native library's C ABI."""
    return library().abi()


def has_feature(feature_id: str) -> bool:
    """Whether the library has a capability such as "sdti.cuda/1" or "sdti.model.sdxl/1"."""
    return library().has_feature(feature_id)


def _status(code: int) -> Union[Status, int]:
    try:
        return Status(code)
    except ValueError:  # a newer library's code
        return code


def _raise(lib: _capi.Library, code: int, what: str) -> None:
    if code != _capi.SDTI_OK:
        error = lib.error(code, what)
        error.status = _status(code)
        raise error


def _path(path: PathLike) -> bytes:
    return os.fsencode(os.fspath(path))


def _text(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value.encode("utf-8")


def _choice(table: Mapping[str, int], value: str, what: str) -> int:
    try:
        return table[str(value).lower()]
    except KeyError:
        raise ValueError(f"{what}: {value!r} is not one of {', '.join(table)}") from None


def _device(device: str) -> bytes:
    """"auto" is the build's GPU backend ("cuda" in CUDA builds, "metal" in Metal builds),
    else "cpu", as the ComfyUI pack's "auto"; any other name goes to the library as is."""
    if device == "auto":
        lib = library()
        device = "cuda" if lib.has_feature("sdti.cuda/1") else "metal" if lib.has_feature("sdti.metal/1") else "cpu"
    return _text(device, "device")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency of the package
        raise ImportError("sdti needs numpy for arrays: pip install numpy") from None
    return numpy


# ---------------------------------------------------------------- embedding files

def inspect(path: PathLike) -> dict:
    """Describes an embedding file (any format sdti reads): `name`, `step`, `vectors`,
    `widths`, `family`, `source_format`, `checksum`, `parts` with per-vector norms, ...
    (sdti_embedding_inspect)."""
    lib = library()
    try:
        return lib.inspect(path)
    except Error as e:
        e.status = _status(e.status)
        raise


def convert(
    src: PathLike,
    dst: PathLike,
    format: str = "auto",
    precision: str = "f32",
    overwrite: bool = False,
) -> str:
    """Rewrites the embedding `src` as `dst` in `format` ("auto" picks it from dst's
    extension; any name `inspect` gives as `source_format`, e.g. "a1111-pt",
    "safetensors", "diffusers", "sdxl", "diffusers-sdxl") at `precision` ("f32" or "f16").
    Refuses to replace an existing `dst` unless `overwrite`. Returns `dst`."""
    lib = library()
    code = _format(lib, format)
    prec = _choice({"f32": _capi.SDTI_PRECISION_F32, "f16": _capi.SDTI_PRECISION_F16}, precision, "precision")
    flags = _capi.SDTI_WRITE_OVERWRITE if overwrite else 0
    status = lib.embedding_convert_ex(_path(src), _path(dst), code, prec, flags)
    _raise(lib, status, f"convert {os.fspath(src)} to {os.fspath(dst)}")
    return os.fspath(dst)


def check_name(name: str) -> None:
    """Raises sdti.Error (INVALID_ARGUMENT, saying why) unless `name` can name a learned
    word and the file it is written to (one token, never a path)."""
    lib = library()
    _raise(lib, lib._lib.sdti_name_check(_text(name, "name")), f"name {name!r}")


def _format(lib: _capi.Library, format: Union[str, int]) -> int:
    if isinstance(format, int):
        return format
    try:
        return lib.format_code(format)
    except Error as e:
        e.status = _status(e.status)
        raise


# ---------------------------------------------------------------- images

def _image_pixels(image: Any) -> Tuple[bytes, int, int, int]:
    """A PIL image or a numpy array as (bytes, width, height, SDTI_PIXEL_*)."""
    if hasattr(image, "mode") and hasattr(image, "tobytes") and hasattr(image, "size"):  # PIL
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        width, height = image.size
        kind = _capi.SDTI_PIXEL_RGBA8 if image.mode == "RGBA" else _capi.SDTI_PIXEL_RGB8
        return image.tobytes(), width, height, kind
    np = _numpy()
    if hasattr(image, "cpu") and hasattr(image, "numpy"):  # a torch tensor
        image = image.cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"an image array must be [height, width, 3 or 4], got shape {list(array.shape)}"
        )
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        # Floats are 0..1, as ComfyUI's IMAGE and torchvision's tensors hold them.
        if not np.all(np.isfinite(array)):
            raise ValueError("an image array of floats holds NaN or infinity")
        pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"an image array must be uint8 (0..255) or float (0..1), not {array.dtype}")
    pixels = np.ascontiguousarray(pixels)
    height, width, channels = pixels.shape
    kind = _capi.SDTI_PIXEL_RGBA8 if channels == 4 else _capi.SDTI_PIXEL_RGB8
    return pixels.tobytes(), width, height, kind


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class Progress:
    """Where a run stands: after a step (the progress callback) or after `train`."""

    step: int
    """Optimizer steps of the run so far."""
    total_steps: int
    """The step the run ends at."""
    steps_done: int
    """Steps the running (or returning) `train` call did."""
    loss: float
    """The last step's mean denoising loss."""
    learning_rate: float
    """The last step's learning rate."""
    seconds: float
    """Seconds of the last step (callback) or of all steps of the call (`train`)."""
    cancelled: bool = False
    """`train` stopped early (`Trainer.cancel` or the callback returned True)."""

    @classmethod
    def _from(cls, s: Any, cancelled: bool = False) -> "Progress":
        return cls(int(s.step), int(s.total_steps), int(s.steps_done), float(s.loss),
                   float(s.learning_rate), float(s.seconds), cancelled)


ProgressCallback = Callable[[Progress], Optional[bool]]


def _catch_sigint(on_interrupt: Callable[[], Any]) -> Callable[[], None]:
    """While a step runs, Ctrl-C cancels it instead of raising wherever Python code runs
    next (that is inside the progress callback, between steps, where an exception could
    not unwind through ctypes): the handler asks the library to stop after the step in
    flight and `train` raises KeyboardInterrupt once the step call returned, the steps
    done kept. Only Python's default handler is replaced, and only on the main thread
    (where Python runs signal handlers); returns what puts it back."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return lambda: None
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: on_interrupt())
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    return restore


def _trainer_callback(ref: "weakref.ref[Trainer]") -> Any:
    """The C progress callback of one trainer. It holds the trainer weakly (the trainer
    holds it), calls the Python callback of the running `train`, and turns anything the
    callback raises, KeyboardInterrupt included (Ctrl-C is noticed here, when Python code
    runs between steps), into a cancel: an exception must not unwind through ctypes; it is
    raised again once the step call returned."""

    def on_progress(_user_data: Any, progress: Any) -> int:
        trainer = ref()
        if trainer is None:
            return 1
        try:
            callback = trainer._callback
            if callback is not None and callback(Progress._from(progress.contents)) is True:
                return 1
            return 0
        except BaseException as e:  # noqa: BLE001 - kept, raised after the step returns
            trainer._raised.append(e)
            return 1

    return _capi.PROGRESS_FN(on_progress)


_H = TypeVar("_H", bound="_Handle")


class _Handle:
    """What the Trainer and the Encoder share: an opaque handle of the library, released by
    `close()` (or leaving a `with` block, or garbage collection), refused once closed."""

    _FREE = ""  # the name of the library's `_free` function for this handle

    _lib: _capi.Library
    _handle: Optional[ctypes.c_void_p]

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            getattr(self._lib, self._FREE)(handle)

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone
            pass

    def _h(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError(f"this sdti.{type(self).__name__} is closed")
        return self._handle

    def _u32(self, fn: Any, what: str) -> int:
        value = ctypes.c_uint32()
        _raise(self._lib, fn(self._h(), ctypes.byref(value)), what)
        return value.value


class Trainer(_Handle):
    """One Textual Inversion run: a word learned on a model (sdti_trainer_*).

    `model` is a diffusers folder or a single-file .safetensors checkpoint of SD 1.x,
    SD 2.x or SDXL; `token` the word (one name, no spaces or path characters); `init` the
    text whose token vectors start it; `vectors` per token; `device` "auto" (the build's
    GPU backend, else the CPU), "cpu", "cuda", "cuda:N" or "metal"; `precision` "auto" (bf16 on CUDA, f32 elsewhere), "f32", "f16"
    or "bf16"; `resolution` 0 for the model's own. `prediction_type` ("model",
    "epsilon" or "v_prediction") and `zero_terminal_snr` ("model", "off" or "on") override
    what the model's files say (a v-prediction SDXL fine-tune without a `v_pred` key);
    `clip_skip` 0 is the model family's layer; `random_crop` picks one random crop per
    picture instead of the center. The other options are those of the C params
    (sdti_trainer_params). Use it in a `with` block, or call `close()`.
    """

    _FREE = "trainer_free"

    def __init__(
        self,
        model: PathLike,
        *,
        token: str,
        init: str = "*",
        vectors: int = 1,
        device: str = "auto",
        precision: str = "auto",
        resolution: int = 0,
        learning_rate: Union[str, float] = "0.005",
        batch_size: int = 1,
        gradient_accumulation: int = 1,
        seed: int = 0,
        templates: str = "object",
        max_steps: int = 3000,
        output_dir: Optional[PathLike] = None,
        save_every: int = 0,
        resume: Optional[PathLike] = None,
        recompute: str = "auto",
        memory_budget_mib: int = 0,
        prediction_type: str = "model",
        zero_terminal_snr: str = "model",
        clip_skip: int = 0,
        random_crop: bool = False,
    ) -> None:
        self._handle: Optional[ctypes.c_void_p] = None
        self._callback: Optional[ProgressCallback] = None
        self._raised: List[BaseException] = []
        lib = library()
        self._lib = lib
        params = _capi.TrainerParams()
        _raise(lib, lib.trainer_params_init(ctypes.byref(params)), "sdti_trainer_params_init")
        keep = []  # the bytes the params point to, alive until sdti_trainer_new returns

        def c_str(value: Any, what: str) -> bytes:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            raw = _text(str(value) if number else value, what)
            keep.append(raw)
            return raw

        def c_path(value: PathLike) -> bytes:
            raw = _path(value)
            keep.append(raw)
            return raw

        params.model_path = c_path(model)
        device_raw = _device(device)
        keep.append(device_raw)
        params.device = device_raw
        params.precision = _choice(_PRECISIONS, precision, "precision")
        params.token = c_str(token, "token")
        params.init_text = c_str(init, "init")
        params.vectors = int(vectors)
        params.resolution = int(resolution)
        params.learning_rate = c_str(learning_rate, "learning_rate")
        params.batch_size = int(batch_size)
        params.gradient_accumulation = int(gradient_accumulation)
        params.seed = int(seed)
        params.templates = c_str(os.fspath(templates), "templates")
        params.max_steps = int(max_steps)
        if output_dir is not None:
            params.output_dir = c_path(output_dir)
        params.save_every = int(save_every)
        if resume is not None:
            params.resume_checkpoint = c_path(resume)
        params.recompute = _choice(_RECOMPUTE, recompute, "recompute")
        params.memory_budget_mib = int(memory_budget_mib)
        # Revision 3 of the params (ABI 1.5): an older library reads none of it, so a
        # setting other than the default is refused there rather than dropped.
        newer = {
            "prediction_type": _choice(_PREDICTIONS, prediction_type, "prediction_type"),
            "zero_terminal_snr": _choice(_ZERO_SNR, zero_terminal_snr, "zero_terminal_snr"),
            "clip_skip": int(clip_skip),
            "random_crop": 1 if random_crop else 0,
        }
        for field, value in newer.items():
            if params.struct_size >= getattr(_capi.TrainerParams, field).offset + 4:
                setattr(params, field, value)
            elif value != 0:
                raise Error(Status.UNSUPPORTED, "sdti_trainer_new",
                            f"{lib.path} (C ABI {'.'.join(map(str, lib.abi()))}) has no "
                            f"{field} setting; it came with C ABI 1.5")
        # One C callback for the trainer's life (the library keeps the pointer).
        self._c_callback = _trainer_callback(weakref.ref(self))
        params.progress = self._c_callback
        handle = ctypes.c_void_p()
        _raise(lib, lib.trainer_new(ctypes.byref(params), ctypes.byref(handle)), "sdti_trainer_new")
        self._handle = handle
        self.token = token

    # -- lifetime

    def close(self) -> None:
        """Releases the run (sdti_trainer_free). Encoders made from it stay valid."""
        super().close()

    # -- the model and the run

    @property
    def family(self) -> str:
        """"sd1", "sd2" or "sdxl"."""
        code = self._u32(self._lib.trainer_family, "sdti_trainer_family")
        return _FAMILIES.get(code, f"family-{code}")

    @property
    def resolution(self) -> int:
        """The resolution the run trains at, in pixels."""
        return self._u32(self._lib.trainer_resolution, "sdti_trainer_resolution")

    @property
    def recompute(self) -> bool:
        """Whether the steps recompute the UNet's activations (what "auto" chose; True
        also when it reruns only some of the UNet's transformers)."""
        code = self._u32(self._lib.trainer_recompute, "sdti_trainer_recompute")
        return code == _capi.SDTI_RECOMPUTE_ON

    @property
    def prediction(self) -> Tuple[str, bool]:
        """What the run's UNet predicts ("epsilon" or "v_prediction") and whether its noise
        schedule is rescaled to zero terminal SNR: the `prediction_type` and
        `zero_terminal_snr` given, else what the model's files say (C ABI 1.5)."""
        prediction, zero_snr = ctypes.c_uint32(), ctypes.c_uint32()
        status = self._lib.trainer_prediction(self._h(), ctypes.byref(prediction), ctypes.byref(zero_snr))
        _raise(self._lib, status, "sdti_trainer_prediction")
        name = _PREDICTION_NAMES.get(prediction.value, str(prediction.value))
        return name, zero_snr.value == _capi.SDTI_ZERO_SNR_ON

    @property
    def notes(self) -> List[str]:
        """What loading the model decided from clues rather than a config, a line each."""
        text = self._lib.text(self._lib._lib.sdti_trainer_notes, self._h(), "sdti_trainer_notes")
        return [line for line in text.split("\n") if line]

    @property
    def image_count(self) -> int:
        return self._u32(self._lib.trainer_image_count, "sdti_trainer_image_count")

    def add_image(self, image: Any, caption: Optional[str] = None) -> None:
        """Adds a training image: a path (PNG, JPEG or WebP, decoded by the library; a .txt
        beside it is its caption), a PIL image, or a numpy array [height, width, 3 or 4]
        of uint8 (0..255) or floats (0..1). `caption` fills A1111's [filewords] (for
        pixels; a file's caption is its .txt)."""
        lib = self._lib
        if isinstance(image, (str, bytes, os.PathLike)):
            if caption is not None:
                raise ValueError(
                    "add_image: a caption goes with pixels; for a file put it into a .txt "
                    "of the same name beside the image"
                )
            path = os.fsencode(image)
            status = lib.trainer_add_image_file(self._h(), path)
            _raise(lib, status, f"add_image {os.fsdecode(path)}")
            return
        data, width, height, kind = _image_pixels(image)
        raw_caption = None if caption is None else _text(caption, "caption")
        status = lib.trainer_add_image(self._h(), data, width, height, 0, kind, raw_caption)
        _raise(lib, status, "add_image")

    def train(self, steps: Optional[int] = None, progress: Optional[ProgressCallback] = None) -> Progress:
        """Runs up to `steps` optimizer steps (None: to the run's max_steps) and returns
        where the run stands. `progress(p)` is called after each step with a `Progress`;
        returning True from it stops the run, as `cancel()` from another thread does
        (the result's `cancelled` is then True; the steps done are kept). An exception in
        the callback stops the run and is raised here; so is KeyboardInterrupt: Ctrl-C
        stops after the step in flight and the trainer stays usable."""
        lib = self._lib
        count = 0xFFFFFFFF if steps is None else int(steps)
        if not 0 <= count <= 0xFFFFFFFF:
            raise ValueError(f"train: steps {steps} is out of range")
        stats = _capi.StepStats()
        stats.struct_size = ctypes.sizeof(stats)
        self._callback, self._raised = progress, []
        handle = self._h()
        interrupted: List[bool] = []

        def on_interrupt() -> None:
            interrupted.append(True)
            lib.trainer_cancel(handle)

        restore = _catch_sigint(on_interrupt)
        try:
            status = lib.trainer_step(handle, count, ctypes.byref(stats))
        finally:
            self._callback = None
            restore()
        if self._raised:
            raise self._raised[0]
        if interrupted:
            raise KeyboardInterrupt
        if status == _capi.SDTI_CANCELLED:
            return Progress._from(stats, cancelled=True)
        _raise(lib, status, "train")
        return Progress._from(stats)

    def cancel(self) -> None:
        """Stops a running `train` after the micro-batch in flight (from any thread)."""
        handle = self._handle
        if handle is not None:
            self._lib.trainer_cancel(handle)

    def export(self, path: PathLike, format: str = "auto", overwrite: bool = False) -> str:
        """Writes the learned word to `path` ("auto" picks the format from the extension:
        .safetensors, .pt, .bin, .png; an SDXL word as clip_l + clip_g). Refuses to replace
        an existing file unless `overwrite`. Returns `path`."""
        lib = self._lib
        flags = _capi.SDTI_WRITE_OVERWRITE if overwrite else 0
        status = lib.trainer_export_ex(self._h(), _path(path), _format(lib, format), flags)
        _raise(lib, status, f"export {os.fspath(path)}")
        return os.fspath(path)

    def save_checkpoint(self, path: PathLike) -> str:
        """Writes a checkpoint to resume the run from (`Trainer(..., resume=path)`)."""
        status = self._lib.trainer_save_checkpoint(self._h(), _path(path))
        _raise(self._lib, status, f"save_checkpoint {os.fspath(path)}")
        return os.fspath(path)

    def vectors(self, part: int = 0) -> "numpy.ndarray":
        """The current vectors of one table as a float32 array [vectors, width]: part 0
        for SD 1.x and 2.x words; SDXL words have clip_l (0) and clip_g (1)."""
        np = _numpy()
        lib = self._lib
        needed, rows, dim = ctypes.c_size_t(), ctypes.c_uint32(), ctypes.c_uint32()
        status = lib.trainer_get_part_vectors(
            self._h(), int(part), None, 0, ctypes.byref(needed), ctypes.byref(rows), ctypes.byref(dim))
        if status != _capi.SDTI_ERR_BUFFER_TOO_SMALL:
            _raise(lib, status, "vectors")
        out = np.empty((rows.value, dim.value), dtype=np.float32)
        status = lib.trainer_get_part_vectors(
            self._h(), int(part), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size,
            ctypes.byref(needed), ctypes.byref(rows), ctypes.byref(dim))
        _raise(lib, status, "vectors")
        return out

    def preview(
        self,
        prompt: Optional[str] = None,
        *,
        seed: int = 0,
        steps: int = 0,
        size: int = 0,
        pil: bool = False,
    ) -> Any:
        """Draws the word as the run has learned it so far (sdti_trainer_preview, C ABI
        1.5): `prompt` (None: "a photo of {}"; "{}" and the token both stand for the word)
        from the noise of `seed`, `steps` DDIM steps (0: 20, as `sdti train`'s previews)
        with guidance 7.5, a square of `size` pixels (0: the run's resolution), with the
        run's clip skip, prediction type and noise schedule. Returns a uint8 array
        [height, width, 3], or a PIL image with `pil=True`. The same arguments on the same
        word give the same picture, and drawing changes nothing in the run. It may be
        called from the `train` progress callback, to watch the word as it trains."""
        if prompt is not None:
            _text(prompt, "prompt")  # a str, else TypeError
        try:
            data, width, height = self._lib.preview_rgb(self._h(), prompt, seed, steps, size)
        except Error as e:
            e.status = _status(e.status)
            raise
        if pil:
            from PIL import Image

            return Image.frombytes("RGB", (width, height), data)
        np = _numpy()
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()

    def encoder(self) -> "Encoder":
        """A prompt encoder on this run's text encoder(s), with the word registered under
        its token as it is now (`Encoder.register_trainer` refreshes it)."""
        handle = ctypes.c_void_p()
        status = self._lib.encoder_new_from_trainer(self._h(), ctypes.byref(handle))
        _raise(self._lib, status, "sdti_encoder_new_from_trainer")
        return Encoder._wrap(self._lib, handle)


# ---------------------------------------------------------------- prompt encoding


@dataclass(frozen=True)
class Tokens:
    """A tokenized prompt, in 77-slot chunks: per slot the vocabulary id, the registered
    word's index in registration order (or -1) and which of its vectors (or -1)."""

    ids: List[int]
    words: List[int]
    vector_index: List[int]


class Encoder(_Handle):
    """Encodes prompts into the conditioning a UNet takes, with learned words (in any of
    the spellings `word`, `embedding:word`, `<word>`) injected (sdti_encoder_*). Loads only
    the model's text encoder(s)."""

    _FREE = "encoder_free"

    def __init__(self, model: PathLike, *, device: str = "auto", precision: str = "auto") -> None:
        self._handle: Optional[ctypes.c_void_p] = None
        lib = library()
        self._lib = lib
        params = _capi.ModelParams()
        _raise(lib, lib.model_params_init(ctypes.byref(params)), "sdti_model_params_init")
        model_path, device_raw = _path(model), _device(device)
        params.model_path = model_path
        params.device = device_raw
        params.precision = _choice(_PRECISIONS, precision, "precision")
        handle = ctypes.c_void_p()
        _raise(lib, lib.encoder_new(ctypes.byref(params), ctypes.byref(handle)), "sdti_encoder_new")
        self._handle = handle

    @classmethod
    def _wrap(cls, lib: _capi.Library, handle: ctypes.c_void_p) -> "Encoder":
        encoder = cls.__new__(cls)
        encoder._lib, encoder._handle = lib, handle
        return encoder


    # -- the model

    @property
    def dim(self) -> int:
        """The context's width (SDXL: 768 + 1280)."""
        return self._u32(self._lib.encoder_dim, "sdti_encoder_dim")

    @property
    def family(self) -> str:
        code = self._u32(self._lib.encoder_family, "sdti_encoder_family")
        return _FAMILIES.get(code, f"family-{code}")

    @property
    def pooled_dim(self) -> int:
        """The pooled vector's width: 1280 for SDXL, 0 for SD 1.x and 2.x."""
        return self._u32(self._lib.encoder_pooled_dim, "sdti_encoder_pooled_dim")

    @property
    def part_dims(self) -> List[int]:
        """The width of each text encoder's word vectors: [768], [1024] or [768, 1280]."""
        dims = (ctypes.c_uint32 * 8)()
        count = ctypes.c_size_t()
        status = self._lib.encoder_part_dims(self._h(), dims, len(dims), ctypes.byref(count))
        _raise(self._lib, status, "sdti_encoder_part_dims")
        return list(dims[: count.value])

    @property
    def clip_skip(self) -> int:
        """The text layer prompts are encoded from, counted from the end (1 = the last)."""
        return self._u32(self._lib.encoder_clip_skip, "sdti_encoder_clip_skip")

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        _raise(self._lib, self._lib.encoder_set_clip_skip(self._h(), int(value)), "clip_skip")

    def set_clip_layer(self, layer: int) -> None:
        """ComfyUI's CLIP Set Last Layer (-1 the last, -2 the penultimate), A1111's clip
        skip when positive, 0 for the model family's default."""
        _raise(self._lib, self._lib.encoder_set_clip_layer(self._h(), int(layer)), "set_clip_layer")

    def set_chunk_style(self, style: str) -> None:
        """How long prompts are chunked: "a1111" (the default) or "comfyui"."""
        code = _choice(_CHUNK_STYLES, style, "chunk style")
        _raise(self._lib, self._lib.encoder_set_chunk_style(self._h(), code), "set_chunk_style")

    def set_prompt_weights(self, enabled: bool) -> None:
        """Whether prompts are read with weights as the chunk style's host reads them
        (True, the default: A1111's `(word)`, `(word:1.3)`, `[word]`, `BREAK`, or
        ComfyUI's `(word:1.3)`), or as plain text (C ABI 1.5)."""
        status = self._lib.encoder_set_prompt_weights(self._h(), 1 if enabled else 0)
        _raise(self._lib, status, "set_prompt_weights")

    def token_weights(self, prompt: str) -> List[float]:
        """The prompt weight of each slot `tokenize` gives (1.0 where none applies),
        C ABI 1.5."""
        lib, raw = self._lib, _text(prompt, "prompt")
        needed = ctypes.c_size_t()
        status = lib.encoder_token_weights(self._h(), raw, None, 0, ctypes.byref(needed))
        if status != _capi.SDTI_ERR_BUFFER_TOO_SMALL:
            _raise(lib, status, "token_weights")
        out = (ctypes.c_float * max(needed.value, 1))()
        status = lib.encoder_token_weights(self._h(), raw, out, needed.value, ctypes.byref(needed))
        _raise(lib, status, "token_weights")
        return [float(v) for v in out[: needed.value]]

    # -- words

    def register_file(self, path: PathLike, token: Optional[str] = None) -> None:
        """Registers the word of an embedding file (any format sdti reads) as `token`, or
        as the file's stem."""
        raw_token = None if token is None else _text(token, "token")
        status = self._lib.encoder_register_token(self._h(), raw_token, _path(path))
        _raise(self._lib, status, f"register {os.fspath(path)}")

    def register_vectors(self, token: str, vectors: Any) -> None:
        """Registers `token` with vectors: an array [n, width] for SD 1.x and 2.x, or for
        SDXL a pair (clip_l [n, 768], clip_g [n, 1280]) or a mapping with those keys."""
        np = _numpy()
        lib, raw = self._lib, _text(token, "token")
        if isinstance(vectors, Mapping):
            vectors = (vectors["clip_l"], vectors["clip_g"])
        if isinstance(vectors, (tuple, list)) and len(vectors) == 2 and not np.isscalar(vectors[0]) \
                and np.asarray(vectors[0]).ndim == 2:
            parts = [np.ascontiguousarray(v, dtype=np.float32) for v in vectors]
            ptr = ctypes.POINTER(ctypes.c_float)
            status = lib.encoder_register_vectors_sdxl(
                self._h(), raw,
                parts[0].ctypes.data_as(ptr), parts[0].shape[0], parts[0].shape[1],
                parts[1].ctypes.data_as(ptr), parts[1].shape[0], parts[1].shape[1])
            _raise(lib, status, f"register_vectors {token!r}")
            return
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(f"register_vectors: vectors must be [n, width], got {list(array.shape)}")
        status = lib.encoder_register_vectors(
            self._h(), raw, array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            array.shape[0], array.shape[1])
        _raise(lib, status, f"register_vectors {token!r}")

    def register_trainer(self, trainer: Trainer) -> None:
        """(Re)registers a trainer's word as it is now."""
        status = self._lib.encoder_register_trainer(self._h(), trainer._h())
        _raise(self._lib, status, "register_trainer")

    # -- prompts

    def tokenize(self, prompt: str) -> Tokens:
        lib, raw = self._lib, _text(prompt, "prompt")
        needed = ctypes.c_size_t()
        status = lib.encoder_tokenize(self._h(), raw, None, None, None, 0, ctypes.byref(needed))
        if status != _capi.SDTI_ERR_BUFFER_TOO_SMALL:
            _raise(lib, status, "tokenize")
        n = needed.value
        ids, words, index = (ctypes.c_uint32 * n)(), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
        status = lib.encoder_tokenize(self._h(), raw, ids, words, index, n, ctypes.byref(needed))
        _raise(lib, status, "tokenize")
        return Tokens(list(ids), list(words), list(index))

    def encode(self, prompt: str) -> "numpy.ndarray":
        """The prompt's conditioning, float32 [chunks * 77, dim]."""
        return self._encode(prompt, pooled=False)[0]

    def encode_pooled(self, prompt: str) -> Tuple["numpy.ndarray", "numpy.ndarray"]:
        """SDXL's (context [chunks * 77, 2048], pooled [1280]), as A1111 and ComfyUI use them."""
        context, pooled = self._encode(prompt, pooled=True)
        assert pooled is not None
        return context, pooled

    def _encode(self, prompt: str, pooled: bool) -> Tuple[Any, Any]:
        np = _numpy()
        lib, raw = self._lib, _text(prompt, "prompt")
        needed, rows = ctypes.c_size_t(), ctypes.c_uint32()
        ptr = ctypes.POINTER(ctypes.c_float)
        status = lib.encoder_encode(self._h(), raw, None, 0, ctypes.byref(needed), ctypes.byref(rows))
        if status != _capi.SDTI_ERR_BUFFER_TOO_SMALL:
            _raise(lib, status, "encode")
        context = np.empty((rows.value, needed.value // max(rows.value, 1)), dtype=np.float32)
        if not pooled:
            status = lib.encoder_encode(self._h(), raw, context.ctypes.data_as(ptr), context.size,
                                        ctypes.byref(needed), ctypes.byref(rows))
            _raise(lib, status, "encode")
            return context, None
        width = self.pooled_dim
        if width == 0:
            raise Error(Status.UNSUPPORTED, "encode_pooled",
                        f"this model ({self.family}) has no pooled vector; use encode")
        out = np.empty((width,), dtype=np.float32)
        status = lib.encoder_encode_pooled(self._h(), raw, context.ctypes.data_as(ptr), context.size,
                                           out.ctypes.data_as(ptr), out.size,
                                           ctypes.byref(needed), ctypes.byref(rows))
        _raise(lib, status, "encode_pooled")
        return context, out
