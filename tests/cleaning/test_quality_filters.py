"""Gopher repetition, C4, FineWeb and URL block-list filters on hand-made documents; the word splitter on
hand-checked spaCy tokenizations; the stage contract (nothing lost, deterministic, big and odd inputs)."""

import random
from collections import Counter

import pyarrow as pa
import pytest

from cleaning.filters import (
    C4QualityConfig,
    C4QualityFilter,
    FineWebQualityConfig,
    FineWebQualityFilter,
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
    UrlBlocklistConfig,
    UrlBlocklistFilter,
)
from cleaning.signals import FineWebSignals, RepetitionSignals
from cleaning.words import count_sentences, split_words
from core.schema import DOCUMENT_SCHEMA, document_table
from core.stage import StageContext

pytestmark = pytest.mark.unit


def docs(*texts, urls=None):
    return document_table(list(texts), urls=urls, source="t").to_batches()[0]


def run(stage, *texts, urls=None):
    ctx = StageContext("clean")
    kept = {r["id"]: r["text"] for b in stage.run([docs(*texts, urls=urls)], ctx) for r in b.to_pylist()}
    rejected = {r["id"]: r for b in ctx.rejected for r in b.to_pylist()}
    assert len(kept) + len(rejected) == len(texts) and not set(kept) & set(rejected)  # nothing lost
    return kept, rejected, ctx


# -- words -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [  # spaCy 3.8 English tokenizer output, checked by hand against its rules
        ("Hello, world.", ["Hello", ",", "world", "."]),
        ("Don't stop (now)!", ["Do", "n't", "stop", "(", "now", ")", "!"]),
        ("e.g. U.S. costs $3.50/month", ["e.g.", "U.S.", "costs", "$", "3.50", "/", "month"]),
        ("well-known 1,000 items...", ["well", "-", "known", "1,000", "items", "..."]),
        ("see https://example.com/a?b=c now", ["see", "https://example.com/a?b=c", "now"]),
        ("call f(): done", ["call", "f", "(", "):", "done"]),
        ("  spaced \n\n out\t", ["spaced", "out"]),
    ],
)
def test_split_words_follows_spacy_english_rules(text, words):
    assert split_words(text) == words


def test_count_sentences_by_the_sentencizer_rule():
    assert count_sentences(split_words("Third sentence is here. Fourth one. Fifth one?")) == 3
    assert count_sentences(split_words("No end mark")) == 1
    assert count_sentences(split_words("Wait... what?! Yes.")) == 2  # "..." is no sentence end, "?" is
    assert count_sentences(split_words('He said "stop." Then left.')) == 2  # a quote after '.' is punct


# -- Gopher repetition -----------------------------------------------------------------------------------


def _oracle_top(words, n, text_len):
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return None
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count / text_len


def _oracle_dup(words, n, text_len):
    seen, repeated, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeated += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / text_len


def test_ngram_signals_equal_the_published_definitions_on_random_texts():
    rng = random.Random(3)
    for _ in range(200):
        vocab = [f"w{i}" * rng.randint(1, 3) for i in range(rng.randint(2, 12))]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 80))]
        text = " ".join(words) or "x"
        signals = RepetitionSignals(text)
        for n in (2, 3, 4):
            assert signals.top_ngram(n) == pytest.approx(_oracle_top(words, n, len(text)))
        for n in range(5, 11):
            assert signals.duplicate_ngrams(n) == pytest.approx(_oracle_dup(words, n, len(text)))


def test_repetition_rules_by_hand():
    long = "This paragraph is long enough to weigh more than a fifth of the page by itself."
    texts = [
        "a b c\n\na b c\n\nx y z",  # 1 of 3 paragraphs repeated: 1/3 > 0.3
        f"{long}\n\nP\n\nQ\n\nR\n\n{long}",  # 1 of 5 paragraphs (0.2), but its characters weigh more
        "the cat the cat the cat the cat dog bird fish",  # "the cat" x4 = 28 of 45 characters
        " ".join(f"word{i}" for i in range(60)),  # no repetition at all
    ]
    kept, rejected, _ = run(GopherRepetitionFilter(GopherRepetitionConfig()), *texts)
    assert rejected["d0"]["signal"] == "dup_para_frac" and rejected["d0"]["value"] == pytest.approx(1 / 3)
    assert rejected["d1"]["signal"] == "dup_para_char_frac"
    assert rejected["d1"]["value"] == pytest.approx(len(long) / len(texts[1]))
    assert rejected["d2"]["signal"] == "top_2_gram" and rejected["d2"]["value"] == pytest.approx(28 / 45)
    assert list(kept) == ["d3"]


# -- C4 --------------------------------------------------------------------------------------------------

C4_PAGE = [
    "This is the first sentence. And a second one!",
    "Short line.",  # 2 words
    "No punctuation here",
    "Please enable javascript in your browser.",
    "Read our privacy policy today.",
    "The sky is blue.[1]",  # the citation goes, the line stays
    "Third sentence is here. Fourth one. Fifth one?",
]


def test_c4_keeps_lines_by_the_rules_and_counts_sentences():
    page = "\n".join(C4_PAGE)
    four = page.replace(" Fourth one. Fifth one?", "")  # 2 + 1 + 1 sentences
    texts = [page, four, page + "\nUse the {x} form here.", "Lorem ipsum dolor sit amet.\n" + page]
    kept, rejected, ctx = run(C4QualityFilter(C4QualityConfig()), *texts)
    expected = "\n".join([C4_PAGE[0], "The sky is blue.", C4_PAGE[6]])
    assert kept == {"d0": expected}  # 2 + 1 + 3 = 6 sentences
    assert (rejected["d1"]["signal"], rejected["d1"]["value"], rejected["d1"]["threshold"]) == (
        "sentences",
        4,
        5,
    )
    assert rejected["d2"]["signal"] == "curly_bracket" and rejected["d3"]["signal"] == "lorem_ipsum"
    assert ctx.counters["c4_quality.rewritten"] == 1


def test_c4_sentence_minimum_boundary():
    five = "One is here. Two is here. Three is here. Four is here. Five is here."
    kept, rejected, _ = run(C4QualityFilter(C4QualityConfig()), five, five.rsplit(" Five", 1)[0])
    assert list(kept) == ["d0"]
    assert (rejected["d1"]["signal"], rejected["d1"]["value"], rejected["d1"]["threshold"]) == (
        "sentences",
        4,
        5,
    )


# -- FineWeb ---------------------------------------------------------------------------------------------


def test_fineweb_rules_by_hand():
    long_line = "a line that is long enough to not count as short"
    punct = "\n".join([f"{long_line} {i}" for i in range(9)] + [f"{long_line}."])  # 1/10 end in '.'
    short = "\n".join([f"Short line {i}." for i in range(7)] + [f"{long_line} {i}." for i in range(3)])
    dup_line = f"{long_line} repeated."
    dups = "\n".join([f"{long_line} {i}." for i in range(8)] + [dup_line, dup_line])
    listy = "\n".join(f"Supercalifragilisticexpialidocious{i} wonderful." for i in range(12))
    texts = [punct, short, dups, listy, "\n".join(f"{long_line} {i}." for i in range(11)), "\n \n"]
    kept, rejected, _ = run(FineWebQualityFilter(FineWebQualityConfig()), *texts)
    assert (rejected["d0"]["signal"], rejected["d0"]["value"]) == ("line_punct_ratio", pytest.approx(0.1))
    assert (rejected["d1"]["signal"], rejected["d1"]["value"]) == ("short_line_ratio", pytest.approx(0.7))
    assert rejected["d2"]["signal"] == "char_dup_ratio"
    assert rejected["d2"]["value"] == pytest.approx(len(dup_line) / len(dups.replace("\n", "")))
    assert (rejected["d3"]["signal"], rejected["d3"]["value"]) == ("list_ratio", pytest.approx(11 / 36))
    assert list(kept) == ["d4"] and rejected["d5"]["signal"] == "empty"


def test_fineweb_line_punct_boundary_and_exclude_zero():
    line = "a line that is long enough to not count as short"
    # 3 of 25 lines end in '.' = 0.12: not below the threshold, kept
    at = "\n".join([f"{line} {i}." for i in range(3)] + [f"{line} {i}" for i in range(3, 25)])
    none = "\n".join(f"{line} {i}" for i in range(10))
    kept, _, _ = run(FineWebQualityFilter(FineWebQualityConfig(line_punct_exclude_zero=True)), at, none)
    assert list(kept) == ["d0", "d1"]


# -- URL block list --------------------------------------------------------------------------------------


def test_url_blocklist_domains_subdomains_and_prefixes(tmp_path):
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("bad.example\n# a comment\n\nhttp://ok.example/private/  # prefix\n")
    urls = [
        "http://bad.example/x",
        "https://sub.BAD.example/",
        "http://notbad.example/",
        "http://ok.example/private/a",
        "http://ok.example/public",
        None,
    ]
    kept, rejected, _ = run(UrlBlocklistFilter(UrlBlocklistConfig(path=blocklist)), *["t"] * 6, urls=urls)
    assert set(rejected) == {"d0", "d1", "d3"} and set(kept) == {"d2", "d4", "d5"}
    with pytest.raises(FileNotFoundError, match="block list"):
        UrlBlocklistFilter(UrlBlocklistConfig(path=tmp_path / "missing.txt"))


# -- the stage contract ----------------------------------------------------------------------------------


def _chain():
    return [
        GopherQualityFilter(GopherQualityConfig()),
        GopherRepetitionFilter(GopherRepetitionConfig()),
        C4QualityFilter(C4QualityConfig()),
        FineWebQualityFilter(FineWebQualityConfig()),
    ]


def test_empty_whitespace_binary_and_huge_documents_through_every_filter():
    rng = random.Random(0)
    binary = bytes(rng.randrange(256) for _ in range(5000)).decode("latin-1")
    words = [f"w{rng.randrange(50_000)}" for _ in range(1_500_000)]
    huge = "\n".join(" ".join(words[i : i + 15]) + "." for i in range(0, len(words), 15))
    assert len(huge) > 10_000_000
    expected = {  # (rejected: signal) per document, worked out from each published rule
        # Gopher: no words; no words; 11+-character "words" of random bytes; 1.5M words > 100,000
        "gopher_quality": {"d0": "words", "d1": "words", "d2": "avg_word_length", "d3": "words"},
        # only the empty text; whitespace has no paragraph, line or n-gram repeated; nor has the rest
        "gopher_repetition": {"d0": "empty"},
        # no line ends in terminal punctuation with 3+ words, except in the huge one
        "c4_quality": {"d0": "sentences", "d1": "sentences", "d2": "sentences"},
        # no non-blank line twice; random bytes end no line in punctuation
        "fineweb_quality": {"d0": "empty", "d1": "empty", "d2": "line_punct_ratio"},
    }
    for stage in _chain():
        _, rejected, _ = run(stage, "", "   \n\t ", binary, huge)
        assert {k: r["signal"] for k, r in rejected.items()} == expected[stage.name], stage.name


def test_boundaries_at_repetition_thresholds():
    """Exactly at a threshold is kept (the rules reject above it), one step over is rejected."""
    cfg = GopherRepetitionConfig(dup_para_char_frac=None, dup_line_frac=None, dup_line_char_frac=None)
    at = "\n\n".join(["same words", "same words"] + [f"other{i} text{i}" for i in range(8)])  # 1/10 = 0.1
    kept, rejected, _ = run(GopherRepetitionFilter(cfg.model_copy(update={"dup_para_frac": 0.1})), at)
    assert list(kept) == ["d0"]
    kept, rejected, _ = run(GopherRepetitionFilter(cfg.model_copy(update={"dup_para_frac": 0.09})), at)
    assert rejected["d0"]["signal"] == "dup_para_frac" and rejected["d0"]["value"] == pytest.approx(0.1)


def test_filters_are_deterministic():
    from core.stage import run_chain

    rng = random.Random(1)
    vocab = ["the", "river", "and", "stone", "of", "light", "runs", "to", "sea", "with", "a"]
    texts = [
        "\n".join(
            " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14))) + rng.choice([".", "!", ""])
            for _ in range(rng.randint(1, 30))
        )
        for _ in range(300)
    ]
    outputs = []
    for _ in range(2):
        ctx = StageContext("clean")
        kept = [b for b in run_chain(_chain(), [docs(*texts)], ctx)]
        outputs.append((pa.Table.from_batches(kept, DOCUMENT_SCHEMA), pa.Table.from_batches(ctx.rejected)))
        n_kept = sum(b.num_rows for b in kept)
        assert n_kept + sum(b.num_rows for b in ctx.rejected) == len(texts)
    assert outputs[0][0].equals(outputs[1][0]) and outputs[0][1].equals(outputs[1][1])


# -- every threshold: a value exactly at it is kept, one step past it is rejected --------------------------

EPS = 1e-9
RICH = "\n".join(  # breaks no default rule, yet has a value for every signal
    [
        "- the river and stone flows on past the old mill #",
        "the quick river and the stone wait for the tide to turn again ...",
        "The river and stone. " * 6 + "It was 1999 and the river was high.",
        "the river and stone the river and stone the river and stone.",
        "Another line with different words to keep repetition low, and the end.",
    ]
)


def _gopher_rules():
    from cleaning.filters import gopher_signals

    s = gopher_signals(RICH)
    # (field, signal, value, direction): direction -1 for minimum rules (value < threshold rejects)
    return [
        ("min_doc_words", "words", s["words"], -1),
        ("max_doc_words", "words", s["words"], +1),
        ("min_avg_word_length", "avg_word_length", s["avg_word_length"], -1),
        ("max_avg_word_length", "avg_word_length", s["avg_word_length"], +1),
        ("max_symbol_word_ratio", "hash_ratio", s["hash_ratio"], +1),
        ("max_bullet_lines_ratio", "bullet_lines_ratio", s["bullet_lines_ratio"], +1),
        ("max_ellipsis_lines_ratio", "ellipsis_lines_ratio", s["ellipsis_lines_ratio"], +1),
        ("min_alpha_words_ratio", "alpha_words_ratio", s["alpha_words_ratio"], -1),
        ("min_stop_words", "stop_words", s["stop_words"], -1),
    ]


@pytest.mark.parametrize("rule", range(9))
def test_gopher_quality_threshold_boundaries(rule):
    field, signal, value, direction = _gopher_rules()[rule]
    assert 0 < value < 1e6
    run_at = run(GopherQualityFilter(GopherQualityConfig(**{field: value})), RICH)
    assert list(run_at[0]) == ["d0"], (field, value)
    step = 1 if field.endswith(("words", "stop_words")) else EPS
    past = value - step if direction > 0 else value + step
    _, rejected, _ = run(GopherQualityFilter(GopherQualityConfig(**{field: past})), RICH)
    assert rejected["d0"]["signal"] == signal and rejected["d0"]["value"] == pytest.approx(value)


REPETITIVE = "\n\n".join(
    ["one two three four five six"] * 2 + ["alpha beta gamma", "one two three four five six"]
)


@pytest.mark.parametrize(
    ("field", "n"),
    [("dup_para_frac", None), ("dup_para_char_frac", None), ("dup_line_frac", None),
     ("dup_line_char_frac", None), ("top_n_grams", 2), ("top_n_grams", 4), ("dup_n_grams", 5),
     ("dup_n_grams", 6)],
)  # fmt: skip
def test_gopher_repetition_threshold_boundaries(field, n):
    off = {"dup_para_frac": None, "dup_para_char_frac": None, "dup_line_frac": None,
           "dup_line_char_frac": None, "top_n_grams": {}, "dup_n_grams": {}}  # fmt: skip
    signals = RepetitionSignals(REPETITIVE)
    value = {
        "dup_para_frac": lambda: signals.paragraphs()[0],
        "dup_para_char_frac": lambda: signals.paragraphs()[1],
        "dup_line_frac": lambda: signals.lines()[0],
        "dup_line_char_frac": lambda: signals.lines()[1],
        "top_n_grams": lambda: signals.top_ngram(n),
        "dup_n_grams": lambda: signals.duplicate_ngrams(n),
    }[field]()
    assert value > 0

    def config(limit):
        return GopherRepetitionConfig(**(off | {field: {n: limit} if n else limit}))

    assert list(run(GopherRepetitionFilter(config(value)), REPETITIVE)[0]) == ["d0"]
    _, rejected, _ = run(GopherRepetitionFilter(config(value - EPS)), REPETITIVE)
    assert rejected["d0"]["value"] == pytest.approx(value)


def test_fineweb_threshold_boundaries():
    line = "a line that is long enough to not count as short"
    text = "\n".join(
        [f"{line} {i}." for i in range(3)] + ["short", f"{line} 9", "dup line here.", "dup line here."]
    )
    s = FineWebSignals(text)
    values = {
        "line_punct_thr": (s.line_punct_ratio(), -1),
        "short_line_thr": (s.short_line_ratio(30), +1),
        "char_duplicates_ratio": (s.char_dup_ratio(), +1),
        "new_line_ratio": (s.list_ratio(), +1),
    }
    off = {
        "line_punct_thr": None,
        "short_line_thr": None,
        "char_duplicates_ratio": None,
        "new_line_ratio": None,
    }
    for field, (value, direction) in values.items():
        assert 0 < value < 1
        kept, _, _ = run(FineWebQualityFilter(FineWebQualityConfig(**(off | {field: value}))), text)
        assert list(kept) == ["d0"], field
        past = value - direction * EPS
        _, rejected, _ = run(FineWebQualityFilter(FineWebQualityConfig(**(off | {field: past}))), text)
        assert rejected["d0"]["value"] == pytest.approx(value), field


def test_c4_line_threshold_boundaries():
    five = "One is here. Two is here. Three is here. Four is here. Five is here."
    three_words = "Exactly three words."
    long_word = "A " + "x" * 1000 + " word."
    kept, _, _ = run(C4QualityFilter(C4QualityConfig()), f"{five}\n{three_words}\n{long_word}")
    assert kept["d0"] == f"{five}\n{three_words}\n{long_word}"  # 3 words and a 1000-character word stay
    kept, _, _ = run(C4QualityFilter(C4QualityConfig(min_words_per_line=4, max_word_length=999)),
                     f"{five}\n{three_words}\n{long_word}")  # fmt: skip
    assert kept["d0"] == five


def test_kept_documents_carry_every_signal_their_filter_computed():
    """Signals go to ``meta`` under the filter's prefix, equal to the signal functions' own values; a
    rejected document has those computed up to the rule it broke."""
    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 9))) for _ in range(300)]
    text = "\n".join(" ".join(rng.choice(vocab) for _ in range(10)) + "." for _ in range(12))
    listy = "\n".join(["a", "b", "c", "d"] * 5)
    batch = document_table([text, listy], source="t").to_batches()[0]
    for stage, prefix in (
        (GopherRepetitionFilter(GopherRepetitionConfig()), "repetition"),
        (FineWebQualityFilter(FineWebQualityConfig()), "fineweb"),
    ):
        ctx = StageContext("clean")
        kept = [r for b in stage.run([batch], ctx) for r in b.to_pylist()]
        assert [r["id"] for r in kept] == ["d0"]
        meta = dict(kept[0]["meta"])
        if prefix == "repetition":
            signals = RepetitionSignals(text)
            assert meta["repetition.dup_line_frac"] == signals.lines()[0]
            assert meta["repetition.top_2_gram"] == signals.top_ngram(2)
            assert meta["repetition.duplicated_10_n_grams"] == signals.duplicate_ngrams(10)
            assert len([k for k in meta if k.startswith("repetition.")]) == 4 + 3 + 6
        else:
            signals = FineWebSignals(text)
            assert meta["fineweb.line_punct_ratio"] == signals.line_punct_ratio() == 1.0
            assert meta["fineweb.short_line_ratio"] == signals.short_line_ratio(30)
            assert meta["fineweb.char_dup_ratio"] == signals.char_dup_ratio()
            assert meta["fineweb.list_ratio"] == signals.list_ratio()
        rejected = [r for b in ctx.rejected for r in b.to_pylist()]
        (row,) = rejected
        assert dict(row["meta"])[f"{prefix}.{row['signal']}"] == row["value"]


def test_clean_config_thresholds_are_the_published_cuts_by_meta_key():
    from orchestration.config import CleanConfig

    cuts = CleanConfig.model_validate({"fineweb": {}, "c4": {}}).thresholds()
    assert cuts["lang_score"] == [0.65]  # FineWeb's English threshold
    assert cuts["gopher.words"] == [50, 100_000]  # Gopher, Rae et al. 2021 appendix A
    assert cuts["gopher.hash_ratio"] == cuts["gopher.ellipsis_ratio"] == [0.1]
    assert cuts["repetition.dup_line_frac"] == [0.3] and cuts["repetition.top_4_gram"] == [0.16]
    assert cuts["repetition.duplicated_10_n_grams"] == [0.10]
    assert cuts["fineweb.line_punct_ratio"] == [0.12] and cuts["fineweb.list_ratio"] == [0.3]
    assert cuts["c4.sentences"] == [5]
    off = CleanConfig.model_validate({"gopher": {"min_doc_words": None}, "language": None}).thresholds()
    assert off["gopher.words"] == [100_000] and "lang_score" not in off and "fineweb.list_ratio" not in off
