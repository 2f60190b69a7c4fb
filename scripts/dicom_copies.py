"""DICOM copies of JPEG images, written with pydicom, for the tests and the decode benchmark.

Each encoding, read as a viewer shows it, gives the JPEG's pixels back:

    native8   MONOCHROME2, 8 bits, no window (uncompressed, explicit VR little endian)
    mono1_12  MONOCHROME1, 12 bits in 16, rescale slope 2 / intercept -1000 and a window
              whose output, inverted, is the JPEG's gray level (the values are 16 x gray)
    rle       native8 compressed with RLE Lossless
    j2k       mono1_12 compressed with JPEG 2000 Lossless (pylibjpeg-openjpeg's encoder)
    jpeg      the JPEG file's own bytes, encapsulated (JPEG Baseline; YBR_FULL_422 for a
              colour JPEG, MONOCHROME2 for a gray one)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

ENCODINGS = ("native8", "mono1_12", "rle", "j2k", "jpeg")


def gray_of(jpeg: Path) -> np.ndarray:
    """The JPEG's gray levels (the chest X-rays are stored as RGB with R = G = B)."""
    with Image.open(jpeg) as im:
        return np.asarray(im.convert("RGB"))[..., 0].copy()


def write_copy(
    jpeg: Path,
    out: Path,
    encoding: str,
    *,
    patient_id: str = "ANON",
    study_uid: Optional[str] = None,
    preamble: bool = True,
    frames: int = 1,
) -> Path:
    """Write ``jpeg`` as a DICOM file ``out`` in ``encoding`` (see the module docstring);
    ``frames`` > 1 (native8 only): frame k is the image, inverted when k is odd."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "DX"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    if encoding == "jpeg":
        with Image.open(jpeg) as im:
            colour = im.mode != "L"
            ds.Rows, ds.Columns = im.height, im.width
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([Path(jpeg).read_bytes()])
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        gray = gray_of(jpeg)
        ds.Rows, ds.Columns = gray.shape
        if encoding in ("mono1_12", "j2k"):
            ds.PhotometricInterpretation = "MONOCHROME1"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
            ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
            ds.WindowCenter, ds.WindowWidth = 3110.5, 8161  # 16 x gray, rescaled, onto [0, 1]
            ds.PixelData = (4095 - 16 * gray.astype(np.uint16)).astype("<u2").tobytes()
        elif encoding in ("native8", "rle"):
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = b"".join(
                (gray if k % 2 == 0 else 255 - gray).tobytes() for k in range(frames)
            )
            if frames > 1:
                ds.NumberOfFrames = frames
        else:
            raise ValueError(f"encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
        if encoding == "rle":
            ds.compress(RLELossless)
        elif encoding == "j2k":
            ds.compress(JPEG2000Lossless)
    if not preamble:  # the raw data set, without the 128-byte preamble and DICM marker
        ds.preamble = None
    ds.save_as(out, enforce_file_format=preamble)
    return Path(out)
