"""Task data in: JSONL, JSON, Parquet or an HF dataset -> canonical chat rows.

A canonical row is `{"messages": [{"role": ..., "content": ...}, ...]}`. Every
row is checked here, in one streaming pass in the driver, before any expensive
stage starts; a bad row stops the run with its file, line (or row) and field,
or, with `on_bad_row: skip`, is counted per reason and skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from sasft_ray.config import DataConfig
from sasft_ray.layout import is_uri

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
_BETWEEN_ROWS = re.compile(r"[\s,]*")
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROW_SCHEMA = pa.schema([("messages", MESSAGE_TYPE), ("source_row", pa.int64())])


class BadRow(ValueError):
    """A row that cannot be used; `kind` is the short reason that `skip` counts under."""

    def __init__(self, where: str, field: str, reason: str, kind: str | None = None):
        self.where, self.field, self.reason = where, field, reason
        self.kind = kind or reason
        super().__init__(f"{where}: field '{field}': {reason}")


@dataclass
class LoadReport:
    rows_in: int = 0
    rows_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skipped rows, for the log


# --- readers: yield (where, raw) where `where` is "file:line N" or "file:row N" ---------------

def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "parquet" if any(p.glob("*.parquet")) else "hf"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    if not p.exists() and hub_id_shaped(path):
        return "hf"
    if not p.exists():
        raise BadRow(path, "data.path", "no such file or folder")
    raise BadRow(path, "data.format", "cannot tell the format from the name; set data.format")


def hub_id_shaped(path: str) -> bool:
    """A path that can only be a hub id (org/name): nothing at it, or at its first part, on this machine.
    A path that looks local (./, /, ~, deeper than org/name, or under an existing folder) never is one."""
    return (not is_uri(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1
            and not Path(path).exists() and not Path(path.split("/")[0]).exists())


def _saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()


def _decode(raw: bytes, path: str, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise BadRow(f"{path}:line {line}", "<text>", f"not valid UTF-8 at byte {e.start}", "not UTF-8") from None


def _lines(f, max_bytes: int) -> Iterator[bytes | None]:
    """The file's lines, each read at most `max_bytes` at a time; None for a longer line (skipped whole)."""
    while raw := f.readline(max_bytes + 1):
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(max_bytes + 1)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _read_jsonl(path: str, max_line_bytes: int) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, max_line_bytes), 1):
            where = f"{path}:line {lineno}"
            if raw is None:
                yield where, BadRow(where, "<line>", f"longer than data.max_line_bytes={max_line_bytes}",
                                    "line too long")
                continue
            try:
                text = _decode(raw, path, lineno)
                if not text.strip():
                    continue
                yield where, json.loads(text)
            except BadRow as e:
                yield where, e
            except json.JSONDecodeError as e:
                yield where, BadRow(where, "<json>", f"malformed JSON: {e.msg} at column {e.colno}", "malformed JSON")
            except RecursionError:
                yield where, BadRow(where, "<json>", "nested too deeply", "malformed JSON")


def _read_json(path: str) -> Iterator[tuple[str, object]]:
    """A JSON array of rows, read element by element so each error carries its line number."""
    raw = Path(path).read_bytes()
    text = _decode(raw, path)
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":
        raise BadRow(f"{path}:line 1", "<json>", "a .json file must hold an array of rows")
    pos += 1
    line = 1 + text.count("\n", 0, pos)
    while True:
        start = _BETWEEN_ROWS.match(text, pos).end()
        line += text.count("\n", pos, start)
        pos = start
        if text[pos:pos + 1] == "]":
            if text[pos + 1:].strip():
                raise BadRow(f"{path}:line {line}", "<json>", "text after the array's closing ]", "malformed JSON")
            return
        where = f"{path}:line {line}"
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            at = f"{path}:line {line + text.count(chr(10), pos, e.pos)}"
            raise BadRow(at, "<json>", f"malformed JSON: {e.msg}", "malformed JSON") from None
        except RecursionError:
            raise BadRow(where, "<json>", "nested too deeply", "malformed JSON") from None
        yield where, obj
        line += text.count("\n", pos, end)
        pos = end


def _read_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    nested = sorted({f.parent.name for f in p.glob("*/**/*.parquet")}) if p.is_dir() else []
    if nested:  # a Hive-style `split=test/` is another split, never rows of this one
        raise BadRow(path, "data.path", f"holds Parquet files in subfolders too ({', '.join(nested[:3])}): name "
                     "the folder of the files to read", "bad folder")
    for file in files:
        n = 0
        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{file}:row {n}", row
                    n += 1
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: empty, corrupt, truncated
            raise BadRow(f"{file}:row {n}", "<parquet>", f"not a readable Parquet file ({e})", "bad file") from None


def _read_hf(cfg: DataConfig) -> Iterator[tuple[str, object]]:
    import datasets

    path, split, p = cfg.path, cfg.split, Path(cfg.path)
    # a folder is read only as a saved dataset (HF's folder loaders merge files and splits and retype fields),
    # unless the config names which of its configurations or files to read
    if p.exists() and not (cfg.name or cfg.data_files):
        if not (p.is_dir() and _saved_dataset(p)):
            raise BadRow(path, "data.path", "a folder must hold .parquet files or a dataset saved by datasets' "
                         "save_to_disk (for JSONL or JSON files, name one file)", "bad folder")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise BadRow(path, "data.split", f"no split {split!r} (it has {', '.join(sorted(ds)) or 'none'})")
            ds = ds[split]
    elif p.exists() or hub_id_shaped(path):  # a hub id, or a folder whose configuration or files are named
        ds = datasets.load_dataset(path, name=cfg.name, data_files=cfg.data_files, revision=cfg.revision, split=split,
                                   streaming=True)
    else:
        raise BadRow(path, "data.path", "no such file or folder")
    where = f"{path}" + (f"/{cfg.name}" if cfg.name else "")
    for n, row in enumerate(ds):
        yield f"{where}[{split}]:row {n}", row


def read_raw(cfg: DataConfig) -> Iterator[tuple[str, object]]:
    fmt = _detect_format(cfg.path, cfg.format)
    if fmt != "hf" and not Path(cfg.path).exists():
        raise BadRow(cfg.path, "data.path", "no such file or folder")
    hf_only = [k for k in ("name", "data_files", "revision") if getattr(cfg, k) is not None]
    if fmt != "hf" and hf_only:
        raise BadRow(cfg.path, f"data.{hf_only[0]}", f"is for HF datasets (hub ids, dataset folders); this is {fmt}")
    if fmt == "jsonl":
        return _read_jsonl(cfg.path, cfg.max_line_bytes)
    if fmt == "json":
        return _read_json(cfg.path)
    if fmt == "parquet":
        return _read_parquet(cfg.path)
    return _read_hf(cfg)


# --- shapes -> canonical messages ---------------------------------------------------------------

def _text(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise BadRow(where, key, "missing", "missing field")
    if not isinstance(value, str):
        raise BadRow(where, key, f"must be a string, got {type(value).__name__}", "wrong type")
    if not optional and not value.strip():
        raise BadRow(where, key, "empty", "empty field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" in the JSON: no UTF-8 for it
        raise BadRow(where, key, f"not valid Unicode at character {e.start} (a lone surrogate)", "not UTF-8") from None
    return value


def _messages(items: object, key: str, where: str, role_key: str, text_key: str,
              role_map: dict[str, str]) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise BadRow(where, key, "must be a non-empty list of messages", "wrong type")
    out = []
    for i, msg in enumerate(items):
        loc = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise BadRow(where, loc, f"must be an object, got {type(msg).__name__}", "wrong type")
        try:
            role, content = _text(msg, role_key, where), _text(msg, text_key, where)
        except BadRow as e:
            raise BadRow(where, f"{loc}.{e.field}", e.reason, e.kind) from None
        if role not in role_map:
            raise BadRow(where, f"{loc}.{role_key}", f"unknown role '{role}' (expected one of {sorted(role_map)})",
                         "unknown role")
        _refuse_dropped_fields(msg, where, loc)
        out.append({"role": role_map[role], "content": content})
    return out


# Message fields that change what a dialogue means or what is trained on; only role and content are kept, so a
# message with one of these is refused rather than silently trained on as something else
UNSUPPORTED = {"name": "speaker names", "tool_calls": "tool calls", "tool_call_id": "tool results",
               "function_call": "function calls"}


def _refuse_dropped_fields(msg: dict, where: str, loc: str) -> None:
    for key, what in UNSUPPORTED.items():
        if msg.get(key) not in (None, "", []):
            raise BadRow(where, f"{loc}.{key}", f"{what} are not supported (only role and content are trained on); "
                         "drop the field or the row", "unsupported field")
    if "weight" in msg and msg["weight"] not in (1, 1.0, True):  # axolotl's per-message weight
        raise BadRow(where, f"{loc}.weight", f"weight {msg['weight']!r}: every assistant message is trained on; "
                     "leaving one out (weight 0) is not supported", "unsupported field")


def to_messages(row: object, where: str) -> list[dict]:
    """Recognise one of the common shapes and return canonical, checked messages."""
    if not isinstance(row, dict):
        raise BadRow(where, "<row>", f"must be an object, got {type(row).__name__}", "wrong type")
    if "messages" in row:
        messages = _messages(row["messages"], "messages", where, "role", "content", {r: r for r in ROLES})
    elif "conversations" in row:
        messages = _messages(row["conversations"], "conversations", where, "from", "value", SHAREGPT_ROLES)
    elif "instruction" in row and "output" in row:
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": _text(row, "prompt", where)},
                    {"role": "assistant", "content": _text(row, "completion", where)}]
    else:
        raise BadRow(where, "<row>", f"unrecognised shape with fields {sorted(row)}; expected messages, "
                     "conversations, instruction/output or prompt/completion (or map them in data.columns)",
                     "unrecognised shape")
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            raise BadRow(where, f"messages[{i}].role", "a system message may only come first", "misplaced system")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(where, "messages", "no assistant turn to learn from", "no assistant turn")
    first = 1 if messages[0]["role"] == "system" else 0
    for i, msg in enumerate(messages[first:], first):  # user, assistant, user, ...: what chat templates accept
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise BadRow(where, f"messages[{i}].role", f"'{msg['role']}' where '{expected}' must come: turns "
                         "alternate user, assistant, starting with user", "roles out of order")
    if messages[-1]["role"] != "assistant":
        raise BadRow(where, f"messages[{len(messages) - 1}].role", "a dialogue must end on an assistant turn",
                     "roles out of order")
    return messages


def _apply_columns(row: object, columns: dict[str, str]) -> object:
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for canonical, source in columns.items():
        if source in row:
            renamed[canonical] = row[source]
    return renamed


def is_heldout(messages: list[dict], fraction: float) -> bool:
    """Split on a hash of the content, so a row lands in the same split whatever the file order; whitespace
    normalised first, so rows that differ only in it (a trailing newline) never fall on both sides."""
    normalised = [{**m, "content": " ".join(m["content"].split())} for m in messages]
    digest = hashlib.sha1(json.dumps(normalised, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def iter_rows(cfg: DataConfig, report: LoadReport) -> Iterator[tuple[int, list[dict]]]:
    """Yield (source_row, messages) for every good row; raise or count the bad ones."""
    for n, (where, raw) in enumerate(read_raw(cfg)):
        if cfg.max_rows is not None and report.rows_out >= cfg.max_rows:
            return
        report.rows_in += 1
        try:
            if isinstance(raw, BadRow):
                raise raw
            messages = to_messages(_apply_columns(raw, cfg.columns), where)
        except BadRow as e:
            if cfg.on_bad_row == "error":
                raise
            report.skipped[e.kind] += 1
            if len(report.examples) < 5:
                report.examples.append(str(e))
            continue
        report.rows_out += 1
        yield n, messages
