"""Output sets written all or nothing: a run claims its prefix, writes under its own names, commits at the end.

A run's outputs (``PREFIX.dcd``, ``PREFIX.pdb``, ``PREFIX.json``, ``PREFIX.bias.npy``, ...) are one set: the
JSON describes the files beside it. Two faults broke that (issue 13, items 7 and 8): two runs with the same
prefix wrote into the same temporary files (one reported "wrote x.dcd (200 frames)" while ``x.dcd`` claimed
300 frames of which 2 could be read, the other died with a FileNotFoundError), and a rerun deleted an
earlier biased run's ``x.bias.npy`` and renamed its own PDB into place at start-up, so a killed rerun left a
mixed set. :class:`OutputSet` keeps three rules:

* **Claim.** ``PREFIX.lock`` is opened and locked with ``flock(LOCK_EX | LOCK_NB)``; a second run on the
  same prefix refuses in one sentence. The kernel drops the lock when its holder dies, SIGKILL included, so
  a killed run never blocks the prefix (an ``O_CREAT | O_EXCL`` file alone would, until removed by hand).
  Where ``fcntl`` is missing (Windows) the lock file is created with ``O_CREAT | O_EXCL`` instead.
* **Write apart.** Every file goes to ``PREFIX<suffix>.<run id>.partial``; nothing of an earlier run is
  removed or replaced while the run works. A killed or failed run leaves only ``*.partial`` files, which the
  next run on the prefix removes when it claims it.
* **Commit together.** Data files are renamed into place first, the JSON (with the run id and each file's
  size) last, and only then are the set's files this run did not write removed (an earlier biased run's
  ``PREFIX.bias.npy``, an earlier run's trajectory in the other format). A kill between these
  renames (microseconds) can leave data files newer than the JSON: :func:`check_output_set` detects it
  from the recorded sizes, and ``read_metadata`` refuses such a set.
"""

from __future__ import annotations

import glob
import json
import os
import re
import uuid

from ..errors import ConfSampleError

try:
    import fcntl
except ImportError:  # Windows: exclusive creation instead of a lock the kernel releases
    fcntl = None

_PARTIAL = re.compile(r"\.[0-9a-f]{12}\.partial")


def write_json(path: str, payload: dict) -> None:
    """Write JSON through a temporary file and a rename."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.partial"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


class OutputSet:
    """The files of one run under ``prefix``, claimed at ``claim()`` (or ``with``) and replaced together at ``commit``.

    Parameters
    ----------
    prefix : str
        Output path without extension; files are ``prefix + suffix``.
    suffixes : sequence of str
        Every suffix a run under this prefix may write, e.g. ``('.dcd', '.xtc', '.pdb', '.json', '.bias.npy')``;
        one the run does not write is an earlier run's and goes at commit.

    Examples
    --------
    >>> import os, tempfile
    >>> prefix = os.path.join(tempfile.mkdtemp(), "run")
    >>> with OutputSet(prefix, (".txt", ".json")) as outputs:
    ...     with open(outputs.temporary(".txt"), "w") as handle:
    ...         _ = handle.write("data")
    ...     paths = outputs.commit({"what": "example"})
    >>> sorted(os.path.basename(p) for p in paths.values())
    ['run.json', 'run.txt']
    """

    def __init__(self, prefix, suffixes):
        self.prefix = os.fspath(prefix)
        self.suffixes = tuple(suffixes)
        self.run_id = uuid.uuid4().hex[:12]
        self._temporaries: dict[str, str] = {}
        self._lock_fd: int | None = None
        self.lock_path = self.prefix + ".lock"

    def path(self, suffix: str) -> str:
        """The final path of ``suffix``."""
        return self.prefix + suffix

    # -- claim ---------------------------------------------------------------------------------------
    def claim(self) -> "OutputSet":
        """Lock the prefix for this run (one sentence if another run holds it); remove dead runs' partials."""
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self._lock_fd = _lock(self.lock_path, self.prefix)
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"pid {os.getpid()} run {self.run_id}\n".encode())
        # Holding the lock, any partial file of this prefix belongs to a run that died or failed.
        for suffix in self.suffixes:
            for leftover in glob.glob(glob.escape(self.path(suffix)) + ".*.partial"):
                if _PARTIAL.fullmatch(leftover[len(self.path(suffix)):]):
                    _remove(leftover)
        return self

    def release(self) -> None:
        """Give the prefix back (unlink while still holding the lock, so nobody locks a file about to vanish)."""
        if self._lock_fd is None:
            return
        _remove(self.lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "OutputSet":
        return self.claim()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # -- write and commit -------------------------------------------------------------------------------
    def temporary(self, suffix: str) -> str:
        """This run's temporary path for ``suffix`` (committed to ``prefix + suffix``)."""
        if self._lock_fd is None:
            raise RuntimeError("claim() the output set before writing into it.")
        if suffix not in self.suffixes:
            raise ValueError(f"suffix '{suffix}' is not one of this output set's {self.suffixes}.")
        if suffix not in self._temporaries:
            self._temporaries[suffix] = f"{self.prefix}{suffix}.{self.run_id}.partial"
        return self._temporaries[suffix]

    def commit(self, metadata: dict, metadata_suffix: str = ".json") -> dict:
        """Rename every temporary file into place, the JSON ``metadata`` last; then remove the earlier set's extras.

        ``metadata`` gets ``run_id`` and ``files`` (basename -> size in bytes of each data file) added. Files of
        the declared suffixes that this run did not write are removed once the new JSON is in place.
        Returns suffix -> final path.
        """
        if self._lock_fd is None:
            raise RuntimeError("claim() the output set before committing it.")
        data = {suffix: tmp for suffix, tmp in self._temporaries.items() if suffix != metadata_suffix}
        for tmp in data.values():
            _sync(tmp)
        files = {os.path.basename(self.path(suffix)): os.path.getsize(tmp) for suffix, tmp in data.items()}
        json_tmp = self.temporary(metadata_suffix)
        with open(json_tmp, "w") as handle:
            json.dump({**metadata, "run_id": self.run_id, "files": files}, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        for suffix, tmp in data.items():
            os.replace(tmp, self.path(suffix))
        os.replace(json_tmp, self.path(metadata_suffix))
        for suffix in set(self.suffixes) - set(data) - {metadata_suffix}:
            _remove(self.path(suffix))
        self._temporaries.clear()
        return {suffix: self.path(suffix) for suffix in [*data, metadata_suffix]}


def check_output_set(metadata_path: str, metadata: dict) -> None:
    """Refuse a JSON that does not describe the files beside it (sizes recorded at commit differ or files are gone)."""
    directory = os.path.dirname(os.path.abspath(metadata_path))
    for name, size in (metadata.get("files") or {}).items():
        path = os.path.join(directory, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise ConfSampleError(
                f"metadata '{metadata_path}' (run {metadata.get('run_id')}) recorded {size} bytes for '{name}' but it "
                f"{found}: the files beside it come from different runs (a run killed while committing?); rerun it."
            )


def _lock(lock_path: str, prefix: str) -> int:
    refusal = (f"output prefix '{prefix}' is in use by another run (lock file '{lock_path}'); wait for it to "
               f"finish or choose another output prefix.")
    if fcntl is None:
        try:
            return os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            raise ConfSampleError(refusal + " Remove the lock file if no run is using it.") from None
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfSampleError(refusal) from None
        try:  # the holder before us may have unlinked the file between our open and our lock: lock the new one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
