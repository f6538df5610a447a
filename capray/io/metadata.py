"""The metadata a protected photo keeps: capture time (unless asked otherwise), location only if asked.

Everything else in a photo's EXIF, XMP, IPTC and comments is left out of the output, on purpose:

- the EXIF thumbnail is the *unprotected* photo, small but enough to fine-tune on;
- camera make, model and serial numbers, maker notes and editing history identify a person too;
- the orientation is already applied to the pixels (a kept tag would rotate them twice).

Capture time is what galleries sort and group by, so it is kept by default (`output.keep_capture_time`);
GPS location says where someone lives, so it goes unless `output.keep_location` asks for it. The
kept tags are written as a fresh EXIF block, so the same photo and policy give the same bytes.
"""

from __future__ import annotations

from PIL import Image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
# DateTime, and in the Exif IFD: DateTimeOriginal/Digitized, their time-zone offsets and sub-seconds
TIME_TAGS_IFD0 = (0x0132,)
TIME_TAGS_EXIF = (0x9003, 0x9004, 0x9010, 0x9011, 0x9012, 0x9290, 0x9291, 0x9292)


def kept_exif(img: Image.Image, *, keep_capture_time: bool = True, keep_location: bool = False) -> bytes | None:
    """The EXIF block to write with the protected photo (only the tags the policy keeps), or None."""
    if not (keep_capture_time or keep_location):
        return None
    try:
        source = img.getexif()
        ifd0 = {tag: source[tag] for tag in TIME_TAGS_IFD0 if tag in source} if keep_capture_time else {}
        times = ({tag: v for tag, v in source.get_ifd(EXIF_IFD).items() if tag in TIME_TAGS_EXIF}
                 if keep_capture_time else {})
        gps = dict(source.get_ifd(GPS_IFD)) if keep_location else {}
        if not (ifd0 or times or gps):
            return None
        out = Image.Exif()
        out.update(ifd0)
        for tag, tags in ((EXIF_IFD, times), (GPS_IFD, gps)):
            if tags:
                out.get_ifd(tag).update(tags)
        return out.tobytes()
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return None  # unreadable EXIF: nothing of it is kept
