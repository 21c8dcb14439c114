"""Fetch a hertz-dev variant's checkpoint files from the Hugging Face Hub and verify them.

The transfer goes through ``huggingface_hub``'s public pieces: ``hf_hub_url`` and
``get_hf_file_metadata`` (which honour ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``) and
``file_download.http_get`` (progress bar, retries, ``Range`` requests). ``hf_hub_download`` itself is
not used because it deletes its partial file when a call fails, so an interrupted 13 GB transfer would
start again from zero on the next run. Here the bytes received go to ``dest/.partial/<name>.part``,
next to a small JSON sidecar recording the remote file's etag and size; the next run resumes from
where the last one stopped, unless the remote file changed (another etag), in which case it starts
over. A finished file is checked against its md5 and only then renamed into place, so a file under
its final name is always complete.

This module adds what the Hub cannot know: the md5 sums of the official files, skipping files that
are already in place and correct, and errors that tell the user what to do next.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hertz_agents.registry import REPO_ID, CheckpointFile, Variant, get_variant, md5_file

logger = logging.getLogger(__name__)

HUB_PAGE = f"https://huggingface.co/{REPO_ID}/tree/main"

PARTIAL_DIR = ".partial"
"""Sub-directory of the destination that holds interrupted transfers until a later run completes them."""


class DownloadError(RuntimeError):
    """A checkpoint file could not be fetched.

    Attributes:
        filename: The file that failed.
    """

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(message)
        self.filename = filename


class ChecksumError(DownloadError):
    """A fetched file's md5 differs from the registry's; the bad file has been deleted.

    Attributes:
        filename: The file that failed.
        expected: The md5 the registry expects.
        actual: The md5 of the bytes received.
    """

    def __init__(self, filename: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{filename}: md5 {actual} does not match the expected {expected}; the file was corrupted in "
            "transfer or the endpoint serves different bytes. The bad file has been deleted: run the "
            "download again.",
            filename=filename,
        )
        self.expected = expected
        self.actual = actual


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not reach the endpoint", across huggingface_hub versions.

    huggingface_hub >= 1.0 talks HTTP through httpx (2.x through ``httpx2``), older releases through
    requests; the builtin ``ConnectionError`` covers ``OfflineModeIsEnabled``.
    """
    from huggingface_hub.utils import LocalEntryNotFoundError

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def manual_download_hint(variant: str | Variant, dest_dir: str | Path) -> str:
    """How to install a variant's files by hand, as text for an error message or the CLI.

    Args:
        variant: A variant name or :class:`Variant`.
        dest_dir: The directory the files belong in.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    names = "\n".join(f"  {name}" for name in v.filenames)
    return (
        f"To install the weights by hand, fetch these files from {HUB_PAGE} on a machine with access "
        f"and copy them into {Path(dest_dir).resolve()}:\n{names}\n"
        "Then run the download again: files already in place are checked against their md5 and not "
        "fetched. Behind a Hub mirror, set HF_ENDPOINT to its address."
    )


def download_variant(
    variant: str | Variant,
    dest_dir: str | Path,
    *,
    endpoint: str | None = None,
    verify: bool = True,
    progress: bool = True,
    md5_overrides: Mapping[str, str] | None = None,
    repo_id: str = REPO_ID,
    revision: str | None = None,
) -> Path:
    """Download every file of a variant into ``dest_dir`` and verify its md5.

    Files already in ``dest_dir`` are kept when their md5 matches (or, with ``verify=False``, when
    they exist); a present file with the wrong md5 is deleted and fetched again. A transfer cut short
    (network loss, Ctrl-C) leaves its bytes under ``dest_dir/.partial``; the next call resumes it with
    a ``Range`` request, or starts it over if the file on the Hub has changed since.

    Args:
        variant: A name from :data:`hertz_agents.registry.VARIANTS` or a :class:`Variant`.
        dest_dir: Directory to put the files in (created if needed).
        endpoint: Hub address; None uses ``HF_ENDPOINT`` or huggingface.co.
        verify: Check md5 sums. Without it, present files are trusted and fetched files unchecked.
        progress: Show transfer and hashing progress bars.
        md5_overrides: File name -> md5 to expect instead of the registry's (a mirror serving
            different bytes, or tests).
        repo_id: The Hub repository.
        revision: Branch, tag or commit; None means ``main``.

    Returns:
        ``dest_dir`` as a :class:`Path`.

    Raises:
        KeyError: Unknown variant name, or an override for a file outside the variant.
        ChecksumError: A fetched file's md5 is wrong (the file is deleted).
        DownloadError: The endpoint is unreachable, refused the request, or the transfer failed.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    if md5_overrides:
        v = v.with_md5(md5_overrides)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for f in v.files:
        path = dest / f.name
        if path.is_file():
            if not verify:
                logger.info("%s: present, not verified (verify=False)", f.name)
                continue
            actual = md5_file(path, progress=progress)
            if actual == f.md5:
                logger.info("%s: present, md5 ok", f.name)
                continue
            logger.warning("%s: present but md5 %s != %s; fetching it again", f.name, actual, f.md5)
            path.unlink()
        _fetch(v, f, dest, endpoint=endpoint, verify=verify, progress=progress, repo_id=repo_id, revision=revision)
    return dest


@dataclass(frozen=True)
class _Partial:
    """Where an unfinished transfer of one file lives between runs.

    Attributes:
        data: The bytes received so far, ``dest/.partial/<name>.part``.
        sidecar: JSON ``{"etag": ..., "size": ...}`` of the remote file those bytes belong to.
        lock: Keeps two processes from appending to the same ``data`` at once.
    """

    data: Path
    sidecar: Path
    lock: Path

    @classmethod
    def of(cls, dest: Path, name: str) -> _Partial:
        folder = dest / PARTIAL_DIR
        return cls(folder / f"{name}.part", folder / f"{name}.json", folder / f"{name}.lock")

    def size(self) -> int:
        """Bytes kept so far (0 when there is no partial file)."""
        return self.data.stat().st_size if self.data.is_file() else 0

    def resume_offset(self, etag: str, size: int | None) -> int:
        """How many kept bytes to resume from for the remote file ``(etag, size)``.

        Bytes recorded for another remote file (its etag or size changed), or more bytes than the file
        has, are discarded and 0 is returned; the sidecar then names the new remote file.
        """
        try:
            recorded = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):  # no sidecar, or one torn by a crash: its bytes cannot be trusted
            recorded = None
        have = self.size()
        if recorded == {"etag": etag, "size": size} and (size is None or have <= size):
            return have
        if have:
            logger.info("%s: the remote file changed; discarding %d bytes of an earlier transfer", self.data.stem, have)
        self.data.unlink(missing_ok=True)
        self.sidecar.write_text(json.dumps({"etag": etag, "size": size}))
        return 0

    def discard(self) -> None:
        """Delete the kept bytes and their sidecar."""
        self.data.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def tidy(self) -> None:
        """Once the lock is released: remove the lock file, a sidecar without bytes, and ``.partial`` once empty.

        Best effort. Kept bytes and their sidecar stay for the next run.
        """
        if not self.data.exists():
            self.sidecar.unlink(missing_ok=True)
        self.lock.unlink(missing_ok=True)
        try:
            self.data.parent.rmdir()
        except OSError:  # other files still in progress, or another process is using it
            pass


def _fetch(
    v: Variant,
    f: CheckpointFile,
    dest: Path,
    *,
    endpoint: str | None,
    verify: bool,
    progress: bool,
    repo_id: str,
    revision: str | None,
) -> None:
    """Fetch one file into ``dest``, resuming an earlier partial transfer; errors become :class:`DownloadError`."""
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import HfHubHTTPError, WeakFileLock

    where = f"{(endpoint or hub_constants.ENDPOINT).rstrip('/')}/{repo_id}"
    partial = _Partial.of(dest, f.name)
    path = dest / f.name
    try:
        partial.data.parent.mkdir(exist_ok=True)
        with WeakFileLock(partial.lock):
            if path.is_file():  # another process finished it while this one waited for the lock
                return
            _transfer(f.name, partial, where, endpoint=endpoint, progress=progress, repo_id=repo_id, revision=revision)
            if verify:
                actual = md5_file(partial.data, progress=progress)
                if actual != f.md5:
                    partial.discard()
                    raise ChecksumError(f.name, expected=f.md5, actual=actual)
            os.replace(partial.data, path)
            partial.discard()
    except HfHubHTTPError as err:  # before the network errors: in huggingface_hub 2.x it is an httpx error
        status = getattr(getattr(err, "response", None), "status_code", "an error")
        raise DownloadError(
            f"Could not download {f.name}: {where} answered {status} ({err}). Check the endpoint "
            f"(HF_ENDPOINT) and the repository name.{_kept_note(partial)}\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except _network_errors() as err:
        raise DownloadError(
            f"Could not download {f.name} from {where}: the machine seems to be offline or the endpoint "
            f"is unreachable ({type(err).__name__}: {err}).{_kept_note(partial)}\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except OSError as err:  # e.g. the Hub's size consistency check, or a full disk
        raise DownloadError(
            f"Downloading {f.name} from {where} failed: {err}\nRun the download again; "
            f"files already complete are kept.{_kept_note(partial)}",
            filename=f.name,
        ) from err
    finally:
        partial.tidy()


def _transfer(
    name: str,
    partial: _Partial,
    where: str,
    *,
    endpoint: str | None,
    progress: bool,
    repo_id: str,
    revision: str | None,
) -> None:
    """Bring ``partial.data`` up to the whole remote file: ask the Hub for its etag and size, then append."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if _offline_mode():
        raise ConnectionError("offline mode is enabled (HF_HUB_OFFLINE is set)")
    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, **_supported(get_hf_file_metadata, endpoint=endpoint, retry_on_errors=True))
    if meta.commit_hash is None or meta.etag is None:
        # What the Hub client checks as well: a proxy or captive portal answers 200 without these headers.
        raise DownloadError(
            f"{where} answered for {name} without the X-Repo-Commit and ETag headers of a Hugging Face Hub: "
            "check HF_ENDPOINT and any proxy between this machine and the Hub.",
            filename=name,
        )
    have = partial.resume_offset(meta.etag, meta.size)
    if have:
        logger.info("%s: resuming at byte %d of %s", name, have, meta.size)
    if meta.size is not None:
        _warn_if_disk_is_short(partial.data.parent, meta.size - have)
    # Pin the commit that the etag came from, so every request of this run (retries included) gets the same bytes.
    url = hf_hub_url(repo_id, name, revision=meta.commit_hash, endpoint=endpoint)
    quiet = _quiet_tqdm_class() if not progress else None
    kwargs = _supported(http_get, tqdm_class=quiet) if quiet is not None else {}
    with _progress_bars_disabled(quiet is not None and not kwargs), partial.data.open("ab") as fh:
        http_get(
            url,
            fh,
            resume_size=have,
            headers=build_hf_headers(),
            expected_size=meta.size,
            displayed_filename=name,
            **kwargs,
        )


def _offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on. Newer clients refuse requests themselves; this covers older ones too."""
    from huggingface_hub import constants as hub_constants

    is_offline = getattr(hub_constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline is not None else hub_constants.HF_HUB_OFFLINE)


def _supported(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that ``fn`` accepts: releases since huggingface_hub 0.24 (our floor) grew some."""
    params = inspect.signature(fn).parameters
    return {k: value for k, value in kwargs.items() if k in params}


def _kept_note(partial: _Partial) -> str:
    """A sentence for error messages saying how much of the file was kept for the next run, if any."""
    have = partial.size()
    if not have:
        return ""
    amount = f"{have / 1e9:.2f} GB" if have >= 1e9 else f"{have / 1e6:.1f} MB" if have >= 1e6 else f"{have} bytes"
    return f" The {amount} received so far are kept in {partial.data}; the next run resumes from there."


def _warn_if_disk_is_short(folder: Path, needed: int) -> None:
    """Warn (without failing: the estimate may be off) when ``folder`` has less than ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        logger.warning("%s has %.1f GB free but %.1f GB remain to download", folder, free / 1e9, needed / 1e9)


def _quiet_tqdm_class() -> type:
    """A tqdm class that never draws, for ``http_get(tqdm_class=...)``."""
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


@contextmanager
def _progress_bars_disabled(active: bool) -> Iterator[None]:
    """Silence the Hub's own bars for older releases whose ``http_get`` takes no ``tqdm_class``."""
    if not active:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
