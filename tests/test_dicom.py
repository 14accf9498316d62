"""DICOM input: files built here with pydicom, in the photometric kinds and syntaxes clinics send."""

import io
import re

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, JPEGLossless, JPEGLSLossless, RLELossless, generate_uid

from oncolens.vision.decode import ImageTooLarge, NotAnImage, TruncatedImage, UnsupportedFormat, decode_image

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def dicom(pixels: np.ndarray, photometric: str, bits: int | None = None, syntax: str = "", **tags: object) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = US_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID, "US"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    for name, value in tags.items():
        setattr(ds, name, value)
    if syntax == "rle":
        ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ramp(height: int = 48, width: int = 64, top: int = 4096) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % top).astype(np.uint16)


def test_monochrome2_ultrasound_uses_its_window() -> None:
    decoded = decode_image(dicom(ramp(), "MONOCHROME2", bits=12, WindowCenter=2048, WindowWidth=4096))
    pixels = np.asarray(decoded.image)
    assert decoded.format == "DICOM" and decoded.original_mode == "MONOCHROME2"
    assert (decoded.width, decoded.height) == (64, 48)
    assert pixels[..., 0].tolist() == pixels[..., 2].tolist(), "grey in all three channels"
    # value v maps to (v - 2047.5) / 4095 + 0.5: 0 -> 0, the last pixel 3071 -> 0.75 -> 191
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 191


def test_without_a_window_the_image_range_is_used_and_monochrome1_is_inverted() -> None:
    grey = ramp(top=1000)
    plain = np.asarray(decode_image(dicom(grey, "MONOCHROME2", bits=12)).image)[..., 0]
    assert plain.min() == 0 and plain.max() == 255
    inverted = np.asarray(decode_image(dicom(grey, "MONOCHROME1", bits=12)).image)[..., 0]
    assert np.abs(inverted.astype(int) + plain.astype(int) - 255).max() <= 1


def test_rescale_slope_and_intercept_come_before_the_window() -> None:
    grey = np.full((8, 8), 100, np.uint16)
    grey[0, 0] = 0
    # stored 100 -> 100 * 2 - 100 = 100 units; window (100, 101): (100 - 99.5) / 100 + 0.5 -> 129
    tags = {"RescaleSlope": 2, "RescaleIntercept": -100, "WindowCenter": 100, "WindowWidth": 101}
    pixels = np.asarray(decode_image(dicom(grey, "MONOCHROME2", bits=16, **tags)).image)[..., 0]
    assert pixels[4, 4] == 129 and pixels[0, 0] == 0


def test_rgb_ultrasound_and_rle_compressed_files() -> None:
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[..., 0], colour[10:20, 10:20, 2] = 200, 90
    decoded = decode_image(dicom(colour, "RGB"))
    assert decoded.original_mode == "RGB" and np.asarray(decoded.image).tolist() == colour.tolist()
    rle = decode_image(dicom(ramp(), "MONOCHROME2", bits=12, syntax="rle"))
    assert (
        np.asarray(rle.image).tolist() == np.asarray(decode_image(dicom(ramp(), "MONOCHROME2", bits=12)).image).tolist()
    )


def test_multi_frame_cine_gives_the_first_frame() -> None:
    frames = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 200, 90)])
    frames[0, 0, 0] = 0
    frames[0, -1, -1] = 255
    decoded = decode_image(dicom(frames, "MONOCHROME2", NumberOfFrames=3))
    assert (decoded.width, decoded.height) == (16, 16)
    assert np.asarray(decoded.image)[5, 5, 0] == 10


def test_bad_dicom_is_a_clear_error() -> None:
    good = dicom(ramp(), "MONOCHROME2", bits=12)
    with pytest.raises(ImageTooLarge, match="over the 0 MP limit"):
        decode_image(good, max_pixels=100)
    with pytest.raises(TruncatedImage):
        decode_image(good[: len(good) // 2])
    meta_only = io.BytesIO()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(meta_only, enforce_file_format=True)
    with pytest.raises(NotAnImage, match="no Pixel Data"):
        decode_image(meta_only.getvalue())


def test_a_syntax_without_a_decoder_here_is_415_naming_it() -> None:
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder

    # Which syntaxes decode depends on the plugins installed (the dicom extra brings pyjpegls, so
    # JPEG-LS decodes): take one that does not decode on this machine.
    candidates = [JPEGLSLossless, HTJ2KLossless, JPEGLossless]
    missing = [syntax for syntax in candidates if not get_decoder(syntax).is_available]
    if not missing:
        pytest.skip("every candidate transfer syntax has a decoder here")
    ds = dcmread(io.BytesIO(dicom(ramp(), "MONOCHROME2", bits=12)))
    ds.file_meta.TransferSyntaxUID = missing[0]
    ds.PixelData = encapsulate([b"\\x00" * 64])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnsupportedFormat, match=re.escape(missing[0].name)) as error:
        decode_image(buffer.getvalue())
    assert error.value.status == 415 and "cannot be decoded here" in str(error.value)
