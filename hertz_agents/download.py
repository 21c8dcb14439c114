"""Fetch a hertz-dev variant's checkpoint files from the Hugging Face Hub and verify them.

The transfer goes through ``huggingface_hub``'s public pieces: ``hf_hub_url`` and
``get_hf_file_metadata`` (which honour ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``) and
``file_download.http_get`` (progress bar, retries, ``Range`` requests). ``hf_hub_download`` itself
is not used because it deletes its partial file when a call fails, so an interrupted 13 GB transfer
would start again from zero on the next run. Here the bytes received go to
``dest/.partial/<name>.part``, next to a small JSON sidecar recording the remote file's etag and
size; the next run resumes from where the last one stopped, unless the remote file changed (another
etag), in which case it starts over. A finished file is checked against its md5 and only then
renamed into place, so a file under its final name is always complete.

This module adds what the Hub cannot know: the md5 sums of the official files, skipping files that
are already in place and correct, and errors that tell the user what to do next.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hertz_agents.partial_file import PARTIAL_DIR as PARTIAL_DIR  # public: where partial bytes wait
from hertz_agents.partial_file import PartialFile, kept_note
from hertz_agents.registry import REPO_ID, CheckpointFile, Variant, get_variant, md5_file

logger = logging.getLogger(__name__)

HUB_PAGE = f"https://huggingface.co/{REPO_ID}/tree/main"


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
            f"{filename}: md5 {actual} does not match the expected {expected}; the file was "
            "corrupted in transfer or the endpoint serves different bytes. The bad file has been "
            "deleted: run the download again.",
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
        f"To install the weights by hand, fetch these files from {HUB_PAGE} on a machine with "
        f"access and copy them into {Path(dest_dir).resolve()}:\n{names}\nThen run the download "
        "again: files already in place are checked against their md5 and not fetched. Behind a Hub "
        "mirror, set HF_ENDPOINT to its address."
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
    they exist); a present file with the wrong md5 is deleted and fetched again. A transfer cut
    short (network loss, Ctrl-C) leaves its bytes under ``dest_dir/.partial``; the next call resumes
    it with a ``Range`` request, or starts it over if the file on the Hub has changed since.

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
    created = [p for p in (dest, *dest.parents) if not p.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _download_files(v, dest, _Source(repo_id, revision, endpoint, verify, progress))
    except BaseException:
        _remove_if_empty(created)  # a failed first download leaves no empty folder behind
        raise
    return dest


@dataclass(frozen=True)
class _Source:
    """Where the files come from, and how they are fetched."""

    repo_id: str
    revision: str | None
    endpoint: str | None
    verify: bool
    progress: bool

    @property
    def where(self) -> str:
        """The repository's address, for messages."""
        from huggingface_hub import constants as hub_constants

        return f"{(self.endpoint or hub_constants.ENDPOINT).rstrip('/')}/{self.repo_id}"

    def url(self, name: str, revision: str | None) -> str:
        """The address of file ``name`` at ``revision``."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=revision, endpoint=self.endpoint)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this run created (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (kept partial bytes, other files) or already gone
            return


def _download_files(v: Variant, dest: Path, source: _Source) -> None:
    """Fetch every file of ``v`` that is not already in ``dest`` with the right md5."""
    for f in v.files:
        path = dest / f.name
        if path.is_file():
            if not source.verify:
                logger.info("%s: present, not verified (verify=False)", f.name)
                continue
            actual = md5_file(path, progress=source.progress)
            if actual == f.md5:
                logger.info("%s: present, md5 ok", f.name)
                continue
            logger.warning("%s: present but md5 %s != %s; fetching it again", f.name, actual, f.md5)
            path.unlink()
        _fetch(v, f, dest, source)


def _fetch(v: Variant, f: CheckpointFile, dest: Path, source: _Source) -> None:
    """Fetch one file into ``dest``, resuming an earlier partial transfer.

    Raises:
        DownloadError: The transfer failed (HTTP error, network, disk) or its md5 is wrong.
    """
    from huggingface_hub.utils import HfHubHTTPError, WeakFileLock

    where = source.where
    partial = PartialFile.of(dest, f.name)
    path = dest / f.name
    try:
        partial.data.parent.mkdir(exist_ok=True)
        with WeakFileLock(partial.lock):
            if path.is_file():  # another process finished it while this one waited for the lock
                return
            _transfer(f.name, partial, source)
            if source.verify:
                actual = md5_file(partial.data, progress=source.progress)
                if actual != f.md5:
                    partial.discard()
                    raise ChecksumError(f.name, expected=f.md5, actual=actual)
            os.replace(partial.data, path)
            partial.discard()
    # Before the network errors: in huggingface_hub 2.x it is an httpx error.
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "an error")
        raise DownloadError(
            f"Could not download {f.name}: {where} answered {status} ({err}). Check the endpoint "
            "(HF_ENDPOINT) and the repository "
            f"name.{kept_note(partial)}\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except _network_errors() as err:
        raise DownloadError(
            f"Could not download {f.name} from {where}: the machine seems to be offline or the "
            f"endpoint is unreachable ({type(err).__name__}: "
            f"{err}).{kept_note(partial)}\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except OSError as err:  # e.g. the Hub's size consistency check, or a full disk
        raise DownloadError(
            f"Downloading {f.name} from {where} failed: {err}\nRun the download again; "
            f"files already complete are kept.{kept_note(partial)}",
            filename=f.name,
        ) from err
    finally:
        partial.tidy()


def _transfer(name: str, partial: PartialFile, source: _Source) -> None:
    """Bring ``partial.data`` up to the whole remote file.

    Asks the Hub for the file's etag and size, then appends the missing bytes.
    """
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if _offline_mode():
        raise ConnectionError("offline mode is enabled (HF_HUB_OFFLINE is set)")
    url = source.url(name, source.revision)
    # No retries for this first request: offline, the Hub client would back off for about 25 s
    # before failing. Once it answers, the transfer itself retries and resumes.
    options = _supported(get_hf_file_metadata, endpoint=source.endpoint, retry_on_errors=False)
    meta = get_hf_file_metadata(url, **options)
    if meta.commit_hash is None or meta.etag is None:
        # What the Hub client checks as well: a proxy or captive portal answers 200 without these
        # headers.
        raise DownloadError(
            f"{source.where} answered for {name} without the X-Repo-Commit and ETag headers of a "
            "Hugging Face Hub: check HF_ENDPOINT and any proxy between this machine and the Hub.",
            filename=name,
        )
    have = partial.resume_offset(meta.etag, meta.size)
    if have:
        logger.info("%s: resuming at byte %d of %s", name, have, meta.size)
    if meta.size is not None:
        _warn_if_disk_is_short(partial.data.parent, meta.size - have)
    # Pin the commit that the etag came from, so every request of this run (retries included) gets
    # the same bytes.
    url = source.url(name, meta.commit_hash)
    quiet = _quiet_tqdm_class() if not source.progress else None
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
    """Whether ``HF_HUB_OFFLINE`` is on.

    Newer clients refuse requests themselves; this covers older ones too.
    """
    from huggingface_hub import constants as hub_constants

    is_offline = getattr(hub_constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline is not None else hub_constants.HF_HUB_OFFLINE)


def _supported(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that ``fn`` accepts.

    Releases since huggingface_hub 0.24 (our floor) grew some.
    """
    params = inspect.signature(fn).parameters
    return {k: value for k, value in kwargs.items() if k in params}


def _warn_if_disk_is_short(folder: Path, needed: int) -> None:
    """Warn when ``folder`` has less than ``needed`` bytes free.

    Only a warning: the estimate may be off.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        logger.warning(
            "%s has %.1f GB free but %.1f GB remain to download", folder, free / 1e9, needed / 1e9
        )


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
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
