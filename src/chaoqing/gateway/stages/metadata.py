"""Metadata stage: EXIF and XMP read from the upload, made true of the output, written back.

Pure functions, safe from many threads at once; nothing here touches pixels. The decode
stage calls :func:`read_metadata` on the opened Pillow image; the pipeline calls
:func:`output_metadata` with the output's size and format; the encode stage writes the
bytes it returns. ICC profiles travel beside (``DecodedImage.icc_profile``): they describe
the pixels' colours, so the decode stage decides which are carried.

What is carried, and what changes on the way:

- **EXIF** (JPEG APP1, PNG eXIf, WebP EXIF, and TIFF's own tags): IFD0's descriptive tags
  (camera make and model, date and time, artist, copyright, resolution, …), the Exif IFD
  (capture date, exposure, lens, the maker note as it is), its Interoperability IFD and the
  GPS IFD. The Orientation tag becomes 1 (the decode stage turned the pixels upright);
  PixelXDimension / PixelYDimension become the output's size. Tags that describe a file's
  own layout (ImageWidth, StripOffsets, Compression, the thumbnail's IFD1, …) are dropped:
  they were true of the upload, not of the output, and the thumbnail shows the unenhanced
  photo the wrong way up. A maker note is copied byte for byte; makers whose notes hold
  offsets from the start of the EXIF block (Canon, among others) may read them from the
  wrong place after the move, as with every tool that rewrites EXIF without knowing each
  maker's format.
- **XMP** (JPEG APP1, PNG iTXt ``XML:com.adobe.xmp``, WebP XMP, TIFF tag 700, GIF): the
  packet as it is, with ``tiff:Orientation`` set to 1 and ``exif:PixelXDimension``,
  ``exif:PixelYDimension``, ``tiff:ImageWidth``, ``tiff:ImageLength`` set to the output's
  size where present (prefixes as bound in the packet). The packet is edited as text, never
  parsed as XML: no entity expansion, time linear in its size. JPEG's extended XMP (a
  packet over 64 kB split across segments) is not read.
- **GPS** (``strip_gps``): the GPS IFD, and every XMP property whose name begins with
  ``GPS`` in any namespace (``exif:GPSLatitude``, ``Iptc4xmpExt:GPSLatitude``,
  ``drone-dji:GpsLatitude``, …), both as attributes and as elements.
- **Bounds.** An EXIF block or XMP packet over ``limits.max_metadata_bytes`` (1 MiB), one
  that does not parse, or XMP that is not UTF-8, is dropped with a note (the pipeline logs
  it); the photo is enhanced all the same. JPEG holds one EXIF segment of at most 65,533
  bytes and one XMP packet of at most 65,504: larger ones are dropped from JPEG output with a
  note. IPTC-IIM (Photoshop's APP13) is not carried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from PIL import ExifTags, Image

__all__ = [
    "NO_METADATA",
    "OutputMetadata",
    "PhotoMetadata",
    "output_metadata",
    "read_metadata",
]

EXIF_HEADER: Final = b"Exif\x00\x00"  # JPEG APP1 / Pillow's form of an EXIF block (CIPA DC-008 §4.5.4)
ORIENTATION_TAG: Final = 0x0112  # EXIF 2.32 §4.6.4
UPRIGHT: Final = 1
PIXEL_X_DIMENSION_TAG: Final = 0xA002  # in the Exif IFD
PIXEL_Y_DIMENSION_TAG: Final = 0xA003
EXIF_IFD: Final = int(ExifTags.IFD.Exif)  # 0x8769
GPS_IFD: Final = int(ExifTags.IFD.GPSInfo)  # 0x8825
INTEROPERABILITY_IFD: Final = int(ExifTags.IFD.Interop)  # 0xA005, inside the Exif IFD
TIFF_XMP_TAG: Final = 0x02BC  # XMP part 3 §1.1.4: XMLPacket, in a TIFF's IFD0
# IFD0 tags that describe the file they came from (TIFF 6.0 baseline and extensions, EXIF's
# JPEG interchange pointers, TIFF's embedded XMP / IPTC / Photoshop / ICC blocks), not the photo.
FILE_LAYOUT_TAGS: Final = frozenset({
    0x00FE, 0x00FF,  # NewSubfileType, SubfileType
    0x0100, 0x0101, 0x0102, 0x0103, 0x0106, 0x010A,  # ImageWidth/Length, BitsPerSample, Compression, Photometric, FillOrder
    0x0111, 0x0115, 0x0116, 0x0117, 0x0118, 0x0119,  # StripOffsets, SamplesPerPixel, RowsPerStrip, StripByteCounts, Min/MaxSampleValue
    0x011C, 0x013D, 0x0140, 0x0142, 0x0143, 0x0144, 0x0145,  # PlanarConfiguration, Predictor, ColorMap, Tile*
    0x014A, 0x0152, 0x0153, 0x015B,  # SubIFDs, ExtraSamples, SampleFormat, JPEGTables
    0x0201, 0x0202, 0x0211, 0x0212,  # JPEGInterchangeFormat(Length), YCbCrCoefficients, YCbCrSubSampling
    TIFF_XMP_TAG, 0x83BB, 0x8649, 0x8773,  # XMP, IPTC, Photoshop, ICC profile (TIFF's embeddings)
    EXIF_IFD, GPS_IFD,  # pointers: the IFDs are copied as IFDs
})
JPEG_MAX_EXIF_BYTES: Final = 65533  # one APP1 segment: 65535 less its length field (ITU T.81 B.1.1.4)
JPEG_MAX_XMP_BYTES: Final = 65504  # 65533 less the 29-byte "http://ns.adobe.com/xap/1.0/\0" (XMP part 3 §1.1.3)
TIFF_NAMESPACE: Final = "http://ns.adobe.com/tiff/1.0/"
EXIF_NAMESPACE: Final = "http://ns.adobe.com/exif/1.0/"
_XML_NAME: Final = r"[A-Za-z_][\w.-]*"
_NAMESPACE_DECLARATION: Final = re.compile(rf"xmlns:({_XML_NAME})\s*=\s*([\"'])([^\"']*)\2")
# GPS properties, any namespace: as attributes (name="value") and as simple elements. Values
# are matched with [^"]* and [^<]*, so each match is linear in the packet's length.
# (?<=\s): an attribute starts right after whitespace; one try per such place keeps it linear
_GPS_ATTRIBUTE: Final = re.compile(rf"(?<=\s){_XML_NAME}:(?i:gps)[\w.-]*\s*=\s*(?:\"[^\"]*\"|'[^']*')")
_GPS_EMPTY_ELEMENT: Final = re.compile(rf"<({_XML_NAME}:(?i:gps)[\w.-]*)\b[^<>]*/>")
_GPS_ELEMENT: Final = re.compile(rf"<({_XML_NAME}:(?i:gps)[\w.-]*)\b[^<>]*>[^<]*</\1\s*>")
# a GPS property written as a structure (rdf:Seq of values and the like): opening to closing tag
_GPS_STRUCTURE_OPENING: Final = re.compile(rf"<({_XML_NAME}:(?i:gps)[\w.-]*)\b[^<>]*>")


@dataclass(frozen=True)
class PhotoMetadata:
    """The upload's EXIF and XMP, as read (bounded, parsed once, file-layout tags gone).

    exif: ``b"Exif\\0\\0"`` + a TIFF-structured block, or None. Its Orientation is still the
        upload's; :func:`output_metadata` resets it.
    xmp: the XMP packet (UTF-8), or None.
    notes: what was dropped while reading, and why (for the log).
    """

    exif: bytes | None = None
    xmp: bytes | None = None
    notes: tuple[str, ...] = ()


NO_METADATA: Final = PhotoMetadata()


@dataclass(frozen=True)
class OutputMetadata:
    """What the encode stage writes: EXIF and XMP made true of the output; notes for the log."""

    exif: bytes | None = None
    xmp: bytes | None = None
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- reading


def read_metadata(image: Image.Image, max_bytes: int) -> PhotoMetadata:
    """EXIF and XMP of an opened (preferably loaded: a PNG's eXIf may follow its pixels) image.

    Never raises for what the upload holds: a block over ``max_bytes``, one Pillow cannot
    parse, or XMP that is not UTF-8 is left out, with a note saying so.
    """
    notes: list[str] = []
    exif = _read_exif(image, max_bytes, notes)
    xmp = _read_xmp(image, max_bytes, notes)
    return PhotoMetadata(exif, xmp, tuple(notes))


def _read_exif(image: Image.Image, max_bytes: int, notes: list[str]) -> bytes | None:
    raw = image.info.get("exif")
    tiff = image.format == "TIFF"  # TIFF keeps EXIF's tags in its own IFD0
    if not tiff and not raw:
        return None
    if not tiff and not isinstance(raw, bytes):
        notes.append(f"EXIF read as {type(raw).__name__}: not carried")
        return None
    if isinstance(raw, bytes) and len(raw) > max_bytes:
        notes.append(f"EXIF of {len(raw)} bytes is over the {max_bytes}-byte limit: not carried")
        return None
    try:
        if isinstance(raw, bytes) and not tiff:
            source = Image.Exif()
            source.load(raw)
        else:
            source = image.getexif()
        exif = _carried_exif(source).tobytes()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's EXIF parser has no documented error set
        # (struct.error, SyntaxError, ValueError, KeyError, OSError, … on hostile bytes)
        notes.append(f"EXIF does not parse ({type(exc).__name__}): not carried")
        return None
    if len(exif) > max_bytes:
        notes.append(f"EXIF of {len(exif)} bytes is over the {max_bytes}-byte limit: not carried")
        return None
    return exif if _has_tags(exif) else None


def _carried_exif(source: Image.Exif) -> Image.Exif:
    """A new Exif with IFD0's descriptive tags, the Exif IFD (with Interop) and the GPS IFD."""
    carried = Image.Exif()
    for tag, value in source.items():
        if tag not in FILE_LAYOUT_TAGS:
            carried[tag] = value
    exif_ifd = dict(source.get_ifd(EXIF_IFD))
    if exif_ifd:
        exif_ifd.pop(INTEROPERABILITY_IFD, None)
        interoperability = dict(source.get_ifd(INTEROPERABILITY_IFD))
        if interoperability:
            exif_ifd[INTEROPERABILITY_IFD] = interoperability
        carried[EXIF_IFD] = exif_ifd
    gps_ifd = dict(source.get_ifd(GPS_IFD))
    if gps_ifd:
        carried[GPS_IFD] = gps_ifd
    return carried


def _has_tags(exif: bytes) -> bool:
    """An EXIF block holding no tag at all is not worth writing."""
    parsed = Image.Exif()
    parsed.load(exif)
    return len(parsed) > 0


def _read_xmp(image: Image.Image, max_bytes: int, notes: list[str]) -> bytes | None:
    raw = image.info.get("xmp")
    if raw is None:
        raw = image.info.get("XML:com.adobe.xmp")
    if not raw:
        return None
    if isinstance(raw, str):
        if len(raw) > max_bytes:  # a str holds at least one byte per character
            notes.append(f"XMP of {len(raw)} characters is over the {max_bytes}-byte limit: not carried")
            return None
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, bytes):
        notes.append(f"XMP read as {type(raw).__name__}: not carried")
        return None
    if len(raw) > max_bytes:
        notes.append(f"XMP of {len(raw)} bytes is over the {max_bytes}-byte limit: not carried")
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        notes.append("XMP is not UTF-8 text: not carried")
        return None
    return raw


# ---------------------------------------------------------------------------- writing


def output_metadata(
    metadata: PhotoMetadata, width: int, height: int, output_format: str, *, strip_gps: bool = False
) -> OutputMetadata:
    """``metadata`` made true of a ``width``×``height`` upright output in ``output_format``
    ("png", "jpeg", "webp"): orientation 1, pixel dimensions set, GPS removed when
    ``strip_gps``, and whatever the format cannot hold left out (with a note).

    Never raises for what the upload held: an EXIF block that no longer serialises is left out
    with a note.
    """
    notes: list[str] = []
    exif = None
    if metadata.exif is not None:
        try:
            exif = _exif_for_output(metadata.exif, width, height, strip_gps)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - as when reading: hostile values, no documented error set
            notes.append(f"EXIF does not serialise ({type(exc).__name__}): not written")
    xmp = None
    if metadata.xmp is not None:
        xmp = _xmp_for_output(metadata.xmp.decode("utf-8"), width, height, strip_gps).encode("utf-8")
    if output_format == "jpeg":
        if exif is not None and len(exif) > JPEG_MAX_EXIF_BYTES:
            notes.append(f"EXIF of {len(exif)} bytes does not fit JPEG's {JPEG_MAX_EXIF_BYTES}: not written")
            exif = None
        if xmp is not None and len(xmp) > JPEG_MAX_XMP_BYTES:
            notes.append(f"XMP of {len(xmp)} bytes does not fit JPEG's {JPEG_MAX_XMP_BYTES}: not written")
            xmp = None
    return OutputMetadata(exif, xmp, tuple(notes))


def _exif_for_output(raw: bytes, width: int, height: int, strip_gps: bool) -> bytes | None:
    exif = Image.Exif()
    exif.load(raw)
    carried = _carried_exif(exif)
    if ORIENTATION_TAG in carried:
        carried[ORIENTATION_TAG] = UPRIGHT
    exif_ifd = carried.get(EXIF_IFD)
    if isinstance(exif_ifd, dict):
        for tag, size in ((PIXEL_X_DIMENSION_TAG, width), (PIXEL_Y_DIMENSION_TAG, height)):
            if tag in exif_ifd:
                exif_ifd[tag] = size
    if strip_gps and GPS_IFD in carried:
        del carried[GPS_IFD]
    if len(carried) == 0:
        return None
    data: bytes = carried.tobytes()
    return data


def _xmp_for_output(text: str, width: int, height: int, strip_gps: bool) -> str:
    prefixes = _prefixes_by_namespace(text)
    for prefix in prefixes.get(TIFF_NAMESPACE, ()):
        text = _set_simple_property(text, prefix, "Orientation", str(UPRIGHT))
        text = _set_simple_property(text, prefix, "ImageWidth", str(width))
        text = _set_simple_property(text, prefix, "ImageLength", str(height))
    for prefix in prefixes.get(EXIF_NAMESPACE, ()):
        text = _set_simple_property(text, prefix, "PixelXDimension", str(width))
        text = _set_simple_property(text, prefix, "PixelYDimension", str(height))
    if strip_gps:
        text = _remove_gps_properties(text)
    return text


def _prefixes_by_namespace(text: str) -> Mapping[str, tuple[str, ...]]:
    prefixes: dict[str, list[str]] = {}
    for match in _NAMESPACE_DECLARATION.finditer(text):
        prefix, uri = match.group(1), match.group(3)
        if prefix not in prefixes.setdefault(uri, []):
            prefixes[uri].append(prefix)
    return {uri: tuple(names) for uri, names in prefixes.items()}


def _set_simple_property(text: str, prefix: str, name: str, value: str) -> str:
    """``prefix:name="…"`` and ``<prefix:name>…</prefix:name>`` get ``value``."""
    qualified = re.escape(f"{prefix}:{name}")
    text = re.sub(rf"(\s{qualified}\s*=\s*)(\"[^\"]*\"|'[^']*')", lambda match: f'{match.group(1)}"{value}"', text)
    return re.sub(rf"(<{qualified}(?:\s[^<>]*)?>)[^<]*(</{qualified}\s*>)",
                  lambda match: f"{match.group(1)}{value}{match.group(2)}", text)


def _remove_gps_properties(text: str) -> str:
    text = _GPS_ATTRIBUTE.sub("", text)
    text = _GPS_EMPTY_ELEMENT.sub("", text)
    text = _GPS_ELEMENT.sub("", text)
    return _remove_gps_structures(text)


def _remove_gps_structures(text: str) -> str:
    """GPS properties that hold elements (rdf:Seq, rdf:Alt, a struct): from each opening tag to
    its closing tag. One forward scan: each opening tag's closing tag is searched from it on,
    and the scan resumes after it, so the work stays linear in the text."""
    pieces: list[str] = []
    position = 0
    while True:
        opening = _GPS_STRUCTURE_OPENING.search(text, position)
        if opening is None:
            break
        closing_tag = f"</{opening.group(1)}"
        closing = text.find(closing_tag, opening.end())
        closing_end = text.find(">", closing + len(closing_tag)) if closing >= 0 else -1
        if closing_end < 0:  # no closing tag: leave the rest as it is
            break
        pieces.append(text[position:opening.start()])
        position = closing_end + 1
    pieces.append(text[position:])
    return "".join(pieces)
