"""`dcpo prepare`: turn a problem set (JSONL, JSON, Parquet, verl layout, Hub dataset) into
the prompts contract."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import contracts
from dcpo_cli.files.jsonl import parse_jsonl
from dcpo_cli.options import PAPER_INSTRUCTION, check_instruction_in

PROBLEM_FIELDS = ("problem", "question", "prompt", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "target", "solution_answer")
ID_FIELDS = ("id", "unique_id", "idx", "index", "problem_id", "prompt_id")

GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


@dataclass
class PreparedSet:
    rows: list[dict[str, Any]]
    read: int
    merged: int


def load_records(src: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Records of a local JSONL/JSON/Parquet file, of a Hub dataset named `owner/name`, or of
    a folder holding a downloaded Hub dataset (both read with `datasets`)."""
    path = Path(src)
    if path.is_dir():
        return _load_hub(src, split, config)
    if path.exists():
        return _load_local(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not path.suffix:
        return _load_hub(src, split, config)
    raise DcpoError(f"{src}: no such file (and not a Hub dataset name like 'owner/name')")


def _load_local(path: Path) -> list[dict]:
    name = path.name
    if path.stat().st_size == 0:
        raise DcpoError(f"{name}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return contracts.read_parquet(path).to_pylist()
    if name.lower().endswith(".jsonl.gz"):  # how the bundled benchmarks are stored
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError) as exc:
            raise DcpoError(f"{name}: not a readable gzip file ({exc})") from None
        return parse_jsonl(text, name)
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        return parse_jsonl(text, name)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DcpoError(f"{name}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or a single list-valued key
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DcpoError(f"{name}: expected a list of records")
            data = lists[0]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DcpoError(f"{name}: expected a list of records (JSON objects)")
        return data
    raise DcpoError(f"{name}: unknown format '{suffix}' (expected .jsonl, .jsonl.gz, .json or "
                    ".parquet)")


def _load_hub(name: str, split: str | None, config: str | None) -> list[dict]:
    from dcpo_cli.extras import load

    datasets = load("hub", f"{name}: a Hub dataset or a folder of one (not a local file)")
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # network, missing split, unknown dataset: one line for all
        reason = first_line(exc)
        raise DcpoError(f"{name}: could not load the Hub dataset ({reason})") from None
    return [dict(row) for row in dataset]


def is_verl_record(record: dict) -> bool:
    """verl / official-DCPO layout: chat messages in `prompt`, gold in reward_model.ground_truth."""
    return (
        isinstance(record.get("prompt"), list)
        and isinstance(record.get("reward_model"), dict)
        and "ground_truth" in record["reward_model"]
    )


def _pick_field(record: dict, explicit: str | None, candidates: tuple[str, ...], what: str,
                name: str) -> str | None:
    if explicit:
        if explicit not in record:
            raise DcpoError(f"{name}: field '{explicit}' (given as the {what} field) is missing")
        return explicit
    for candidate in candidates:
        if candidate in record and record[candidate] is not None:
            return candidate
    return None


def clean_answer(value: Any) -> str:
    """The gold answer as a string; GSM8K's `... #### 18` becomes `18`."""
    text = str(value).strip()
    match = GSM8K_ANSWER.search(text)
    if "####" in text and match:
        text = match.group(1).strip().replace(",", "")
    return text


def build_messages(problem: str, instruction: str, system: str | None,
                   instruction_in: str = "system") -> list[dict[str, str]]:
    """The chat messages of one problem. The official layout (`instruction_in` "system", as
    the verl evaluation files): the instruction as the system message, the bare problem as
    the user message. "user": the instruction appended to the problem, after any `system`."""
    if instruction and instruction_in == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": problem}]
    content = f"{problem}\n{instruction}" if instruction else problem
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return messages


def prepare_records(records: list[dict], name: str, *, problem_field: str | None = None,
                    answer_field: str | None = None, id_field: str | None = None,
                    instruction: str = PAPER_INSTRUCTION, system: str | None = None,
                    source: str | None = None, instruction_in: str = "system") -> PreparedSet:
    """Map records to prompt rows, merging rows that repeat the same problem. verl-layout
    records keep their own messages."""
    check_instruction_in(instruction_in)
    if system and instruction and instruction_in == "system":
        raise DcpoError("--system and the instruction would both be the system message; add "
                        "--instruction-in user (instruction after the problem) or "
                        "--instruction ''")
    if not records:
        raise DcpoError(f"{name}: no records")
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    ids: set[str] = set()
    for number, record in enumerate(records):
        if is_verl_record(record) and not problem_field:
            try:
                messages = [{"role": str(m["role"]), "content": str(m["content"])}
                            for m in record["prompt"]]
                answer = clean_answer(record["reward_model"]["ground_truth"])
                extra = record.get("extra_info") or {}
                problem = str(extra.get("raw_problem") or messages[-1]["content"])
                raw_id = extra.get("index", record.get("index"))
            except (KeyError, TypeError, IndexError, AttributeError) as exc:
                raise DcpoError(f"{name}: record {number + 1} is not in the verl layout (prompt "
                                "messages with role and content, reward_model.ground_truth, "
                                f"extra_info as a mapping): {type(exc).__name__} {exc}"
                                ) from None
        else:
            pf = _pick_field(record, problem_field, PROBLEM_FIELDS, "problem", name)
            af = _pick_field(record, answer_field, ANSWER_FIELDS, "answer", name)
            if pf is None:
                raise DcpoError(f"{name}: record {number + 1} has no problem field "
                                f"(tried {', '.join(PROBLEM_FIELDS)}; use --problem-field)")
            if af is None:
                raise DcpoError(f"{name}: record {number + 1} has no answer field "
                                f"(tried {', '.join(ANSWER_FIELDS)}; use --answer-field)")
            problem = str(record[pf])
            answer = clean_answer(record[af])
            messages = build_messages(problem, instruction, system, instruction_in)
            idf = _pick_field(record, id_field, ID_FIELDS, "id", name)
            raw_id = record[idf] if idf else None
        key = json.dumps([messages, answer])
        if key in seen:
            continue
        prompt_id = str(raw_id) if raw_id is not None else f"{Path(name).stem}-{number}"
        if prompt_id in ids:  # distinct problems sharing an id: keep ids unique
            prompt_id = f"{prompt_id}#{number}"
        ids.add(prompt_id)
        seen[key] = len(rows)
        rows.append({"prompt_id": prompt_id, "prompt": messages, "answer": answer,
                     "problem": problem, "source": source or name})
    return PreparedSet(rows=rows, read=len(records), merged=len(records) - len(rows))


PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", contracts.MESSAGE_TYPE),
    ("answer", pa.string()),
    ("problem", pa.string()),
    ("source", pa.string()),
])


def prompts_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)


def prompt_text(prompt: Any) -> str:
    """A prompt cell as plain text (for tokenizers without a chat template and for display)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt)
