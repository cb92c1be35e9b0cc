"""DICOM as PACS systems write it: every common transfer syntax decodes to the pixels that were
encoded (lossless: exactly; lossy: within the stated tolerance), with DICOM's pixel semantics
(Modality LUT, window, MONOCHROME1, colour, signed, multi-frame), files without a preamble, and
reasons (and notes) that a hospital can act on, shown whole, one line per file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from aseanfl.cli import app
from medimaging import dicomgen
from medimaging.config import DicomConfig
from medimaging.pixels import read_pixels

RAW = DicomConfig(window="none")
# lossy codecs: the largest and the mean absolute error allowed, as a share of the stored range
TOLERANCE = {"jpeg-baseline": (0.08, 0.02), "jpeg-extended": (0.01, 0.002), "jpeg-ls-near": (None, None),
             "j2k": (0.01, 0.002), "htj2k": (0.001, 0.001)}


@pytest.mark.parametrize("syntax", list(dicomgen.SYNTAXES))
def test_each_transfer_syntax_decodes_to_the_encoded_pixels(syntax, tmp_path):
    pixels = dicomgen.test_pattern()
    if syntax in dicomgen.EIGHT_BIT:
        pixels = (pixels // 16).astype(np.uint8)
    path = dicomgen.write(tmp_path / "IM0001", pixels, syntax)  # PACS style: no suffix
    uid, lossless = dicomgen.SYNTAXES[syntax]
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid  # the file really is in that syntax
    assert pixels.std() > 100 if pixels.dtype == np.uint16 else pixels.std() > 5  # not a blank image
    notes: list[str] = []
    got, spacing = read_pixels(path, 2, RAW, notes)
    error = np.abs(got - pixels.astype(np.float32))
    top = 255 if pixels.dtype == np.uint8 else 4095
    if lossless:
        assert error.max() == 0, syntax
    elif syntax == "jpeg-ls-near":
        assert 0 < error.max() <= dicomgen.NEAR_LOSSLESS_ERROR
    else:
        worst, mean = TOLERANCE[syntax]
        assert 0 < error.max() <= worst * top and error.mean() <= mean * top, (error.max(), error.mean())
    assert spacing == (0.7, 0.7) and notes == []


def test_colour_rgb_planar_ybr_and_jpeg_colour_become_luminance(tmp_path):
    rgb = np.stack([dicomgen.test_pattern(seed=s) // 16 for s in (1, 2, 3)], -1).astype(np.uint8)
    luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    from pydicom.pixels import convert_color_space

    cases = {"rgb": dicomgen.write(tmp_path / "rgb.dcm", rgb, modality="US"),
             "rgb-planar": dicomgen.write(tmp_path / "planar.dcm", rgb, modality="US", planar=1),
             "ybr-full": dicomgen.write(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"),
                                        modality="US", photometric="YBR_FULL"),
             "jpeg-ybr-422": dicomgen.write(tmp_path / "jpeg.dcm", rgb, "jpeg-baseline", modality="US"),
             "rle-rgb": dicomgen.write(tmp_path / "rle.dcm", rgb, "rle", modality="US")}
    assert pydicom.dcmread(cases["jpeg-ybr-422"]).PhotometricInterpretation == "YBR_FULL_422"
    for name, path in cases.items():
        got, _ = read_pixels(path, 2)
        error = np.abs(got - luminance)
        assert got.shape == luminance.shape and error.mean() < (3 if name == "jpeg-ybr-422" else 1), (name, error.mean())


def test_ct_hounsfield_rescale_and_window(tmp_path):
    hu = np.round(np.linspace(-1000, 1000, 64 * 48)).reshape(64, 48)
    path = dicomgen.write(tmp_path / "ct.dcm", (hu + 1024).astype(np.uint16), modality="CT", rescale=(1, -1024),
                          window=(40, 400))
    raw, _ = read_pixels(path, 2, RAW)
    assert np.array_equal(raw, hu)  # the Modality LUT gives Hounsfield units
    shown, _ = read_pixels(path, 2)  # auto: the file's soft-tissue window
    low, high = shown[hu < -170], shown[hu > 250]
    assert np.ptp(low) == 0 and np.ptp(high) == 0 and low[0] < high[0]  # outside the window: flat
    inside = (hu > -150) & (hu < 230)
    assert np.all(np.diff(shown[inside]) >= 0) and np.ptp(shown[inside]) > 0.8 * (high[0] - low[0])
    bone, _ = read_pixels(path, 2, DicomConfig(window=(200, 1000)))  # a window the site chose, for every file
    assert bone.min() == 0 and bone.max() == 1 and 0.55 < bone[hu == 250].mean() < 0.56


def test_monochrome1_is_inverted_and_signed_pixels_keep_their_sign(tmp_path):
    pixels = dicomgen.test_pattern()
    mono2, _ = read_pixels(dicomgen.write(tmp_path / "m2.dcm", pixels, modality="DX"), 2)
    mono1, _ = read_pixels(dicomgen.write(tmp_path / "m1.dcm", pixels, modality="DX", photometric="MONOCHROME1"), 2)
    assert np.array_equal(mono1, -mono2)  # bright bone stays bright after the cache's range scaling
    signed = (pixels.astype(np.int32) - 2048).astype(np.int16)
    got, _ = read_pixels(dicomgen.write(tmp_path / "s.dcm", signed, "jpeg-ls", signed=True, bits_stored=12), 2)
    assert got.min() < 0 and np.array_equal(got, signed.astype(np.float32))


def test_multi_frame_is_a_volume_for_3d_and_refused_with_the_reason_for_2d(tmp_path):
    frames = np.stack([dicomgen.test_pattern(32, 32, seed=k) for k in range(6)])
    path = dicomgen.write(tmp_path / "mr.dcm", frames, "j2k-lossless", modality="MR", spacing=(0.9, 0.9, 3.0))
    volume, spacing = read_pixels(path, 3, RAW)
    assert np.array_equal(volume, frames.astype(np.float32)) and spacing == (0.9, 0.9, 3.0)
    with pytest.raises(ValueError, match=r"multi-frame MR file \(6 frames\).*data.files.spatial_dims: 3"):
        read_pixels(path, 2)


def test_files_without_preamble_are_read_and_non_dicom_is_named(tmp_path):
    pixels = dicomgen.test_pattern()
    raw = dicomgen.write(tmp_path / "IMG0001", pixels, "implicit-little", preamble=False)
    assert raw.read_bytes()[128:132] != b"DICM"  # really without the file header
    assert np.array_equal(read_pixels(raw, 2, RAW)[0], pixels)
    named = dicomgen.write(tmp_path / "1.2.826.0.1.3680043.8.498.17", pixels)  # named by its UID
    assert np.array_equal(read_pixels(named, 2, RAW)[0], pixels)
    (tmp_path / "REPORT").write_text("Final report: no acute findings.\n" * 20)
    with pytest.raises(ValueError, match=r"not a DICOM file.*export it again as a DICOM \(Part 10\) file"):
        read_pixels(tmp_path / "REPORT", 2)


def test_a_missing_decoder_names_the_package_to_install(tmp_path):
    path = dicomgen.write(tmp_path / "j2k.dcm", dicomgen.test_pattern(), "j2k-lossless")
    code = ("from pydicom.pixels import get_decoder\n"  # as on a machine without the JPEG 2000 decoders
            "decoder = get_decoder('1.2.840.10008.1.2.4.90')\n"
            "for name in list(decoder.available_plugins): decoder.remove_plugin(name)\n"
            "from medimaging.pixels import read_pixels\n"
            f"try:\n    read_pixels({str(path)!r})\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "compressed as JPEG 2000 Image Compression (Lossless Only), and no installed decoder reads it" in out.stdout
    assert "pylibjpeg-openjpeg" in out.stdout and out.stderr == "", (out.stdout, out.stderr)


def test_check_data_shows_each_reason_whole_and_library_warnings_as_notes(tmp_path, capfd):
    root = tmp_path / "export"
    for k, syntax in enumerate(dicomgen.SYNTAXES):
        pixels = dicomgen.test_pattern(seed=k)
        dicomgen.write(root / ("a" if k % 2 else "b") / f"IM{k:04d}",
                       (pixels // 16).astype(np.uint8) if syntax in dicomgen.EIGHT_BIT else pixels, syntax)
    padded = dicomgen.write(root / "a" / "PADDED", dicomgen.test_pattern())
    ds = pydicom.dcmread(padded)
    ds.PixelData += b"\0" * 64  # a PACS that pads its pixel data: pydicom warns, the image is fine
    ds.save_as(padded)
    frames = dicomgen.write(root / "b" / "CINE", np.stack([dicomgen.test_pattern()] * 3), "rle", modality="US")
    cut = root / "b" / "CUT"
    cut.write_bytes(dicomgen.write(tmp_path / "whole", dicomgen.test_pattern(), "jpeg-ls").read_bytes()[:900])
    site = tmp_path / "site.yaml"
    site.write_text(f"site: cho-ray\ndata:\n  root: {root}\n  cache_dir: {tmp_path / 'cache'}\n")
    result = CliRunner().invoke(app, ["client", "check-data", "-c", str(site)], env={"COLUMNS": "80"})
    out = result.output
    assert result.exit_code == 0, out
    assert f"cho-ray: {len(dicomgen.SYNTAXES) + 1} usable images, 2 problems" in out
    lines = out.splitlines()
    cine = [line for line in lines if line.startswith(f"skipped b/{frames.name}:")]
    assert cine == ["skipped b/CINE: a multi-frame US file (3 frames): a 2D task reads one image per file; "
                    "set data.files.spatial_dims: 3 to read its frames as the slices of a volume"], out
    assert [line for line in lines if line.startswith("skipped b/CUT: ")], out  # one whole line, however narrow
    assert [line for line in lines if line.startswith("note a/PADDED: The pixel data is") and "padding" in line], out
    captured = capfd.readouterr()
    assert "Warning" not in captured.err and "padding" not in captured.err, captured.err


def test_mr_multi_frame_volumes_decode_and_train(tmp_path):
    """The contest's MR track: multi-frame MR files (one volume each) are read as volumes and a 3D
    network learns from them (the CT, X-ray and ultrasound tracks train in tests/test_dicomweb.py)."""
    import torch

    from medimaging.config import FilesConfig, ModelConfig
    from medimaging.datasets import Split, load_npz, targets, to_tensor
    from medimaging.files import decode
    from medimaging.models import build_model
    from medimaging.synthetic import site_images
    from medimaging.training import evaluate, train_epochs

    (x, y), (tx, ty) = site_images(2, 3, 160, 120, dims=3)  # 200 volumes to train on, 120 held out
    assert x.std() > 0.02 and 0.1 < y.mean() < 0.9 and 0.1 < ty.mean() < 0.9
    for k, (volume, label) in enumerate(zip(np.concatenate([x, tx]), np.concatenate([y, ty]), strict=True)):
        split = "train" if k < len(x) else "test"
        path = dicomgen.as_modality(tmp_path / "mr" / split / ("nodule" if label else "normal") / f"MR{k:04d}", volume[0], "MR")
    assert int(pydicom.dcmread(path).NumberOfFrames) == x.shape[2]
    decoded = decode(FilesConfig(root=tmp_path / "mr", cache_dir=tmp_path / "cache", image_size=16, spatial_dims=3))
    assert not decoded.inventory.problems and len(decoded.shapes) == len(y) + len(ty)
    arrays = load_npz(str(decoded.cache))
    train, test = (Split(to_tensor(arrays[f"{s}_images"], 16), targets(arrays[f"{s}_labels"], 16)) for s in ("train", "test"))
    assert len(test) == len(ty)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 1, 2, 16, spatial_dims=3)
    before = evaluate(model, test, 2)["auc"]
    for epoch in range(10):
        train_epochs(model, train, 1, 16, 1e-3, "adam", epoch)
    after = evaluate(model, test, 2)["auc"]
    assert after > 0.65 and after > before + 0.1, (before, after)
