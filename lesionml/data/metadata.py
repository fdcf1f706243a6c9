"""HAM10000 metadata: read the release's CSV strictly, then clean it for modelling.

Reading is strict on purpose: a row that cannot be used stops ingest with the row and
the reason, because silently dropping rows would change the dataset without anyone
noticing. Cleaning only normalises representation; it never removes a row.
"""

from __future__ import annotations

import codecs
import re
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from lesionml.errors import DataError, summarize

METADATA_FILE = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")

# The 7 diagnostic classes, in the fixed order that defines label indices everywhere.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratoses and intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesions",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevi",
    "vasc": "Vascular lesions",
}
SEXES = ("male", "female", "unknown")

# An image_id becomes a file name: only plain names, never paths such as ../../etc/passwd.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")


def is_safe_id(image_id: str) -> bool:
    return bool(_SAFE_ID.match(image_id))


def _rows(df: pd.DataFrame, mask: pd.Series, column: str) -> list[str]:
    # +2: one for the header line, one because CSV lines are counted from 1.
    return [f"line {i + 2} ({df.at[i, column]!r})" for i in df.index[mask]]


def read_metadata(path: Path) -> pd.DataFrame:
    """Read and validate the release CSV; every problem found is reported with its lines."""
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: metadata file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # exc.start counts from after a BOM, which utf-8-sig strips before decoding.
        offset = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        encoding = f"; it is UTF-16 (byte order mark {raw[:2].hex(' ').upper()})" if utf16 else ""
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}){encoding}; save it as UTF-8"
        ) from None
    try:
        df = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    df = df[list(REQUIRED_COLUMNS)].apply(lambda s: s.str.strip())
    _validate(path, df)
    return df


def _validate(path: Path, df: pd.DataFrame) -> None:
    checks: list[tuple[pd.Series, str, str]] = [
        (df.image_id.map(lambda v: not is_safe_id(v)), "image_id", "rows whose image_id is not a plain file name"),
        (df.lesion_id == "", "image_id", "rows with an empty lesion_id"),
        (~df.dx.isin(CLASSES), "dx", f"rows with a dx outside {', '.join(CLASSES)}"),
        (df.image_id.duplicated(keep="first"), "image_id", "duplicate image_id rows"),
        (~df.sex.str.lower().isin(SEXES + ("",)), "sex", f"rows with a sex outside {', '.join(SEXES)}"),
    ]
    age = pd.to_numeric(df.age, errors="coerce")
    bad_age = (df.age != "") & (age.isna() | (age < 0) | (age > 120))
    checks.append((bad_age, "age", "rows with an age that is not a number from 0 to 120"))
    for mask, column, problem in checks:
        if mask.any():
            raise DataError(f"{path}: {summarize(problem, _rows(df, mask, column))}")
    labels_per_lesion = df.groupby("lesion_id").dx.nunique()
    mixed = labels_per_lesion[labels_per_lesion > 1].index.tolist()
    if mixed:
        raise DataError(f"{path}: {summarize('lesions with images of different dx', mixed)}")


def clean_metadata(df: pd.DataFrame) -> pd.DataFrame:
    """Typed, normalised metadata for modelling: label index and name, numeric age."""
    out = pd.DataFrame(
        {
            "image_id": df.image_id,
            "lesion_id": df.lesion_id,
            "dx": df.dx,
            "label": df.dx.map({c: i for i, c in enumerate(CLASSES)}).astype(np.int64),
            "dx_name": df.dx.map(CLASS_NAMES),
            "dx_type": df.dx_type.replace("", "unknown"),
            "age": pd.to_numeric(df.age.replace("", np.nan)),
            "sex": df.sex.str.lower().replace("", "unknown"),
            "localization": df.localization.str.lower().replace("", "unknown"),
        }
    )
    return out.reset_index(drop=True)
