"""HAM10000 metadata: read the release's CSV strictly, then clean it for modelling.

Reading is strict on purpose: a row that cannot be used stops ingest with the row and
the reason, because silently dropping rows would change the dataset without anyone
noticing. Cleaning only normalises representation; it never removes a row.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
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
# The release's anatomic sites. Ingest accepts any site (a model without metadata never reads
# it); a model with the metadata branch refuses one outside this list (see check_patient).
LOCALIZATIONS = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
    "unknown",
)
MAX_AGE = 120

# An image_id becomes a file name: only plain names, never paths such as ../../etc/passwd.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")


def is_safe_id(image_id: str) -> bool:
    return bool(_SAFE_ID.match(image_id))


def _rows(df: pd.DataFrame, mask: pd.Series, column: str) -> list[str]:
    # +2: one for the header line, one because CSV lines are counted from 1.
    return [f"line {i + 2} ({df.at[i, column]!r})" for i in df.index[mask]]


def read_metadata(path: Path) -> pd.DataFrame:
    """Read and validate the release CSV; every problem found is reported with its lines."""
    df = _read_table(path, REQUIRED_COLUMNS)
    _validate(path, df)
    return df


def _read_table(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """A metadata CSV as stripped text ("" = missing) with its `required` columns and those
    of `optional` it has, or one DataError naming the file: not there, empty, not UTF-8, not
    CSV, a required column missing."""
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
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    return df[[*required, *(c for c in optional if c in df.columns)]].apply(lambda s: s.str.strip())


def _validate(path: Path, df: pd.DataFrame) -> None:
    checks: list[tuple[pd.Series, str, str]] = [
        (df.image_id.map(lambda v: not is_safe_id(v)), "image_id", "rows whose image_id is not a plain file name"),
        (df.lesion_id == "", "image_id", "rows with an empty lesion_id"),
        (~df.dx.isin(CLASSES), "dx", f"rows with a dx outside {', '.join(CLASSES)}"),
        (df.image_id.duplicated(keep="first"), "image_id", "duplicate image_id rows"),
        *_patient_checks(df, sites=False),
    ]
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
            **_clean_patient(df),
        }
    )
    return out.reset_index(drop=True)


PATIENT_COLUMNS = ("age", "sex", "localization")


def _patient_checks(df: pd.DataFrame, sites: bool) -> list[tuple[pd.Series, str, str]]:
    """Rows whose patient values are unusable; `df` holds them as stripped text, "" = missing."""
    age = pd.to_numeric(df.age, errors="coerce")
    checks = [
        (~df.sex.str.lower().isin(SEXES + ("",)), "sex", f"rows with a sex outside {', '.join(SEXES)}"),
        (
            (df.age != "") & (age.isna() | (age < 0) | (age > MAX_AGE)),
            "age",
            f"rows with an age that is not a number from 0 to {MAX_AGE}",
        ),
    ]
    if sites:
        problem = f"rows with a localization outside the release's sites ({', '.join(LOCALIZATIONS)})"
        checks.append((~df.localization.str.lower().isin(LOCALIZATIONS + ("",)), "localization", problem))
    return checks


def _clean_patient(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {
        "age": pd.to_numeric(df.age.replace("", np.nan)),
        "sex": df.sex.str.lower().replace("", "unknown"),
        "localization": df.localization.str.lower().replace("", "unknown"),
    }


def check_patient(rows: pd.DataFrame, origin: str, names: Sequence[str]) -> pd.DataFrame:
    """Validated, cleaned age/sex/localization of `rows` (raw text, cleaned values or NaN/None).

    What a model with the metadata branch reads, from any source: the release's cleaned rows
    at training, a user's CSV at prediction, a served request's columns. The first kind of bad
    value is one DataError naming `origin` and the offending rows by `names` (one per row).
    Missing values (empty, NaN, None, a missing column) are allowed: the model has an
    `unknown` level and a missing-age indicator for them.
    """
    text = pd.DataFrame(index=range(len(rows)))
    for column in PATIENT_COLUMNS:
        values = rows[column] if column in rows.columns else pd.Series([None] * len(rows))
        text[column] = ["" if not isinstance(v, str) and pd.isna(v) else str(v).strip() for v in values.tolist()]
    for mask, column, problem in _patient_checks(text, sites=True):
        if mask.any():
            offenders = [f"{names[i]} ({text.at[i, column]!r})" for i in text.index[mask]]
            raise DataError(f"{origin}: {summarize(problem, offenders)}")
    return pd.DataFrame(_clean_patient(text)).astype({"age": np.float64})


def read_patient_table(path: Path) -> pd.DataFrame:
    """A user's patient values for prediction (HAM10000's columns image_id, age, sex,
    localization; a missing column or empty cell is a missing value), validated and cleaned,
    indexed by image_id. A bad value is one DataError naming the file and the CSV line."""
    df = _read_table(path, ("image_id",), PATIENT_COLUMNS)
    if len(df.columns) == 1:
        raise DataError(f"{path}: none of the columns {', '.join(PATIENT_COLUMNS)}")
    repeated = df.image_id[df.image_id.duplicated()]
    if len(repeated):
        raise DataError(f"{path}: image_id {repeated.iloc[0]!r} is on more than one line")
    clean = check_patient(df, str(path), [f"line {i + 2} ({v})" for i, v in enumerate(df.image_id)])
    return clean.set_index(pd.Index(df.image_id, name="image_id"))
