"""The node pack's access to the sdti library: the ctypes layer and where the library is.

The ctypes declarations of the C ABI (structs, signatures, constants, the Library class)
are not written here: they are the `sdti` Python package's `sdti/_capi.py`, one file
shared by the package and this pack. It is taken from

1. the installed `sdti` package (`pip install -r requirements.txt`: the wheel that holds
   the library too), found through its distribution's files, since ComfyUI registers a
   pack folder named `sdti` under that module name, which hides the package from import;
2. `sdti_capi.py` next to this file (scripts/install-comfyui.sh copies it there);
3. the repository's python/sdti/_capi.py (the pack run from a checkout).

The library itself is looked for in the order `find_library` gives (SDTI_LIBRARY first).
"""

import importlib.util
import os
import sys

PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _package_dir():
    """The installed `sdti` package's folder, or None."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return None
    try:
        dist = metadata.distribution("sdti")
    except metadata.PackageNotFoundError:
        return None
    folder = os.path.abspath(str(dist.locate_file("sdti")))
    return folder if os.path.isfile(os.path.join(folder, "_capi.py")) else None


def _capi_sources():
    package = _package_dir()
    return ([os.path.join(package, "_capi.py")] if package else []) + [
        os.path.join(PACK_DIR, "sdti_capi.py"),
        os.path.normpath(os.path.join(PACK_DIR, "..", "..", "python", "sdti", "_capi.py")),
    ]


def _load_capi():
    for path in _capi_sources():
        if os.path.isfile(path):
            name = "sdti_pack_capi"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # ctypes structs pickle and print by module name
            spec.loader.exec_module(module)
            return module
    raise ImportError(
        "sdti's ctypes layer was not found: install the sdti package (pip install -r "
        f"requirements.txt in {PACK_DIR}), or install the pack with scripts/install-comfyui.sh "
        f"(looked at {', '.join(_capi_sources())})"
    )


_capi = _load_capi()
CAPI_PATH = _capi.__file__

# What the nodes use, under the names they use. The constants are written out so that
# tests/suite/ffi.rs checks them against include/sdti.h as before; the assertion below
# keeps them equal to the shared layer's.
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
# sdti_trainer_params.prediction_type and .zero_terminal_snr, sdti_trainer_prediction (ABI 1.5).
SDTI_PREDICTION_MODEL = 0
SDTI_PREDICTION_EPSILON = 1
SDTI_PREDICTION_V = 2
SDTI_ZERO_SNR_MODEL = 0
SDTI_ZERO_SNR_OFF = 1
SDTI_ZERO_SNR_ON = 2
for _name, _value in list(globals().items()):
    if _name.startswith("SDTI_") or _name == "ABI_MAJOR":
        if getattr(_capi, _name) != _value:
            raise ImportError(f"{CAPI_PATH}: {_name} is {getattr(_capi, _name)}, the pack says {_value}")
# The minor ABI version the pack needs (sdti_trainer_family and friends).
ABI_MINOR_NEEDED = _capi.ABI_MINOR_NEEDED

SdtiError = _capi.Error
SdtiCancelled = _capi.Cancelled
Progress = _capi.Progress
StepStats = _capi.StepStats
PROGRESS_FN = _capi.PROGRESS_FN
TrainerParams = _capi.TrainerParams
Library = _capi.Library


def _library_name():
    return _capi.library_file_name()


def library_candidates(pack_dir):
    """Where the library is looked for, in order: SDTI_LIBRARY; next to the pack (what
    scripts/install-comfyui.sh puts there); the installed sdti package's; the
    repository's target/release and target/debug (a checkout)."""
    env = os.environ.get("SDTI_LIBRARY")
    if env:
        return [env]
    name = _library_name()
    package = _package_dir()
    repo = os.path.normpath(os.path.join(pack_dir, "..", ".."))
    return (
        [os.path.join(pack_dir, name)]
        + ([os.path.join(package, name)] if package else [])
        + [os.path.join(repo, "target", profile, name) for profile in ("release", "debug")]
    )


def find_library(pack_dir):
    """The first of library_candidates that exists (SDTI_LIBRARY is taken as given)."""
    candidates = library_candidates(pack_dir)
    if os.environ.get("SDTI_LIBRARY"):
        return candidates[0]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{_library_name()} not found: pip install -r requirements.txt in {pack_dir} (the "
        "sdti package holds it), set SDTI_LIBRARY, or put it into the pack's folder "
        f"(looked at {', '.join(candidates)})"
    )
