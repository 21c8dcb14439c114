"""Fetch a hertz-dev variant's checkpoint files from the Hugging Face Hub and verify them.

The transfer itself is ``huggingface_hub.hf_hub_download``: it honours ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE``, shows progress, retries and resumes an interrupted transfer within a call, and
writes each file atomically (a partial file never appears under the final name). This module adds
what the Hub cannot know: the md5 sums of the official files, skipping files that are already in
place and correct, and errors that tell the user what to do next.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    they exist); a present file with the wrong md5 is deleted and fetched again.

    Args:
        variant: A name from :data:`hertz_agents.registry.VARIANTS` or a :class:`Variant`.
        dest_dir: Directory to put the files in (created if needed). The Hub also keeps small
            bookkeeping files under ``dest_dir/.cache/huggingface``.
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
        _fetch(v, f, dest, endpoint=endpoint, progress=progress, repo_id=repo_id, revision=revision)
        if verify:
            actual = md5_file(path, progress=progress)
            if actual != f.md5:
                path.unlink(missing_ok=True)
                raise ChecksumError(f.name, expected=f.md5, actual=actual)
    return dest


def _fetch(
    v: Variant,
    f: CheckpointFile,
    dest: Path,
    *,
    endpoint: str | None,
    progress: bool,
    repo_id: str,
    revision: str | None,
) -> None:
    """Fetch one file with ``hf_hub_download``, turning its errors into :class:`DownloadError`."""
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import HfHubHTTPError

    where = f"{(endpoint or hub_constants.ENDPOINT).rstrip('/')}/{repo_id}"
    kwargs: dict[str, Any] = {}
    quiet = _quiet_tqdm_class() if not progress else None
    accepts_tqdm_class = "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters
    if quiet is not None and accepts_tqdm_class:
        kwargs["tqdm_class"] = quiet
    try:
        with _progress_bars_disabled(quiet is not None and not accepts_tqdm_class):
            huggingface_hub.hf_hub_download(
                repo_id, f.name, revision=revision, local_dir=dest, endpoint=endpoint, **kwargs
            )
    except HfHubHTTPError as err:  # before the network errors: in huggingface_hub 2.x it is an httpx error
        status = getattr(getattr(err, "response", None), "status_code", "an error")
        raise DownloadError(
            f"Could not download {f.name}: {where} answered {status} ({err}). Check the endpoint "
            f"(HF_ENDPOINT) and the repository name.\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except _network_errors() as err:
        raise DownloadError(
            f"Could not download {f.name} from {where}: the machine seems to be offline or the endpoint "
            f"is unreachable ({type(err).__name__}: {err}).\n{manual_download_hint(v, dest)}",
            filename=f.name,
        ) from err
    except OSError as err:  # e.g. the Hub's size consistency check, or a full disk
        raise DownloadError(
            f"Downloading {f.name} from {where} failed: {err}\nRun the download again; "
            "files already complete are kept.",
            filename=f.name,
        ) from err


def _quiet_tqdm_class() -> type:
    """A tqdm class that never draws, for ``hf_hub_download(tqdm_class=...)``."""
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


@contextmanager
def _progress_bars_disabled(active: bool) -> Iterator[None]:
    """Silence the Hub's own bars for older releases whose ``hf_hub_download`` takes no ``tqdm_class``."""
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
