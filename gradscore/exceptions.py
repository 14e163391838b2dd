"""One error hierarchy for gradscore.

Every message states the cause and the fix. The CLI prints ``str(err)`` as a single
line on stderr and exits with code 2 for any :class:`GradscoreError`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings


class GradscoreError(Exception):
    """Base class of every error gradscore raises on bad input or state."""


class GradscoreWarning(UserWarning):
    """Numbers were written, but may not mean what they seem (e.g. a diverged PDS co-state),
    or a step could not be done now and gradscore went on (an in-run flush on a full disk)."""


#: where the frames a warning is not pointed at run: gradscore, and contextlib between a with
#: statement and a context manager of gradscore's (torch too: :func:`_torch_folder`; a recorder's
#: checks run inside torch's forward and backward, at no fixed depth below the user's line)
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, contextlib.__file__)


def warn(text: str) -> None:
    """A :class:`GradscoreWarning`, pointed at the user's line: the first frame outside
    gradscore and torch (the outermost one there is, where a thread runs only theirs)."""
    frame, level = sys._getframe(1), 2
    internal = _INTERNAL + _torch_folder()
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(text, GradscoreWarning, stacklevel=level)


def _torch_folder() -> tuple[str, ...]:
    """torch's package folder, if torch is loaded (a warning before it needs none)."""
    torch = sys.modules.get("torch")
    path = getattr(torch, "__file__", None)
    return (os.path.dirname(os.path.abspath(path)) + os.sep,) if path else ()


class ConfigError(GradscoreError, ValueError):
    """An option has an invalid value; the message names the field."""


class CheckpointError(GradscoreError):
    """A checkpoint file or directory is missing, corrupt or does not fit the model."""


class DataError(GradscoreError):
    """A dataset file is missing a field, has inconsistent lengths or bad labels."""


class EngineError(GradscoreError):
    """The model cannot be scored as given (e.g. train-mode BatchNorm, unknown loss)."""


class ConfigMismatchError(GradscoreError):
    """An existing output was made with a different configuration."""

    #: what differs, where a finished output was made with other settings (None: other cases)
    differ: str | None = None


def one_line(text: str) -> str:
    """Collapse whitespace so an error prints on one line."""
    return " ".join(str(text).split())


class OutputError(GradscoreError):
    """An output path would overwrite an input, or a file that is not a gradscore output of
    that kind, or an existing output without --overwrite."""


def cause(e: BaseException, width: int = 200) -> str:
    """``Type: the first line of its message`` (at most ``width`` characters): another
    library's error as the cause part of one of ours."""
    text = str(e).splitlines()[0][:width] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def model_fix(e: BaseException) -> str | None:
    """The fix for a model whose own backward fails in eval mode, where gradscore takes its
    gradients, whatever the engine (torch's error ``e``); None for another failure."""
    text = str(e)
    if "modified by an inplace operation" in text:
        return ("in eval mode the model changes in place a tensor its backward reads (Hugging Face's RWKV "
                "updates its cached state so: set model.config.use_cache = False before scoring)")
    if "backward through the graph a second time" in text:
        return ("the model reads a tensor the model kept from an earlier call (a cache or a state kept between calls, "
                "as timm's LeViT and EfficientViT-M cache attention biases in eval mode), whose graph that call's "
                "backward freed; each example's gradient needs a forward of its own: clear the cache (for those, "
                "model.train(); model.eval()), or score with engine 'ghost', which takes a batch in one call")
    return None


#: what to do about a damaged output of gradscore
RESTORE = "restore the file from a copy or rerun the command that wrote it"


def damaged(path: object, e: BaseException | str, what: str = "", fix: str = RESTORE) -> GradscoreError:
    """The error for a file gradscore wrote that fails its checksums: ``path: what is damaged (e); fix``.
    A file whose lock HDF5 could not take is whole: its error is :func:`lock_refused`'s."""
    return lock_refused(path, e) or GradscoreError(f"{path}: {what + ' ' if what else ''}is damaged ({e}); {fix}")


class FileLockError(GradscoreError):
    """HDF5 could not take its lock on a file, which is whole: another process holds it open
    (a notebook's ``h5py.File(path, "a")``, a running writer), or the file system has no locks."""


#: errnos of a file system without the locks HDF5 takes (some network file systems)
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})


def lock_fix(e: BaseException | str) -> str | None:
    """Why HDF5 refused to lock a file (``e``, h5py's OSError) and what to do; None for another error."""
    if not (isinstance(e, OSError) and "unable to lock file" in str(e)):
        return None
    if e.errno in NO_LOCKS:
        return (f"this file system does not support the file locks HDF5 takes ({os.strerror(e.errno)}); "
                f"set HDF5_USE_FILE_LOCKING=FALSE in the environment and rerun")
    return ("another process holds it open (HDF5's file lock refused it here); close the file there "
            "(e.g. a notebook's h5py.File) or let that process end, then rerun")


def lock_refused(path: object, e: BaseException | str) -> FileLockError | None:
    """The error for HDF5's refusal to lock ``path`` (``e``); None for another error."""
    fix = lock_fix(e)
    return FileLockError(f"{path}: {fix}") if fix else None
