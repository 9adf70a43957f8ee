"""PII redaction: e-mail addresses, IP addresses and phone numbers replaced with placeholders.

The e-mail and IP patterns are DataTrove's ``PIIFormatter`` ones (IPs replaced only when public, as
there); phone numbers are sequences of 10 to 15 digits in the usual groupings (an optional +country code,
an optional area code in parentheses, groups joined by spaces, dots or dashes), so dates, versions and
plain long numbers stay. Counts go to the stage stats and each document's ``meta``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator

import pyarrow as pa
from pydantic import Field

from core.stage import Stage, StageConfig, StageContext

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
    r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
    r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
)
PHONE = re.compile(
    r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w.-]*\d)"
    r"|(?<![\w.+-])\+\d{10,15}(?!\w)"
)


def _is_phone(match: str) -> bool:
    digits = sum(ch.isdigit() for ch in match)
    if not 10 <= digits <= 15:
        return False
    separators = re.findall(r"[ .-]", match)
    return match.startswith(("+", "(")) or len(set(separators)) == 1  # one kind of separator: 555-123-4567


class PiiConfig(StageConfig):
    """What to redact and with what."""

    emails: bool = Field(True, description="Replace e-mail addresses.")
    ips: bool = Field(True, description="Replace IPv4 addresses.")
    only_public_ips: bool = Field(True, description="Only public addresses (private ones are no PII).")
    phones: bool = Field(True, description="Replace phone numbers.")
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"


def redact(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """The text with PII replaced, and how many of each kind were replaced."""
    counts = {"emails": 0, "ips": 0, "phones": 0}

    def sub(kind: str, placeholder: str, valid=None):
        def replace(match: re.Match) -> str:
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return placeholder

        return replace

    if cfg.emails and "@" in text:
        text = EMAIL.sub(sub("emails", cfg.email_placeholder), text)
    if cfg.ips:
        text = IPV4.sub(sub("ips", cfg.ip_placeholder, _public_ip if cfg.only_public_ips else None), text)
    if cfg.phones:
        text = PHONE.sub(sub("phones", cfg.phone_placeholder, _is_phone), text)
    return text, counts


def _public_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


class PiiRedactor(Stage):
    """Rewrites ``text`` with PII replaced; never removes a document."""

    name = "pii"
    config: PiiConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            texts, metas = [], []
            for text, meta in zip(batch.column("text").to_pylist(), batch.column("meta").to_pylist()):
                new, counts = redact(text or "", self.config)
                texts.append(new)
                found = {k: v for k, v in counts.items() if v}
                metas.append(list(meta or []) + [(f"pii.{k}", float(v)) for k, v in found.items()])
                for kind, n in found.items():
                    ctx.counters[f"pii.{kind}"] += n
                ctx.counters["pii.documents_redacted"] += bool(found)
            batch = batch.set_column(
                batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string())
            )
            yield batch.set_column(
                batch.schema.get_field_index("meta"), "meta", pa.array(metas, batch.schema.field("meta").type)
            )
