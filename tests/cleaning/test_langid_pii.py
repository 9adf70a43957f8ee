"""Language identification (offline model) and PII redaction."""

import pytest

from cleaning.langid import LanguageFilter, LanguageFilterConfig, identify
from cleaning.pii import PiiConfig, PiiRedactor, redact
from core.schema import document_table
from core.stage import StageContext

pytestmark = pytest.mark.unit

TEXTS = {
    "en": "The package manager keeps track of every file installed on the system, so that removing a package "
    "also removes its files, and upgrading it replaces them without leaving old copies behind.",
    "de": "Der Paketmanager merkt sich jede Datei, die auf dem System installiert wurde, damit beim Entfernen "
    "eines Pakets auch seine Dateien verschwinden und ein Upgrade sie ohne alte Kopien ersetzt.",
    "fr": "Le gestionnaire de paquets garde la trace de chaque fichier installé sur le système, afin que la "
    "suppression d'un paquet supprime aussi ses fichiers et qu'une mise à jour les remplace proprement.",
    "es": "El gestor de paquetes registra cada archivo instalado en el sistema, de modo que al eliminar un "
    "paquete también se eliminan sus archivos y al actualizarlo se reemplazan sin dejar copias viejas.",
}


def docs(*texts):
    return document_table(list(texts), source="t").to_batches()[0]


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_identify_known_languages_offline(lang):
    found, score = identify(TEXTS[lang])
    assert found == lang and score > 0.9


def test_identify_matches_py3langid_scores_exactly():
    """The compiled byte walk gives py3langid's own probabilities, bit for bit, over many languages, case,
    scripts, broken surrogates, text without features and whitespace runs."""
    import collections
    import email
    import json
    import os
    import re

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    docstrings = [m.__doc__ for m in (collections, email, json, os, re, str, dict, list, open, print)]
    texts = [d[i : i + 300] for d in docstrings for i in range(0, len(d), 150)] + list(TEXTS.values())
    texts += [
        "",
        " ",
        "ok",
        "ALL CAPS TEXT HERE",
        "日本語のテキストです",
        "Привет, как дела?",
        "\ud800 x",
        "a" * 5000,
    ]
    for text in texts:
        expected = reference.classify(" ".join(text.split()))
        assert identify(text) == (expected[0], expected[1]), text[:80]


def test_language_filter_labels_keeps_and_rejects_with_reasons():
    ctx = StageContext("clean")
    stage = LanguageFilter(LanguageFilterConfig(languages=["en", "de"]))
    texts = [TEXTS["en"], TEXTS["de"], TEXTS["fr"], "ok"]
    kept = [r for b in stage.run([docs(*texts)], ctx) for r in b.to_pylist()]
    rejected = {r["id"]: r for b in ctx.rejected for r in b.to_pylist()}
    assert [(r["id"], r["lang"]) for r in kept] == [("d0", "en"), ("d1", "de")]
    assert all(dict(r["meta"])["lang_score"] > 0.9 for r in kept)
    assert rejected["d2"]["signal"] == "language" and rejected["d2"]["lang"] == "fr"
    assert rejected["d3"]["threshold"] == 0.65  # too short to tell: another language or an unsure score
    assert ctx.counters["language.en"] == 1 and len(kept) + len(rejected) == 4


def test_language_filter_without_a_list_only_labels():
    ctx = StageContext("clean")
    kept = [
        r
        for b in LanguageFilter(LanguageFilterConfig(languages=None)).run([docs(*TEXTS.values())], ctx)
        for r in b.to_pylist()
    ]
    assert [r["lang"] for r in kept] == list(TEXTS) and not ctx.rejected


def test_redact_emails_public_ips_and_phones():
    text = (
        "Write to jane.doe+list@mail.example.org or call +1 555-123-4567, (555) 123-4567 or 020 7946 0958. "
        "Server 8.8.8.8, router 192.168.1.1, version 1.2.3, 2024-11-27, ISBN 978-3-16-148410-0, id 12345678901."
    )
    new, counts = redact(text, PiiConfig())
    assert new == (
        "Write to <EMAIL> or call <PHONE>, <PHONE> or <PHONE>. "
        "Server <IP_ADDRESS>, router 192.168.1.1, version 1.2.3, 2024-11-27, ISBN 978-3-16-148410-0, id 12345678901."
    )
    assert counts == {"emails": 1, "ips": 1, "phones": 3}
    all_ips, counts = redact("router 192.168.1.1", PiiConfig(only_public_ips=False, ip_placeholder="[ip]"))
    assert all_ips == "router [ip]" and counts["ips"] == 1
    assert redact(text, PiiConfig(emails=False, ips=False, phones=False))[0] == text


def test_pii_stage_counts_and_keeps_every_document():
    ctx = StageContext("clean")
    out = [
        r
        for b in PiiRedactor(PiiConfig()).run([docs("mail a@b.example now", "nothing here")], ctx)
        for r in b.to_pylist()
    ]
    assert [r["text"] for r in out] == ["mail <EMAIL> now", "nothing here"]
    assert dict(out[0]["meta"]) == {"pii.emails": 1.0} and out[1]["meta"] == []
    assert ctx.counters["pii.emails"] == 1 and ctx.counters["pii.documents_redacted"] == 1
