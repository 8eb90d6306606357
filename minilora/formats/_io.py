"""Writing files and folders atomically: a reader sees the old one or the whole new one, never
half, and never a mix of old and new. Errors name the user's path, not a temporary one."""

import os
import shutil
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overwrite(path, inputs):
    """ValueError if ``path`` is one of the ``inputs`` files (``-o case.npz`` on case.npz)."""
    for source in inputs:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise ValueError(f"{path}: refusing to write over the input {source}")


def _renamed_error(e, path):
    """The same OSError, naming ``path`` instead of a temporary file."""
    if isinstance(e, OSError) and e.errno is not None:
        return type(e)(e.errno, e.strerror, os.fspath(path))
    return e


def write_atomic(path, data: bytes):
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and a rename.

    The file gets the permissions a plain ``open(path, "w")`` would (0666 less the umask).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _renamed_error(e, path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_folder_atomic(path, files):
    """Make ``path`` a folder holding ``files`` (name -> bytes) in one step.

    The new files are written into a temporary sibling folder, beside hard links to every other
    entry of the existing folder (so a README or tokenizer files there survive), fsynced, and the
    two folders are swapped by two renames. Until then the old folder is untouched; a failure or
    an interruption between the renames puts it back. Only a crash of the whole process between
    them leaves it, whole, under ``.<name>.old-*`` instead of ``path``: never a mix.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(20, "Not a directory", path)
    tmp = old = None
    try:
        os.makedirs(parent, exist_ok=True)  # as PEFT's save_pretrained makes the folders
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(path):
            for entry in os.listdir(path):
                if entry not in files:
                    _link_tree(os.path.join(path, entry), os.path.join(tmp, entry))
        for filename, data in files.items():
            with open(os.path.join(tmp, filename), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        tmp = None
    except BaseException as e:  # OSError, and KeyboardInterrupt between the two renames
        if old is not None and not os.path.exists(path):
            os.rename(old, path)  # put the old folder back
            old = None
        if isinstance(e, OSError):
            raise _renamed_error(e, path) from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _link_tree(src, dst):
    """Hard-link a file (or, recursively, a folder's files) into the new folder."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
