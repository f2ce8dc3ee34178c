"""Format detection: a log's format guessed from its name and first lines."""

from __future__ import annotations

import re
from pathlib import Path

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import FORMATS, _ANSI, _text_decoder, read_head


_SNIFF = (  # (format, regex over a line) in priority order for ties
    ("modded-nanogpt", re.compile(r"^step:\d+/\d+ (?:train|val)_loss:")),
    ("llmc", re.compile(r"^s:\d+ (?:trl|tel):")),
    ("megatron", re.compile(r"\biteration\s+\d+\s*/\s*\d+\s*\|")),
    ("nanogpt", re.compile(r"^iter \d+: loss ")),
    ("olmo", re.compile(r"\[step=\d+/")),
    ("torchtitan", re.compile(r"\bstep:\s*\d+\s+loss:")),
)


def _strip_compression(name: str) -> str:
    for suf in (".gz", ".zst"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def detect_format(path) -> str:
    """Guess a log's format from its name and first lines; ``UserError`` if nothing fits."""
    path = Path(path)
    if not path.exists():
        from spike_audit.pipelines.files import missing

        raise missing(path, f"{path}: no such file or directory")
    if path.is_dir():
        if any("tfevents" in p.name for p in path.rglob("*")):
            return "tensorboard"
        raise UserError(f"{path}: is a directory without TensorBoard event files")
    name = _strip_compression(path.name).lower()
    if "tfevents" in name:
        return "tensorboard"
    head = read_head(path, 1 << 22)
    skip, dec = _text_decoder(head[:4])
    for magic, what in ((b"PAR1", "a Parquet file"), (b"ARROW1", "an Arrow file"), (b"\x93NUMPY", "a .npy array"),
                        (b"PK\x03\x04", "a zip archive"), (b"MMIDIDX", "a Megatron .idx index")):
        if head.startswith(magic):  # a manifest, shard or checkpoint given where the log goes
            raise UserError(f"{path}: is {what}, not a training log (expected the trainer's loss log: text, JSONL, "
                            f"CSV, JSON or TensorBoard event files)")
    if dec is None and len(head) >= 12 and b"\x00" in head[:64]:
        return "tensorboard"  # binary: TFRecord framing starts with a little-endian uint64 length
    text = (dec.decode(head) if dec is not None else head[skip:].decode("utf-8", errors="replace"))
    if "\x1b" in text:
        text = re.sub(_ANSI, "", text)
    stripped = text.lstrip()
    if stripped.startswith("{") and not name.endswith(".jsonl"):
        probe = stripped[:4096]
        if '"log_history"' in text:
            return "hf-trainer-state"
        if re.search(r'"values"\s*:\s*\{', probe) or re.search(r'"step_interval"', probe):
            return "megatron-golden"
        if "\n" in stripped.rstrip() and re.match(r"\{[^\n]*\}\s*\n\s*\{", stripped):
            return "jsonl"
        if name.endswith(".json"):
            return "megatron-golden"
    lines = [ln for ln in text.splitlines()[:20000] if ln.strip()]  # a long preamble is fine
    if name.endswith(".jsonl") or (lines and sum(ln.lstrip().startswith("{") for ln in lines[:50]) >= 0.8 * min(50, len(lines))):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    counts = {fmt: 0 for fmt, _ in _SNIFF}
    for i, ln in enumerate(lines):
        if i >= 2000 and any(counts.values()):
            break
        for fmt, rx in _SNIFF:
            if rx.search(ln):
                counts[fmt] += 1
                break
    best = max(counts, key=lambda k: counts[k])
    if counts[best]:
        return best
    if lines and "," in lines[0] and re.search(r"(?i)step|iter", lines[0]):
        return "csv"
    raise UserError(f"{path}: unknown log format (first line: {lines[0][:80]!r}); pass --format "
                    f"({', '.join(FORMATS)}) or --pattern" if lines else f"{path}: empty log")
