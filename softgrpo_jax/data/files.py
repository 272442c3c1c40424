"""Reading user-supplied math files (parquet / jsonl / json) into the uniform example schema.

Schema of every example: ``{"id": str, "question": str, "answer": str, "source": str}``.

Recognised row layouts (the common public ones):

* verl / DeepScaleR parquet: ``prompt`` (a list of chat messages ``{"role", "content"}``), ``reward_model.ground_truth``,
  ``data_source``, ``extra_info.index``.  The seed's suffix "Let's think step by step and output the final answer
  within \\boxed{}." is removed from the question (the prompt builder adds it back).
* Soft-Thinking json (the seed's evaluation files): ``prompt`` = ``[{"from": "user", "value": q}]``, ``final_answer``.
* Hugging Face style: ``problem`` or ``question`` with ``answer`` (MATH-500, AIME, AMC, DeepScaleR-Preview json);
  GSM8K's ``answer`` keeps the solution and ends with ``#### <number>``: the number is taken.  Rows with only a
  ``solution`` take its last ``\\boxed{}``.

A row that yields no question or no answer is *malformed*: it is skipped and counted, never silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

EXTENSIONS = (".parquet", ".jsonl", ".json")
SEED_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
_SUFFIX_RE = re.compile(r"\s*Let's think step by step and output the final answer within \\boxed\{\}\.?\s*$")

QUESTION_KEYS = ("question", "problem", "Question", "Problem", "query", "input", "instruction")
ANSWER_KEYS = ("final_answer", "answer", "Answer", "ground_truth", "expected_answer", "gold", "target", "label")
ID_KEYS = ("id", "unique_id", "idx", "problem_id", "ID", "uid", "index")


from softgrpo_jax.errors import UserError


class DataFileError(UserError, ValueError):
    """A user data file that cannot be read at all (not one bad row: those are counted and skipped)."""


@dataclass
class ReadResult:
    examples: list = field(default_factory=list)
    skipped: int = 0
    reasons: list = field(default_factory=list)  # the first few (row, reason) pairs, for the log and error messages
    path: str = ""

    def skip(self, row: int, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 20:
            self.reasons.append(f"row {row}: {reason}")


def _iter_rows(path: str) -> Iterator[tuple[int, object]]:
    """(row number, row) for each row; a row that is not even valid JSON is yielded as an Exception instance."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise DataFileError(f"cannot read parquet file {path}: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield i, row
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataFileError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
                            f"save the file as UTF-8") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines with a .json name (what `datasets.Dataset.to_json` writes)
        if data is not None:
            if isinstance(data, dict):
                lists = [v for k, v in data.items() if isinstance(v, list) and k in ("data", "examples", "rows",
                                                                                    "train", "test", "problems")]
                if not lists:
                    raise DataFileError(f"{path}: a JSON object, expected a list of rows (or {{'data': [...]}})")
                data = lists[0]
            if not isinstance(data, list):
                raise DataFileError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
            for i, row in enumerate(data):
                yield i, row
            return
    for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, e


def _get(row: dict, dotted: str):
    cur = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _as_text(v) -> str | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)) and len(v) == 1:  # e.g. ground_truth ["42"]
        return _as_text(v[0])
    if isinstance(v, str):
        return v.strip() or None
    return None


def _question(row: dict) -> str | None:
    prompt = row.get("prompt")
    q = None
    if isinstance(prompt, str):
        q = prompt
    elif isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict)
                 and (m.get("role") or m.get("from")) in ("user", "human")]
        if users:
            q = users[-1].get("content", users[-1].get("value"))
    if not isinstance(q, str) or not q.strip():
        q = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if not isinstance(q, str):
        return None
    q = _SUFFIX_RE.sub("", q).strip()
    return q or None


def gsm8k_final_answer(answer: str) -> str | None:
    """The number after ``####`` in a GSM8K solution (thousands separators removed); the text itself otherwise."""
    if "####" not in answer:
        return answer.strip() or None
    tail = answer.split("####")[-1].strip()
    return tail.replace(",", "") or None


def _answer(row: dict, name: str) -> str | None:
    a = _as_text(_get(row, "reward_model.ground_truth"))
    if a is None:
        a = next((t for t in (_as_text(row.get(k)) for k in ANSWER_KEYS) if t is not None), None)
    if a is None and isinstance(row.get("solution"), str):
        from softgrpo_jax.rewards import extract_boxed_answer

        a = extract_boxed_answer(row["solution"])
        a = a.strip() if a else None
    if a is not None and (name == "gsm8k" or "####" in a):
        a = gsm8k_final_answer(a)
    return a


def _row_id(row: dict, name: str, index: int) -> str:
    for k in ID_KEYS:
        v = _as_text(row.get(k))
        if v is not None:
            return f"{name}-{v}"
    v = _as_text(_get(row, "extra_info.index"))
    return f"{name}-{v if v is not None else index}"


def read_examples(path: str, name: str) -> ReadResult:
    """Read ``path`` (parquet / jsonl / json) into uniform examples, counting malformed rows."""
    res = ReadResult(path=str(path))
    seen_ids: set[str] = set()
    for i, row in _iter_rows(str(path)):
        if isinstance(row, Exception):
            res.skip(i, f"invalid JSON ({row})")
            continue
        if not isinstance(row, dict):
            res.skip(i, f"not an object ({type(row).__name__})")
            continue
        q, a = _question(row), _answer(row, name)
        if q is None or a is None:
            missing = " and ".join(w for w, v in (("question", q), ("answer", a)) if v is None)
            res.skip(i, f"no {missing} (columns: {sorted(row)[:12]})")
            continue
        ex_id = _row_id(row, name, i)
        if ex_id in seen_ids:
            ex_id = f"{ex_id}-row{i}"
        seen_ids.add(ex_id)
        source = _as_text(row.get("data_source")) or _as_text(row.get("source")) or name
        res.examples.append({"id": ex_id, "question": q, "answer": a, "source": source})
    return res
