"""The sdti package on the tiny models: its API over the C ABI, with numbers checked
against the reference tensors transformers made (tests/reference/make_tiny_sd.py and
make_tiny_sdxl.py), training, cancelling (Ctrl-C included), files, errors."""

import os
import re
import signal
import threading

import numpy as np
import pytest

import sdti
from sdti import _capi

from conftest import FIXTURES, REPO, TINY_SD, TINY_SDXL, picture, relative_error


def trainer(**over):
    args = dict(token="pyword", init="toy", vectors=2, resolution=64, seed=1, max_steps=50)
    args.update(over)
    return sdti.Trainer(TINY_SD, **args)


def with_images(t, count=2):
    for k in range(count):
        t.add_image(picture(k))
    return t


# ---------------------------------------------------------------- the package and its library


def test_the_package_holds_its_library_and_the_crates_version():
    if "SDTI_LIBRARY" not in os.environ:
        assert os.path.dirname(sdti.library_path()) == os.path.dirname(os.path.abspath(sdti.__file__))
    assert os.path.isfile(sdti.library_path())
    with open(os.path.join(REPO, "Cargo.toml"), encoding="utf-8") as f:
        crate = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert sdti.version() == crate
    assert sdti.__version__ == crate  # the wheel's version is the crate's (setup.py)
    major, minor = sdti.abi_version()
    assert major == _capi.ABI_MAJOR and minor >= _capi.ABI_MINOR_NEEDED
    assert sdti.has_feature("sdti.train/1") and not sdti.has_feature("sdti.train/99")
    # Type information ships with it (PEP 561).
    assert os.path.isfile(os.path.join(os.path.dirname(sdti.__file__), "py.typed"))


def test_the_ctypes_layer_declares_the_header():
    """Every function, struct field and constant of include/sdti.h is declared in
    sdti/_capi.py, with the header's values: the one ctypes declaration of the ABI (the
    ComfyUI pack loads it too). The layer may know a newer minor than the header (a
    function in NEWER_SIGNATURES, fields at a struct's end), never less."""
    with open(os.path.join(REPO, "include", "sdti.h"), encoding="utf-8") as f:
        header = f.read()
    defines = dict(re.findall(r"^#define (SDTI_[A-Z0-9_]+) (\d+)$", header, re.M))
    header_minor = int(defines["SDTI_ABI_MINOR"])
    assert int(defines["SDTI_ABI_MAJOR"]) == _capi.ABI_MAJOR
    assert header_minor >= _capi.ABI_MINOR_NEEDED
    functions = set(re.findall(r"^[a-z_ *0-9]+?\b(sdti_[a-z0-9_]+)\(", header, re.M))
    newer = {name for name, spec in _capi.NEWER_SIGNATURES.items() if spec[0] > header_minor}
    declared = set(_capi.SIGNATURES) | set(_capi.NEWER_SIGNATURES)
    assert functions and functions == declared - newer, functions ^ (declared - newer)
    # The structs, field by field, in order: the header's are the layer's or its start.
    for struct, ctype in (("sdti_trainer_params", _capi.TrainerParams), ("sdti_model_params", _capi.ModelParams),
                          ("sdti_progress", _capi.Progress), ("sdti_step_stats", _capi.StepStats)):
        body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (struct, struct), header, re.S).group(1)
        fields = [re.search(r"(\w+);$", line.strip()).group(1) for line in body.split("\n")
                  if line.strip() and not line.strip().startswith("//")]
        names = [f[0] for f in ctype._fields_]
        assert names[: len(fields)] == fields, (struct, fields)
        if header_minor >= 5:
            assert names == fields, (struct, fields)
    checked = 0
    for name in dir(_capi):
        if name.startswith("SDTI_") and (name in defines or header_minor >= 5):
            assert int(defines[name]) == getattr(_capi, name), name
            checked += 1
    assert checked >= 30, checked
    for name, value in defines.items():  # and the other way: every status at least
        if name.startswith("SDTI_ERR_"):
            assert getattr(_capi, name) == int(value), name
    assert {s.name for s in sdti.Status} >= {n.replace("SDTI_ERR_", "") for n in defines if n.startswith("SDTI_ERR_")}


# ---------------------------------------------------------------- prompt encoding


def test_encoder_matches_transformers(sd_reference, sd_case):
    with sdti.Encoder(TINY_SD, device="cpu") as encoder:
        assert (encoder.family, encoder.dim, encoder.pooled_dim, encoder.part_dims) == ("sd1", 32, 0, [32])
        assert encoder.clip_skip == 1
        prompt = sd_case["prompt"]  # "a photo of a sks toy"
        tokens = encoder.tokenize(prompt)
        assert tokens.ids == sd_case["raw_ids"]
        assert set(tokens.words) == {-1}
        plain = encoder.encode(prompt)
        assert plain.dtype == np.float32 and plain.shape == (77, 32)
        assert relative_error(plain, sd_reference["te.plain_last_hidden_state"]) <= 1e-5
        # The learned word, injected: transformers with the two rows added.
        encoder.register_vectors("sks", sd_reference["te.vectors"])
        tokens = encoder.tokenize(prompt)
        assert tokens.words[4:8] == [-1, 0, 0, -1] and tokens.vector_index[4:8] == [-1, 0, 1, -1]
        for spelling in (prompt, "a photo of a embedding:sks toy", "a photo of a <sks> toy"):
            assert relative_error(encoder.encode(spelling), sd_reference["te.last_hidden_state"]) <= 1e-5
        # A1111's clip skip 2.
        encoder.clip_skip = 2
        encoder.register_vectors("sks", sd_reference["te.vectors"])
        assert relative_error(encoder.encode(prompt), sd_reference["te.clip_skip2"]) <= 1e-5
        # SD 1.x has no pooled vector: said, not a zero vector.
        with pytest.raises(sdti.Error) as e:
            encoder.encode_pooled(prompt)
        assert e.value.status == sdti.Status.UNSUPPORTED
        # A vector of another width is refused by the library, with its reason.
        with pytest.raises(sdti.Error) as e:
            encoder.register_vectors("wide", np.zeros((1, 768), np.float32))
        assert e.value.status == sdti.Status.INVALID_ARGUMENT and "768" in e.value.message


def test_sdxl_encoder_gives_context_and_pooled(sdxl_reference):
    with sdti.Encoder(TINY_SDXL) as encoder:
        assert (encoder.family, encoder.dim, encoder.pooled_dim, encoder.part_dims) == ("sdxl", 80, 48, [32, 48])
        encoder.register_vectors("sks", {"clip_l": sdxl_reference["te.vectors_l"],
                                         "clip_g": sdxl_reference["te.vectors_g"]})
        context, pooled = encoder.encode_pooled("a photo of a sks toy")
        assert context.shape == (77, 80) and pooled.shape == (48,)
        assert relative_error(context, sdxl_reference["te.context"]) <= 1e-5
        assert relative_error(pooled, sdxl_reference["te2.pooled_eos"]) <= 1e-5
        assert np.array_equal(encoder.encode("a photo of a sks toy"), context)


def test_encoder_registers_files():
    with sdti.Encoder(TINY_SD) as encoder, trainer() as t:
        with_images(t, 1)
        t.train(1)
        path = t.export(os.path.join(_tmp(), "filed.safetensors"))
        encoder.register_file(path)  # named after the file's stem
        assert encoder.tokenize("a filed cat").words[2:4] == [0, 0]
        encoder.register_file(path, token="other")
        assert 1 in encoder.tokenize("an other cat").words
        with pytest.raises(sdti.Error) as e:
            encoder.register_file(os.path.join(FIXTURES, "embeddings", "a1111.safetensors"))
        assert e.value.status == sdti.Status.EMBEDDING and "768" in e.value.message, e.value


# ---------------------------------------------------------------- training


def test_train_takes_paths_pil_images_and_arrays(tmp_path):
    from PIL import Image

    with trainer() as t:
        assert (t.family, t.resolution, t.recompute) == ("sd1", 64, False)
        assert isinstance(t.notes, list) and all(isinstance(n, str) and n for n in t.notes)
        if sdti.abi_version()[1] >= 5:
            assert t.prediction == ("epsilon", False)
        png = tmp_path / "one.png"
        Image.fromarray(picture(0)).save(png)
        t.add_image(png)  # decoded by the library
        t.add_image(str(png))
        t.add_image(Image.fromarray(picture(1)))
        t.add_image(Image.fromarray(picture(1)).convert("RGBA"))
        t.add_image(Image.fromarray(picture(1)).convert("L"))  # converted to RGB first
        t.add_image(picture(2), caption="a toy")
        t.add_image(picture(3).astype(np.float32) / 255.0)  # floats in 0..1
        assert t.image_count == 7
        with pytest.raises(ValueError, match="must be"):
            t.add_image(np.zeros((64, 64), np.uint8))
        with pytest.raises(ValueError, match="caption"):
            t.add_image(png, caption="no")
        with pytest.raises(sdti.Error) as e:
            t.add_image(tmp_path / "missing.png")
        assert e.value.status == sdti.Status.IMAGE and "missing.png" in str(e.value)
        with pytest.raises(sdti.Error) as e:
            t.add_image(np.zeros((1, 1, 3), np.uint8))
        assert e.value.status == sdti.Status.IMAGE

        seen = []
        result = t.train(3, progress=lambda p: seen.append((p.step, p.total_steps, p.steps_done, p.loss)))
        assert [s[:3] for s in seen] == [(1, 50, 1), (2, 50, 2), (3, 50, 3)]
        assert all(np.isfinite(s[3]) and s[3] > 0 for s in seen)
        assert (result.step, result.steps_done, result.cancelled) == (3, 3, False)
        assert result.loss == seen[-1][3]
        vectors = t.vectors()
        assert vectors.shape == (2, 32) and vectors.dtype == np.float32


def test_same_numbers_as_the_pixels_say(tmp_path):
    """A path, a PIL image and an array of the same picture train the same vectors."""
    from PIL import Image

    results = []
    png = tmp_path / "same.png"
    Image.fromarray(picture(4)).save(png)
    for image in (png, Image.fromarray(picture(4)), picture(4), picture(4) / 255.0):
        with trainer() as t:
            t.add_image(image)
            t.train(2)
            results.append(t.vectors())
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_export_checkpoint_and_resume(tmp_path):
    with with_images(trainer()) as t:
        t.train(2)
        checkpoint = t.save_checkpoint(tmp_path / "run.checkpoint.safetensors")
        t.train(2)
        four = t.vectors()
        out = t.export(tmp_path / "pyword.safetensors")
        info = sdti.inspect(out)
        assert (info["vectors"], info["widths"], info["source_format"]) == (2, [32], "safetensors")
        # Never replaced unless asked.
        with pytest.raises(sdti.Error) as e:
            t.export(out)
        assert e.value.status == sdti.Status.EXISTS and str(out) in e.value.message
        t.export(out, overwrite=True)
        t.export(tmp_path / "pyword.pt")
        info = sdti.inspect(tmp_path / "pyword.pt")
        assert (info["source_format"], info["name"], info["step"]) == ("a1111-pt", "pyword", 4)
        t.export(tmp_path / "word.bin", format="diffusers-bin")
        assert sdti.inspect(tmp_path / "word.bin")["source_format"] == "diffusers-bin"
        with pytest.raises(sdti.Error) as e:
            t.export(tmp_path / "x.safetensors", format="no-such-format")
        assert e.value.status == sdti.Status.INVALID_ARGUMENT
    with with_images(trainer(resume=checkpoint)) as t:
        assert t.train(2).step == 4
        assert np.array_equal(t.vectors(), four)


def test_cancel_from_the_callback_and_another_thread():
    with with_images(trainer()) as t:
        result = t.train(10, progress=lambda p: p.step == 2)
        assert (result.cancelled, result.step, result.steps_done) == (True, 2, 2)
        # The run goes on from there.
        assert t.train(1).step == 3
        started = threading.Event()

        def cancel_once_running():
            started.wait()
            t.cancel()

        thread = threading.Thread(target=cancel_once_running)
        thread.start()
        result = t.train(40, progress=lambda p: started.set())
        thread.join()
        assert result.cancelled and 4 <= result.step < 43, result
        # An exception in the callback stops the run and comes out of train.
        with pytest.raises(ZeroDivisionError):
            t.train(5, progress=lambda p: 1 / 0)
        assert t.train(1).steps_done == 1


def test_ctrl_c_stops_after_the_step_and_raises_keyboard_interrupt():
    # Python's own handler, also where the parent left SIGINT ignored (a shell's
    # background job without job control), which Python then keeps.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c_stops_after_the_step()
    finally:
        signal.signal(signal.SIGINT, inherited)


def ctrl_c_stops_after_the_step():
    with with_images(trainer()) as t:
        # Ctrl-C while the callback runs (as when it arrives between steps).
        with pytest.raises(KeyboardInterrupt):
            t.train(10, progress=lambda p: p.step == 1 and signal.raise_signal(signal.SIGINT))
        assert t.train(1).step == 2  # stopped after step 1; the trainer is still usable
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # A real SIGINT from elsewhere while the library computes (no Python callback).
        first = threading.Event()

        def interrupt():
            first.wait()
            os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=interrupt)
        thread.start()
        with pytest.raises(KeyboardInterrupt):
            t.train(40, progress=lambda p: first.set())
        thread.join()
        step = t.train(0).step
        assert 3 <= step < 42, step
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_preview_draws_the_word_as_it_trains():
    """Trainer.preview (sdti_trainer_preview): the word as learned so far, as an array or
    a PIL image, the same for the same seed, drawable from the progress callback."""
    from PIL import Image

    with with_images(trainer(learning_rate=0.1)) as t:
        first = t.preview(seed=1, steps=4)
        assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
        assert first.max() > first.min()
        assert np.array_equal(t.preview(seed=1, steps=4), first)
        assert np.array_equal(t.preview("a photo of {}", seed=1, steps=4), first)
        assert np.array_equal(t.preview("a photo of pyword", seed=1, steps=4), first)
        assert not np.array_equal(t.preview(seed=2, steps=4), first)
        assert t.preview(seed=1, steps=4, size=96).shape == (96, 96, 3)
        image = t.preview(seed=1, steps=4, pil=True)
        assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), first)
        # From the progress callback, between steps: what a preview after the step draws.
        seen = []
        t.train(2, progress=lambda p: seen.append(t.preview(seed=1, steps=4)))
        assert len(seen) == 2 and not np.array_equal(seen[-1], first)
        assert np.array_equal(t.preview(seed=1, steps=4), seen[-1])
        # Bad values: the library's reason, naming the argument; Python's own checks.
        with pytest.raises(sdti.Error) as e:
            t.preview(size=60)
        assert e.value.status == sdti.Status.INVALID_ARGUMENT and "size 60" in e.value.message
        with pytest.raises(sdti.Error) as e:
            t.preview(steps=1001)
        assert "steps 1001" in e.value.message
        with pytest.raises(ValueError, match="seed"):
            t.preview(seed=-1)
        with pytest.raises(TypeError, match="prompt"):
            t.preview(b"a photo")


def test_run_settings_of_abi_1_5():
    """prediction_type, zero_terminal_snr, clip_skip and random_crop reach the run."""
    with trainer(prediction_type="v_prediction", zero_terminal_snr="on", clip_skip=2,
                 random_crop=True) as t:
        assert t.prediction == ("v_prediction", True)
        with t.encoder() as encoder:
            assert encoder.clip_skip == 2
        with_images(t, 1)
        assert t.train(1).step == 1
    with trainer(prediction_type="v") as t:  # short for v_prediction
        assert t.prediction == ("v_prediction", False)
    with pytest.raises(ValueError, match="prediction_type"):
        trainer(prediction_type="x0")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        trainer(zero_terminal_snr="yes")
    with pytest.raises(sdti.Error) as e:
        trainer(clip_skip=9)  # the tiny text encoder has 3 layers
    assert e.value.status == sdti.Status.INVALID_ARGUMENT and "3 layers" in e.value.message


def test_encoder_prompt_weights():
    """The encoder reads prompt weights as the chunk style's host does, or plain text."""
    with sdti.Encoder(TINY_SD) as encoder:
        prompt = "a (photo:1.5) of a toy"
        weights = encoder.token_weights(prompt)
        assert len(weights) == len(encoder.tokenize(prompt).ids)
        assert weights[2] == 1.5 and weights[1] == 1.0, weights[:6]
        weighted = encoder.encode(prompt)
        encoder.set_prompt_weights(False)
        assert set(encoder.token_weights(prompt)) == {1.0}
        assert not np.array_equal(encoder.encode(prompt), weighted)


def test_with_frees_the_handle_and_encoders_outlive_it(sd_reference):
    with with_images(trainer(token="held")) as t:
        t.train(1)
        encoder = t.encoder()
    assert t._handle is None
    with pytest.raises(ValueError, match="closed"):
        t.train(1)
    t.close()  # twice is fine
    with encoder:
        assert encoder.tokenize("a held cat").words[2:4] == [0, 0]
        assert encoder.encode("a held cat").shape == (77, 32)


# ---------------------------------------------------------------- errors and files


def test_errors_carry_status_and_message(tmp_path):
    with pytest.raises(sdti.Error) as e:
        sdti.Trainer(tmp_path / "nowhere", token="x")
    assert e.value.status in (sdti.Status.MODEL, sdti.Status.IO)
    assert "nowhere" in e.value.message and e.value.what == "sdti_trainer_new"
    with pytest.raises(sdti.Error) as e:
        trainer(token="two words")
    assert e.value.status == sdti.Status.INVALID_ARGUMENT and "token" in e.value.message
    with pytest.raises(sdti.Error) as e:
        trainer(precision="bf16")
    assert "bf16 needs a GPU" in e.value.message
    with pytest.raises(ValueError, match="precision"):
        trainer(precision="f8")
    with pytest.raises(sdti.Error) as e:
        trainer(device="tpu")
    assert e.value.status == sdti.Status.DEVICE and "tpu" in e.value.message
    with trainer() as t:
        with pytest.raises(sdti.Error) as e:
            t.train(1)  # no images
        assert e.value.status == sdti.Status.STATE
    with pytest.raises(sdti.Error) as e:
        sdti.check_name("../x")
    assert e.value.status == sdti.Status.INVALID_ARGUMENT
    sdti.check_name("fine-name")


def test_inspect_and_convert(tmp_path):
    src = os.path.join(FIXTURES, "embeddings", "a1111.safetensors")
    info = sdti.inspect(src)
    assert (info["vectors"], info["widths"], info["source_format"]) == (2, [768], "safetensors")
    dst = sdti.convert(src, tmp_path / "out.pt", precision="f16")
    assert sdti.inspect(dst)["source_format"] == "a1111-pt"
    with pytest.raises(sdti.Error) as e:
        sdti.convert(src, dst)
    assert e.value.status == sdti.Status.EXISTS
    sdti.convert(src, dst, format="kohya-pt", overwrite=True)
    assert sdti.inspect(dst)["source_format"] == "kohya-pt"
    with pytest.raises(sdti.Error) as e:
        sdti.inspect(tmp_path / "missing.pt")
    assert e.value.status in (sdti.Status.EMBEDDING, sdti.Status.IO) and "missing.pt" in str(e.value)
    with pytest.raises(ValueError, match="precision"):
        sdti.convert(src, tmp_path / "x.pt", precision="bf16")


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="sdti-py-")
