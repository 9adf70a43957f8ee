"""Text normalization: broken encodings repaired (ftfy: mojibake such as "doesnâ€™t", HTML entities left
over, C1 controls), Unicode NFC, no-break and odd spaces to plain spaces, control characters removed."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

import ftfy
import pyarrow as pa
from pydantic import Field

from core.stage import Stage, StageConfig, StageContext

# Unicode space separators (no-break space, thin space, ...) and the zero-width characters.
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_RUNS_OF_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class TextNormalizerConfig(StageConfig):
    """What the normalizer rewrites."""

    fix_encoding: bool = Field(True, description="Repair mojibake and other broken encodings with ftfy.")
    form: str = Field("NFC", pattern="^(NFC|NFKC)$", description="Unicode normalization form.")
    collapse_spaces: bool = Field(
        True, description="Runs of spaces/tabs become one space; lines are stripped."
    )


_FTFY = ftfy.TextFixerConfig(
    uncurl_quotes=False,  # curly quotes are text, not damage
    fix_character_width=False,  # full-width characters are right in CJK text
    normalization=None,  # NFC/NFKC below
    explain=False,
)


def repair_encoding(text: str) -> str:
    """ftfy's repairs. A pure-ASCII text without ``&`` (entities) or ESC (terminal escapes) has nothing
    ftfy repairs but control characters and carriage returns, which :func:`normalize_text` handles itself
    the same way: it skips ftfy (a third of the normalizer's time on English text)."""
    if text.isascii() and "&" not in text and "\x1b" not in text:
        return text
    return ftfy.fix_text(text, _FTFY)


def normalize_text(
    text: str, form: str = "NFC", collapse_spaces: bool = True, fix_encoding: bool = True
) -> str:
    """Normalize one text (the stage applies this to every document)."""
    if fix_encoding:
        text = repair_encoding(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _CONTROL.sub("", _SPACES.sub(" ", text)))
    text = unicodedata.normalize(form, text)
    if collapse_spaces:
        text = "\n".join(_RUNS_OF_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text


class TextNormalizer(Stage):
    """Rewrites ``text`` in place; never removes a document."""

    name = "normalize"
    config: TextNormalizerConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        for batch in batches:
            texts = [
                normalize_text(t or "", cfg.form, cfg.collapse_spaces, cfg.fix_encoding)
                for t in batch.column("text").to_pylist()
            ]
            i = batch.schema.get_field_index("text")
            yield batch.set_column(i, "text", pa.array(texts, pa.string()))
