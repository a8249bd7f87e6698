"""Batch runs over many CTs: finding the inputs, splitting them into shards, resuming.

:func:`find_inputs` turns what the user gives (a CT file, a DICOM folder, a folder of CTs,
an ATM'22 / nnU-Net dataset folder or a list file) into :class:`Case` objects;
:func:`parse_shard` and :func:`select_shard` split them for parallel jobs (SLURM
``--array=1-n`` maps onto ``--shard $SLURM_ARRAY_TASK_ID/n``); :func:`run_cases` calls the
per-case work and makes the run resumable: a case whose output folder holds a
``manifest.json`` matching its input and settings, with all listed outputs present, is
skipped, and anything else is redone.  The manifest is written last, so a crash mid-case
never leaves a manifest beside unfinished outputs.

Examples
--------
>>> cases, collection = find_inputs("ATM22/imagesTs")  # doctest: +SKIP
>>> summary = run_cases(select_shard(cases, *parse_shard("2/8")), "out", segment,  # doctest: +SKIP
...                     collection=collection, settings={"model": "wingsnet.safetensors"})
>>> summary.exit_code  # doctest: +SKIP
0
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .data import CHANNEL_SUFFIX, name_with_ending
from .errors import AirwayInputError
from .progress import Cancelled, ProgressCallback, report, sub_progress
from .volume import IMAGE_SUFFIXES, output_folder, write_json

#: Name of the file that marks a finished case in its output folder.
MANIFEST_NAME = "manifest.json"
#: Endings of list files (one input path per line; for .csv the first column).
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")
#: Sub-folders of an ATM'22 / nnU-Net dataset that hold the CT images.
DATASET_IMAGE_FOLDERS = ("imagesTr", "imagesTs")

_DICOM_PREAMBLE_BYTES = 128
_DICOM_MAGIC = b"DICM"
_SHARD_FORM = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Case:
    """One CT of a batch.

    Attributes
    ----------
    name : str
        Case name: the file name without its image ending and without a trailing ``_0000``,
        or the DICOM folder's name.  Names the case's output folder in a collection.
    path : pathlib.Path
        A CT image file or a folder holding one DICOM series.
    """

    name: str
    path: Path


#: ``process(case, case_dir, case_progress) -> {"outputs": [...], ...}``, see :func:`run_cases`.
ProcessCase = Callable[[Case, Path, ProgressCallback | None], Mapping]


@dataclass
class BatchSummary:
    """What :func:`run_cases` did.

    Attributes
    ----------
    done : int
        Cases processed in this run.
    skipped : int
        Cases already finished by an earlier run with the same input and settings.
    failed : list of (str, str)
        Case name and one-line error message of each case that failed.
    seconds : float
        Wall time of the run.
    """

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when no case failed, else 1."""
        return 1 if self.failed else 0

    def describe(self) -> str:
        """One line: how many cases were done, skipped and failed, and the time taken."""
        return (
            f"{self.done} done, {self.skipped} skipped (already finished), {len(self.failed)} failed "
            f"in {self.seconds:.1f} s"
        )


def _visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` by name, without hidden ones (.DS_Store, unfinished atomic writes)."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _is_image_file(path: Path) -> bool:
    return name_with_ending(path, IMAGE_SUFFIXES) is not None and path.is_file()


def _is_dicom_file(path: Path) -> bool:
    """True for a ``.dcm`` file or, for any other non-image file, one with the DICOM preamble."""
    if not path.is_file():
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    if name_with_ending(path, IMAGE_SUFFIXES) is not None:
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_PREAMBLE_BYTES + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_PREAMBLE_BYTES:] == _DICOM_MAGIC


def _holds_dicom(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file other than a DICOMDIR (the
    index a DICOM medium keeps at its top, beside the folders of its series)."""
    return any(_is_dicom_file(path) and path.name.upper() != "DICOMDIR" for path in _visible_entries(folder))


def _case_name(path: Path) -> str:
    """Case name of a CT file or DICOM folder (see :class:`Case`)."""
    name = name_with_ending(path, IMAGE_SUFFIXES)
    if name is None:
        return path.name
    return name.removesuffix(CHANNEL_SUFFIX) or path.name


def _folder_cases(folder: Path) -> list[Case]:
    """The CT image files and DICOM sub-folders directly in ``folder``, by name."""
    return [
        Case(_case_name(path), path)
        for path in _visible_entries(folder)
        if _is_image_file(path) or (path.is_dir() and _holds_dicom(path))
    ]


def _collection_cases(folder: Path) -> list[Case]:
    cases = _folder_cases(folder)
    if not cases:
        for sub in DATASET_IMAGE_FOLDERS:
            if (folder / sub).is_dir():
                cases += _folder_cases(folder / sub)
    if not cases:
        raise AirwayInputError(
            f"{folder} holds no CT images ({', '.join(IMAGE_SUFFIXES)}) and no DICOM sub-folders, "
            f"directly or in {' or '.join(DATASET_IMAGE_FOLDERS)}; give a folder of CTs or a list file."
        )
    return cases


def _list_cases(list_path: Path) -> list[Case]:
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AirwayInputError(
            f"Cannot read the list file {list_path} ({error}); give a text file with one path per line."
        ) from None
    is_csv = list_path.name.lower().endswith(".csv")
    cases: list[Case] = []
    first_entry = True
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if is_csv:
            text = next(csv.reader([text]), [""])[0].strip()
        path = list_path.parent / Path(text).expanduser()
        # A header names a column ("path", "ct"); a missing file named like one is an error.
        looks_like_a_path = name_with_ending(path, IMAGE_SUFFIXES) is not None or "/" in text or "\\" in text
        header = is_csv and first_entry and not path.exists() and not looks_like_a_path
        first_entry = False
        if header:
            continue
        if not path.exists():
            raise AirwayInputError(
                f"Line {number} of {list_path} names {path}, which does not exist; fix or remove that line."
            )
        if not (_is_image_file(path) or (path.is_dir() and _holds_dicom(path))):
            raise AirwayInputError(
                f"Line {number} of {list_path} names {path}, which is neither a CT image "
                f"({', '.join(IMAGE_SUFFIXES)}) nor a folder of DICOM files; fix or remove that line."
            )
        cases.append(Case(_case_name(path), path))
    if not cases:
        raise AirwayInputError(f"The list file {list_path} names no CTs; put one CT path per line.")
    return cases


def _refuse_duplicate_names(cases: list[Case]) -> None:
    # Compared without case: on macOS and Windows, folders A and a are the same output folder.
    seen: dict[str, Case] = {}
    for case in cases:
        key = case.name.casefold()
        if key in seen:
            raise AirwayInputError(
                f"Two inputs would both be named {case.name} ({seen[key].path} and {case.path}); "
                "rename one so that every case has its own output folder."
            )
        seen[key] = case


def find_inputs(source: str | os.PathLike) -> tuple[list[Case], bool]:
    """The CTs named by ``source`` and whether they form a collection.

    Parameters
    ----------
    source : str or path-like
        One of

        - a CT image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``):
          one case;
        - a folder directly holding DICOM files (``.dcm``, or any file with ``DICM`` at
          byte 128): one case, a DICOM series;
        - any other folder: a collection of every CT image file in it (by name) and every
          sub-folder directly holding DICOM files; when it holds neither, the images of its
          ``imagesTr`` and ``imagesTs`` sub-folders (ATM'22 / nnU-Net layout);
        - a list file (``.txt``, ``.lst``, ``.list``, ``.csv``): a collection in the list's
          order.  One path per line, relative ones taken from the list file's folder;
          blank lines and lines starting with ``#`` are ignored; of a ``.csv`` only the first
          column is read, and a first line whose first cell is not an existing path is taken
          as a header.

        Hidden files and folders (names starting with ``.``) are ignored.

    Returns
    -------
    cases : list of Case
        The CTs, named as :class:`Case` describes.
    is_collection : bool
        True for a folder of CTs or a list file: each case then gets its own output folder.

    Raises
    ------
    AirwayInputError
        A missing source, a file that is neither a CT nor a list, an empty collection, a list
        line naming nothing usable (its line number is given), or two cases with one name.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise AirwayInputError(
            f"{path} does not exist; give a CT file, a DICOM folder, a folder of CTs or a list file."
        )
    if path.is_dir():
        if _holds_dicom(path):
            return [Case(_case_name(path), path)], False
        cases, is_collection = _collection_cases(path), True
    elif _is_image_file(path):
        return [Case(_case_name(path), path)], False
    elif path.name.lower().endswith(LIST_SUFFIXES):
        cases, is_collection = _list_cases(path), True
    else:
        raise AirwayInputError(
            f"{path} is neither a CT image ({', '.join(IMAGE_SUFFIXES)}), a folder nor a list file "
            f"({', '.join(LIST_SUFFIXES)}); give one of those."
        )
    _refuse_duplicate_names(cases)
    return cases, is_collection


def _shard_error(text: str) -> AirwayInputError:
    return AirwayInputError(
        f"Shard {text!r} is not of the form i/n with 1 <= i <= n (e.g. 2/8 for the second of eight shards)."
    )


def parse_shard(text: str) -> tuple[int, int]:
    """Parse a shard ``"i/n"`` (1-based: shard ``i`` of ``n``).

    Examples
    --------
    >>> parse_shard("2/8")
    (2, 8)
    """
    match = _SHARD_FORM.fullmatch(str(text))
    if match is None or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise _shard_error(text)
    return int(match.group(1)), int(match.group(2))


def select_shard(cases: list[Case], index: int, count: int) -> list[Case]:
    """The cases of shard ``index`` of ``count`` (1-based), dealt round-robin.

    Case ``k`` (0-based, in the listed order) goes to shard ``k % count + 1``, so every case
    is in exactly one shard and shard sizes differ by at most one.

    Examples
    --------
    >>> [c.name for c in select_shard([Case(n, Path(n)) for n in "abcde"], 2, 2)]
    ['b', 'd']
    """
    if not 1 <= index <= count:
        raise _shard_error(f"{index}/{count}")
    return list(cases[index - 1 :: count])


def input_fingerprint(path: Path) -> dict:
    """What identifies the input's content cheaply: its resolved path and file sizes and times.

    A file gives its size in bytes and ``mtime_ns``; a DICOM folder gives the number of its
    (non-hidden) files and one sha256 over their sorted names, sizes and ``mtime_ns``.
    """
    resolved = path.resolve()
    if not resolved.is_dir():
        stat = resolved.stat()
        return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    files = [entry for entry in _visible_entries(resolved) if entry.is_file()]
    for entry in files:
        stat = entry.stat()
        digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"path": str(resolved), "files": len(files), "sha256": digest.hexdigest()}


def _read_manifest(case_dir: Path) -> dict:
    """The manifest in ``case_dir``; an empty dict when there is none or it is unreadable."""
    try:
        manifest = json.loads((case_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _is_finished(case_dir: Path, fingerprint: dict, settings: dict) -> bool:
    manifest = _read_manifest(case_dir)
    outputs = manifest.get("outputs")
    return (
        isinstance(outputs, list)
        and manifest.get("input") == fingerprint
        and manifest.get("settings") == settings
        and all(isinstance(name, str) and (case_dir / name).exists() for name in outputs)
    )


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, AirwayInputError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _prefixed(progress: ProgressCallback, prefix: str) -> ProgressCallback:
    return lambda fraction, message: progress(fraction, prefix + message)


def _run_case(
    case: Case,
    case_dir: Path,
    process: ProcessCase,
    fingerprint: dict,
    settings: dict,
    progress: ProgressCallback | None,
) -> None:
    """Process one case and write its manifest last."""
    start = time.perf_counter()
    created = not case_dir.exists()
    case_dir.mkdir(parents=True, exist_ok=True)
    earlier = _manifest_outputs(case_dir)
    (case_dir / MANIFEST_NAME).unlink(missing_ok=True)
    # A redo that fails must not leave the last run's outputs beside no manifest, looking valid.
    for name in earlier:
        (case_dir / name).unlink(missing_ok=True)
    try:
        result = dict(process(case, case_dir, progress))
    except BaseException:
        _remove_if_empty(case_dir, created)
        raise
    outputs = result.pop("outputs", None)
    if not isinstance(outputs, list) or not all(isinstance(name, str) for name in outputs):
        raise TypeError(f"the case's work returned outputs {outputs!r}; expected a list of file names")
    missing = [name for name in outputs if not (case_dir / name).exists()]
    if missing:
        raise RuntimeError(f"the case's work did not write {', '.join(missing)}")
    write_json(
        {
            "case": case.name,
            "input": fingerprint,
            "settings": settings,
            "outputs": outputs,
            "info": result,
            "seconds": round(time.perf_counter() - start, 3),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        case_dir / MANIFEST_NAME,
    )


def _manifest_outputs(case_dir: Path) -> list[str]:
    """The file names an earlier manifest in ``case_dir`` lists (plain names only), else none."""
    outputs = _read_manifest(case_dir).get("outputs")
    if not isinstance(outputs, list):
        return []
    return [name for name in outputs if isinstance(name, str) and name and Path(name).name == name]


def _remove_if_empty(folder: Path, created: bool) -> None:
    """Remove a folder this run created when a failure left nothing in it."""
    if created and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def run_cases(
    cases: list[Case],
    out_dir: str | os.PathLike,
    process: ProcessCase,
    *,
    collection: bool,
    settings: Mapping,
    progress: ProgressCallback | None = None,
    skip_finished: bool = True,
) -> BatchSummary:
    """Run ``process`` on each case, skipping finished ones and going on past failures (in a collection).

    Parameters
    ----------
    cases : list of Case
        From :func:`find_inputs` (and :func:`select_shard`).
    out_dir : str or path-like
        Output folder; in a collection each case writes to ``out_dir / case.name``.
    process : callable
        ``process(case, case_dir, case_progress) -> {"outputs": [file names relative to
        case_dir], ...}``: does the work and writes the outputs, each atomically; the other
        keys (JSON-able) are kept in the manifest under ``info``.
    collection : bool
        As returned by :func:`find_inputs`: one output folder per case, and progress
        messages prefixed with the case name.
    settings : mapping
        Everything besides the input that decides the outputs (JSON-able); a case finished
        with other settings is redone.
    progress : callable, optional
        ``progress(fraction, message)``; case ``k`` of ``n`` covers ``[k/n, (k+1)/n]``.
    skip_finished : bool
        Skip cases whose manifest matches the input and settings and whose listed outputs
        all exist; False redoes every case.

    Returns
    -------
    BatchSummary
        Counts of done and skipped cases and the failures (name, one-line message).

    Raises
    ------
    Cancelled
        From ``progress`` or ``process``; also ``KeyboardInterrupt``.  The case under way
        keeps no manifest, so the next run redoes it.
    AirwayInputError
        ``out_dir`` cannot be created.
    Exception
        When ``collection`` is False, the error of the one case, as it was raised (a bad
        input stays a bad input).  In a collection, errors of single cases are not raised
        but reported in the summary.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    output_folder(out_dir)
    settings = json.loads(json.dumps(dict(settings)))  # as a manifest gives them back (tuples become lists)
    summary = BatchSummary()
    total = len(cases)
    for k, case in enumerate(cases):
        case_dir = out_dir / case.name if collection else out_dir
        case_progress = sub_progress(progress, k / total, (k + 1) / total)
        if collection and case_progress is not None:
            case_progress = _prefixed(case_progress, f"{case.name} ({k + 1}/{total}): ")
        try:
            if case.path.is_dir() and case_dir.resolve() == case.path.resolve():
                raise AirwayInputError(
                    f"The outputs of {case.name} would go into its own DICOM folder {case.path}; give another --out."
                )
            fingerprint = input_fingerprint(case.path)  # taken before the work: a change during it means redo
            if skip_finished and _is_finished(case_dir, fingerprint, settings):
                summary.skipped += 1
                report(case_progress, 1.0, f"already finished ({MANIFEST_NAME} matches), skipped")
                continue
            _run_case(case, case_dir, process, fingerprint, settings, case_progress)
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 -- one bad case must not stop the batch
            if not collection:
                _remove_if_empty(out_dir, created)
                raise
            message = _one_line(error)
            summary.failed.append((case.name, message))
            report(case_progress, 1.0, f"failed: {message}")
            continue
        summary.done += 1
    summary.seconds = time.perf_counter() - start
    report(progress, 1.0, summary.describe())
    return summary
