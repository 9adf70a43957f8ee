"""The data-quality report as one self-contained HTML page: plotly charts (plotly.js inlined once, nothing
fetched), example documents, duplicate clusters side by side, training and evaluation, the lineage.

Everything is read from the work dir with pyarrow, column by column and batch by batch: text lengths
with ``pyarrow.compute.utf8_length``, quality signals from the ``meta`` map column, binned with numpy, so
the page holds counts per bin, never the documents (a few sampled examples aside), and its size does not
grow with the corpus. Training curves come from the MLflow run when its store is reachable, else from the
train stage's summary.
"""

from __future__ import annotations

import difflib
import html
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.offline
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from plotly.colors import qualitative

from core.manifest import dataset_files, index_digest
from core.redact import redact
from core.storage import Store, open_input_file, uri_scheme
from ingestion.readers import ReadConfig, corpus_format, decode_html, find_htmls
from orchestration.config import CleanConfig
from orchestration.instances import output_path
from orchestration.report import (
    MODEL_RECORD,
    RUN_RECORD,
    STAGE_CONFIG,
    build_report,
    chains,
    local_output,
    run_stages,
)

KEPT, REJECTED = "#2f7ed8", "#e4572e"
PALETTE = qualitative.Plotly
_FUNNEL_COLORS = ["#c9d6df", "#b3c6d3", "#9db4c0", "#7aa6c2", KEPT, "#2968b8", "#1f5fa8", "#174a84"]
_BATCH = 65_536
_EXAMPLES = 3  # per rejection reason
_SNIPPET = 700  # characters of an example's text
_RAW_HTML = 20_000  # characters of an example's raw HTML embedded in the page
_NOT_SIGNALS = {"warc_offset"}


# ---- reading ----------------------------------------------------------------------------------------


def _parquet_files(out_dir: Store) -> list[Path | str]:
    """The output's Parquet files in index order; none when the stage has not committed one."""
    try:
        return dataset_files(out_dir)[1]
    except FileNotFoundError:
        return []


def _batches(out_dir: Store, columns: list[str]):
    for path in _parquet_files(out_dir):
        with open_input_file(path) as source:
            f = pq.ParquetFile(source)
            present = [c for c in columns if c in f.schema_arrow.names]
            yield from f.iter_batches(batch_size=_BATCH, columns=present)


class _Docs:
    """Column-wise facts of one documents output: text lengths, signals, languages and hosts."""

    def __init__(self, out_dir: Store, rejected: bool = False):
        self.lengths: list[np.ndarray] = []
        self.signals: dict[str, list[np.ndarray]] = defaultdict(list)
        self.langs: dict[str, int] = defaultdict(int)
        self.hosts: dict[str, int] = defaultdict(int)
        columns = ["text", "meta", "lang", "url"] + (["filter", "signal", "threshold"] if rejected else [])
        self.reasons: list[pa.Table] = []
        for batch in _batches(out_dir, columns):
            names = batch.schema.names
            if "text" in names:
                self.lengths.append(pc.utf8_length(batch.column("text")).fill_null(0).to_numpy(False))
            if "meta" in names:
                self._signals(batch.column("meta"))
            if "lang" in names:
                self._count(self.langs, batch.column("lang").fill_null("unknown"))
            if "url" in names:
                host = pc.extract_regex(batch.column("url"), r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<host>[^/?#]+)")
                self._count(self.hosts, pc.struct_field(host, "host").fill_null("(no url)"))
            if rejected:
                self.reasons.append(pa.Table.from_batches([batch.select(["filter", "signal", "threshold"])]))

    def _signals(self, meta: pa.Array) -> None:
        if not isinstance(meta, pa.MapArray) or len(meta.keys) == 0:
            return
        keys = meta.keys.dictionary_encode()
        values = meta.items.to_numpy(zero_copy_only=False)
        codes = keys.indices.to_numpy(zero_copy_only=False)
        for code, name in enumerate(keys.dictionary.to_pylist()):
            self.signals[name].append(values[codes == code])

    @staticmethod
    def _count(into: dict[str, int], column: pa.Array) -> None:
        counts = pc.value_counts(column)
        for value, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            into[value] += n

    @property
    def n(self) -> int:
        return int(sum(len(x) for x in self.lengths))

    @property
    def chars(self) -> int:
        return int(sum(int(x.sum()) for x in self.lengths))

    def length_values(self) -> np.ndarray:
        return np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)

    def signal(self, name: str) -> np.ndarray:
        parts = self.signals.get(name)
        return np.concatenate(parts) if parts else np.zeros(0)


def _reason(table: pa.Table | pa.RecordBatch) -> pa.Array:
    """A rejection's reason, ``filter: signal``, without per-document detail (decontamination's signal
    is ``task: n-gram``; its reason is the task)."""
    signal = pc.fill_null(table.column("signal"), "")
    is_task = pc.equal(table.column("filter"), "decontaminate")
    signal = pc.if_else(is_task, pc.replace_substring_regex(signal, r": .*$", ""), signal)
    return pc.binary_join_element_wise(table.column("filter"), signal, ": ")


def _reason_counts(rejected: _Docs) -> list[tuple[str, int, float | None]]:
    """(reason, documents, threshold) per rejection reason, most frequent first."""
    if not rejected.reasons:
        return []
    table = pa.concat_tables(rejected.reasons)
    grouped = (
        pa.table({"reason": _reason(table), "threshold": table.column("threshold")})
        .group_by("reason")
        .aggregate([("reason", "count"), ("threshold", "max")])
        .sort_by([("reason_count", "descending")])
    )
    return list(
        zip(
            grouped.column("reason").to_pylist(),
            grouped.column("reason_count").to_pylist(),
            grouped.column("threshold_max").to_pylist(),
        )
    )


def _rejection_examples(out_dir: Store) -> dict[str, list[dict[str, Any]]]:
    """Up to ``_EXAMPLES`` rejected documents per reason, in corpus order."""
    picked: dict[str, list[dict[str, Any]]] = defaultdict(list)
    columns = [
        "id",
        "url",
        "source",
        "lang",
        "text",
        "filter",
        "signal",
        "value",
        "threshold",
        "duplicate_of",
        "meta",
    ]
    for batch in _batches(out_dir, columns):
        for i, reason in enumerate(_reason(batch).to_pylist()):
            if len(picked[reason]) < _EXAMPLES:
                row = batch.slice(i, 1).to_pylist()[0]
                row["text"] = (row.get("text") or "")[:_SNIPPET]
                picked[reason].append(row)
    return dict(picked)


# ---- figures ----------------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, height: int = 320, **kw: Any) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 14}},
        height=height,
        margin={"l": 50, "r": 20, "t": 40, "b": 40},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
        modebar={"orientation": "v"},  # down the right edge: over the title, it hid its end
        font={"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
        **kw,
    )
    return fig


def _div(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _histogram(name: str, kept: np.ndarray, rejected: np.ndarray, thresholds: list[float]) -> go.Figure:
    """Kept vs rejected counts in shared bins (0.5th-99.5th percentile of each side, so that a handful of
    rejected documents stay on the axis; outliers land in the end bins),
    with the filter's thresholds drawn (a cut far outside the data, such as Gopher's 100,000 words, is
    named in the title instead of stretching the axis)."""
    sides = [v[np.isfinite(v)] for v in (kept.astype(np.float64), rejected.astype(np.float64))]
    ranges = [np.percentile(v, [0.5, 99.5]) for v in sides if len(v)]  # each side's: a few rejected
    lo, hi = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 1.0)  # stay on it
    if hi - lo < 1e-9:  # one value (a signal at 0 everywhere): a unit-wide axis around it
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    drawn = [t for t in thresholds if np.isfinite(t) and lo - 3 * span <= t <= hi + 3 * span]
    off = [t for t in thresholds if t not in drawn]
    if drawn:
        lo, hi = min(lo, *drawn), max(hi, *drawn)
    edges = np.linspace(lo, hi, 41)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for label, values, color in (("kept", kept, KEPT), ("rejected", rejected, REJECTED)):
        counts, _ = np.histogram(np.clip(values[np.isfinite(values)], lo, hi), edges)
        fig.add_bar(x=centers, y=counts, name=f"{label} ({len(values):,})", marker_color=color, opacity=0.75)
    for t in drawn:
        fig.add_vline(x=t, line_dash="dash", line_color="#333",
                      annotation_text=f"threshold {t:g}", annotation_position="top")  # fmt: skip
    title = name + "".join(f" (threshold {t:g}, off the axis)" for t in off)
    return _layout(fig, title, 260, barmode="overlay", bargap=0.02)


def _bars(title: str, before: dict[str, int], after: dict[str, int], top: int) -> go.Figure:
    names = sorted(before, key=lambda k: -before[k])[:top]
    fig = go.Figure()
    fig.add_bar(
        y=names, x=[before[n] for n in names], name="before cleaning", orientation="h", marker_color="#9db4c0"
    )
    fig.add_bar(y=names, x=[after.get(n, 0) for n in names], name="after cleaning and dedup", orientation="h",
                marker_color=KEPT)  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, 120 + 26 * len(names), barmode="group")


# ---- sections ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else _e(x)


def _funnel(
    stages: dict[str, dict[str, Any]], facts: dict[str, _Docs], tables: dict[str, list[dict[str, Any]]]
) -> tuple[str, dict[str, float]]:
    steps: list[tuple[str, int, int | None, int | None]] = []  # (step, documents, characters, tokens)
    if "crawl" in stages:
        crawl = stages["crawl"]["counters"]
        fetched = int(crawl.get("pages_fetched", 0))
        if crawl.get("fetch_failures"):  # 404s, robots.txt refusals...: URLs that gave no page
            steps.append(("URLs requested", fetched + int(crawl["fetch_failures"]), None, None))
        steps.append(("crawled pages", fetched, None, None))
    if "clean" in facts:
        kept, rej = facts["clean"], facts["clean/rejected"]
        total = kept.n + rej.n
        steps.append(("extracted documents", total, kept.chars + rej.chars, None))
        steps.append(("after quality filters", kept.n, kept.chars, None))
    if "dedup" in facts:
        steps.append(("after deduplication", facts["dedup"].n, facts["dedup"].chars, None))
    if "dedup_across" in stages:
        steps.append(
            (
                "after deduplication across sources",
                int(stages["dedup_across"]["counters"]["kept"]),
                None,
                None,
            )
        )
    if "quality" in stages:
        steps.append(("after quality selection", int(stages["quality"]["counters"]["kept"]), None, None))
    if "tokenize" in stages:
        c = stages["tokenize"]["counters"]
        steps.append(("tokenized", int(c["documents"]), None, int(c["tokens"])))
    if not steps:
        return "", {}
    fig = go.Figure(go.Funnel(y=[s[0] for s in steps], x=[s[1] for s in steps], textinfo="value+percent initial",
                              marker={"color": _FUNNEL_COLORS[-len(steps):]}))  # fmt: skip
    _layout(fig, "Documents after each stage", 300)
    rows, prev, key_figures = [], None, {}
    for name, docs, chars, tokens in steps:
        removed = "" if prev in (None, 0) else f"{1 - docs / prev:.1%}"
        rows.append(
            [
                _e(name),
                _num(docs),
                "" if chars is None else _num(chars),
                "" if tokens is None else _num(tokens),
                removed,
            ]
        )
        key_figures[f"report.documents.{name.replace(' ', '_')}"] = float(docs)
        share = None if prev in (None, 0) else round(1 - docs / prev, 6)
        tables["report/funnel.json"].append(
            {"step": name, "documents": docs, "characters": chars, "tokens": tokens, "removed": share}
        )
        prev = docs
    table = _table(["step", "documents", "characters", "tokens", "removed at this step"], rows, "funnel")
    return _div(fig) + table + _not_fetched(stages.get("crawl")), key_figures


def _not_fetched(crawl: dict[str, Any] | None) -> str:
    """The crawl's URLs that gave no page, by reason (``failed.http_404``, ``failed.robots_disallowed``...)."""
    failed = {
        k.removeprefix("failed."): v
        for k, v in (crawl or {}).get("counters", {}).items()
        if k.startswith("failed.")
    }
    if not failed:
        return ""
    rows = [[_e(reason), _num(int(n))] for reason, n in sorted(failed.items(), key=lambda kv: -kv[1])]
    return "<p>URLs the crawl requested that gave no page, by reason:</p>" + _table(
        ["reason", "URLs"], rows, "facts"
    )


def _rejections(
    workdir: Store, facts: dict[str, _Docs], raw_files: dict[str, str]
) -> tuple[str, list[dict[str, Any]]]:
    parts, records = [], []
    for stage in ("clean", "dedup"):
        rejected = facts.get(f"{stage}/rejected")
        if rejected is None or not rejected.n:
            continue
        counts = _reason_counts(rejected)
        records += [{"stage": stage, "reason": r, "documents": n, "threshold": t} for r, n, t in counts]
        fig = go.Figure(go.Bar(y=[r for r, _, _ in counts], x=[n for _, n, _ in counts], orientation="h",
                               marker_color=REJECTED, text=[n for _, n, _ in counts], textposition="auto"))  # fmt: skip
        fig.update_yaxes(autorange="reversed")
        parts.append(
            _div(_layout(fig, f"{stage}: documents rejected, by filter and reason", 110 + 28 * len(counts)))
        )
        examples = _rejection_examples(workdir / stage / "rejected")
        raw = _raw_records(raw_files, examples)
        for reason, n, _ in counts:
            items = []
            for row in examples.get(reason, []):
                value, threshold = row.get("value"), row.get("threshold")
                against = (
                    ""
                    if value is None
                    else f"value {value:.4g}"
                    + ("" if threshold is None else f" against threshold {threshold:.4g}")
                )
                dup = (
                    f" — duplicate of <code>{_e(row['duplicate_of'])}</code>"
                    if row.get("duplicate_of")
                    else ""
                )
                if row.get("lang"):
                    dup += f" · language <code>{_e(row['lang'])}</code>"
                items.append(
                    f'<div class="example"><div class="meta"><a href="{_e(row.get("url") or "")}">{_e(row.get("url") or row["id"])}</a>'
                    f" · {_e(against)}{dup}</div><pre>{_e(row['text'])}</pre>{_raw_record(row, raw)}</div>"
                )
            parts.append(f'<details class="reason"><summary><b>{_e(reason)}</b> — {n:,} documents '
                         f"(examples)</summary>{''.join(items)}</details>")  # fmt: skip
    if not parts:
        return ("<p>No document was rejected.</p>" if facts else ""), records
    return "".join(parts), records


def _thresholds(clean_config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each signal's cuts by its ``meta`` key: from the clean stage's config saved beside its output,
    else (an output written before configs were saved) from the thresholds its rejections name."""
    saved = clean_config.get("clean")
    if saved is not None:
        try:
            return CleanConfig.model_validate(saved).thresholds()
        except ValueError:
            pass
    cuts: dict[str, list[float]] = defaultdict(list)
    for r in records:
        signal = r["reason"].split(": ", 1)[-1]
        if r["threshold"] is not None and r["stage"] == "clean":
            cuts[f"gopher.{signal}" if r["reason"].startswith("gopher_quality") else signal].append(
                r["threshold"]
            )
    return dict(cuts)


def _warc_files(workdir: Store, clean_config: dict[str, Any]) -> dict[str, str]:
    """The WARC files (paths or URIs) documents name as their ``source``: the crawl's, and local
    ``read.paths`` WARCs."""
    crawl = workdir / "crawl"
    files = {Path(p).name: crawl.uri_of(p) for p in crawl.files() if "/" not in p and ".warc" in p}
    read = clean_config.get("read")
    try:
        inputs = ReadConfig.model_validate(read).inputs() if read else []
    except (ValueError, OSError):  # inputs moved or gone since the run
        inputs = []
    for entry in inputs:
        if uri_scheme(entry) is None and corpus_format(entry) == "warc":
            files.setdefault(Path(entry).name, str(Path(entry).resolve()))
    return files


def _raw_records(
    files: dict[str, str], examples: dict[str, list[dict[str, Any]]]
) -> dict[str, tuple[str, str]]:
    """The raw HTML of each example, by document id, with the file it came from: read from its WARC
    file (``files``, by name) at the record's ``warc_offset``, one pass per file, or from the HTML file a
    directory corpus was read from."""
    wanted: dict[str, dict[str, int | None]] = defaultdict(dict)
    found: dict[str, tuple[str, str]] = {}
    for row in (row for rows in examples.values() for row in rows):
        offset = dict(row.get("meta") or []).get("warc_offset")
        url = row.get("url") or ""
        if (path := files.get(row.get("source") or "")) is not None:
            wanted[path][row["id"]] = None if offset is None else int(offset)
        elif url.startswith("file://") and (page := Path(url[7:])).is_file():
            found[row["id"]] = (str(page), decode_html(page.read_bytes()[: 4 * _RAW_HTML], ""))
    for path, ids in wanted.items():
        found |= {doc_id: (path, page) for doc_id, page in find_htmls(path, ids).items()}
    return found


def _raw_record(row: dict[str, Any], raw: dict[str, tuple[str, str]]) -> str:
    """The example's raw HTML, expandable, with a link to the file that holds it."""
    if row["id"] not in raw:
        return ""
    path, page = raw[row["id"]]
    name = Path(path.split("?")[0]).name
    link = redact(path) if uri_scheme(path) else Path(path).as_uri()
    offset = dict(row.get("meta") or []).get("warc_offset")
    where = f"{name}, record at byte {int(offset):,} of the decompressed WARC" if offset is not None else name
    cut = f", first {_RAW_HTML:,} shown" if len(page) > _RAW_HTML else ""
    return (
        f'<details class="raw"><summary>raw HTML record ({len(page):,} characters{cut})</summary>'
        f'from <a href="{_e(link)}">{_e(where)}</a><pre>{_e(page[:_RAW_HTML])}</pre></details>'
    )


def _distributions(
    facts: dict[str, _Docs], thresholds: dict[str, list[float]], tables: dict[str, list[dict[str, Any]]]
) -> str:
    kept, rejected = facts.get("clean"), facts.get("clean/rejected")
    if kept is None or rejected is None:
        return ""
    figs = [_histogram("document length (characters)", kept.length_values(), rejected.length_values(), [])]
    for name in sorted(set(kept.signals) | set(rejected.signals)):
        if name.startswith("pii.") or name in _NOT_SIGNALS:  # redaction counts, record positions
            continue
        values = kept.signal(name), rejected.signal(name)
        figs.append(_histogram(name, *values, thresholds.get(name, [])))
        tables["report/signals.json"].append(_signal_row(name, *values))
    return '<div class="grid">' + "".join(f'<div class="cell">{_div(f)}</div>' for f in figs) + "</div>"


def _signal_row(name: str, kept: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    """One signal's kept and rejected quartiles, for comparing runs in MLflow."""
    row: dict[str, Any] = {"signal": name}
    for label, values in (("kept", kept), ("rejected", rejected)):
        values = values[np.isfinite(values)]
        row[f"{label}_documents"] = len(values)
        quartiles = np.percentile(values, [25, 50, 75]) if len(values) else [None] * 3
        for q, v in zip(("p25", "median", "p75"), quartiles):
            row[f"{label}_{q}"] = None if v is None else round(float(v), 6)
    return row


def _languages_and_domains(facts: dict[str, _Docs], tables: dict[str, list[dict[str, Any]]]) -> str:
    if "clean" not in facts:
        return ""
    before_l, before_h = defaultdict(int), defaultdict(int)
    for part in (facts["clean"], facts["clean/rejected"]):
        for k, v in part.langs.items():
            before_l[k] += v
        for k, v in part.hosts.items():
            before_h[k] += v
    final = facts.get("dedup", facts["clean"])
    tables["report/languages.json"] = [
        {"language": lang, "documents_before": n, "documents_after": final.langs.get(lang, 0)}
        for lang, n in sorted(before_l.items(), key=lambda kv: -kv[1])
    ]
    return (
        '<div class="grid">'
        f'<div class="cell">{_div(_bars("languages (documents)", before_l, final.langs, 12))}</div>'
        f'<div class="cell">{_div(_bars("top domains (documents)", before_h, final.hosts, 15))}</div></div>'
    )


def _texts_by_id(out_dir: Store, ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in _parquet_files(out_dir) if ids else []:
        with open_input_file(path) as f:
            table = pq.read_table(f, columns=["id", "text"], filters=[("id", "in", ids)])
        found |= dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return found


def _duplicates(workdir: Store, index: dict[str, Any] | None, stage: str = "dedup") -> str:
    if index is None or not index.get("clusters"):
        return ""
    with open_input_file((workdir / stage).uri_of(index["clusters"]["path"])) as f:
        clusters = pq.read_table(f)
    if clusters.num_rows == 0:
        return "<p>No duplicate clusters.</p>"
    sizes = pc.value_counts(clusters.column("size"))
    fig = go.Figure(
        go.Bar(x=sizes.field("values").to_pylist(), y=sizes.field("counts").to_pylist(), marker_color=KEPT)
    )
    fig.update_xaxes(title="cluster size (documents)", dtick=1)
    fig.update_yaxes(title="clusters")
    out = [_div(_layout(fig, f"{clusters.num_rows:,} duplicate clusters by size", 280))]
    top = clusters.slice(0, 3).to_pylist()  # largest first
    shown = (
        f"The {len(top)} largest of {clusters.num_rows:,} clusters"
        if clusters.num_rows > len(top)
        else f"Every cluster ({clusters.num_rows})"
    )
    out.append(f"<p>{shown}, the kept document beside one removed copy:</p>")
    kept = _texts_by_id(workdir / stage, [c["representative"] for c in top])
    removed = _texts_by_id(workdir / stage / "rejected", [c["members"][0] for c in top if c["members"]])
    differ = difflib.HtmlDiff(wrapcolumn=70)
    for c in top:
        a, b = kept.get(c["representative"], ""), removed.get(c["members"][0] if c["members"] else "", "")
        diff = differ.make_table(_lines(a), _lines(b), f"kept {c['representative'][:12]}",
                                 f"removed {c['members'][0][:12] if c['members'] else ''}", context=True, numlines=2)  # fmt: skip
        out.append(f'<details class="cluster"><summary>cluster of {c["size"]} — kept <code>{_e(c["representative"])}</code>'
                   f"</summary>{diff}</details>")  # fmt: skip
    return "".join(out)


def _quality(classifier: dict[str, Any] | None, quality: dict[str, Any] | None) -> str:
    """The classifier's held-out figures, and each scored source's score histogram with the cut (or the
    tier boundaries)."""
    if quality is None:
        return ""
    figures = quality.get("quality", {})
    html_ = ""
    if classifier is not None:
        c = classifier["counters"]
        html_ += _table(
            ["classifier", "trained on", "held out", "precision", "recall", "F1", "accuracy"],
            [
                [
                    _e(figures.get("classifier_digest", "")[:12]),
                    f"{_num(c['train_documents'])} ({_num(c['positives'])} positive, {_num(c['negatives'])} negative)",
                    _num(c["test_documents"]),
                    *(f"{c[k]:.3f}" for k in ("precision", "recall", "f1", "accuracy")),
                ]
            ],
        )
    select = figures.get("select", {})
    cuts = select.get("tiers") or ([figures["cut"]] if figures.get("cut") is not None else [])
    for source, sides in figures.get("histograms", {}).items():
        edges = np.linspace(0, 1, len(sides["kept"]) + 1)
        fig = go.Figure()
        for side, color in (("kept", KEPT), ("rejected", REJECTED)):
            fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=sides[side], marker_color=color, opacity=0.75,
                        name=f"{side} ({_num(sum(sides[side]))})")  # fmt: skip
        for t in cuts:
            fig.add_vline(x=t, line_dash="dash", line_color="#333",
                          annotation_text=f"cut {t:.4g}", annotation_position="top")  # fmt: skip
        title = f"{source}: quality score ({_num(sum(map(sum, sides.values())))} documents)"
        html_ += _div(_layout(fig, title, 260, barmode="overlay", bargap=0.02))
    return html_


def _lines(text: str) -> list[str]:
    return [line[:300] for line in (text or "").splitlines()[:120]]


def _tokens(index: dict[str, Any] | None) -> str:
    if index is None:
        return ""
    shards = [
        (split, s["path"], s["tokens"])
        for split, info in index.get("splits", {}).items()
        for s in info["shards"]
    ]
    fig = go.Figure()
    for split, color in (("train", KEPT), ("val", "#f0a202")):
        mine = [s for s in shards if s[0] == split]
        fig.add_bar(
            x=[s[1].removesuffix(".arrow") for s in mine],
            y=[s[2] for s in mine],
            name=split,
            marker_color=color,
        )
    _layout(fig, "tokens per shard", 280)
    tok, c = index.get("tokenizer", {}), index.get("counters", {})
    facts = [
        ["tokenizer id", f"<code>{_e(tok.get('id', '')[:16])}</code>"],
        ["vocabulary", _num(tok.get("vocab_size"))],
        ["end-of-document token", f"<code>{_e(tok.get('eos_token'))}</code> (id {tok.get('eos_id')})"],
        ["train", f"{_num(c.get('train_documents'))} documents, {_num(c.get('train_tokens'))} tokens"],
        ["validation", f"{_num(c.get('val_documents'))} documents, {_num(c.get('val_tokens'))} tokens"],
        ["split rule", _e(index.get("split_rule", {}).get("method", ""))],
    ]
    return _div(fig) + _table(["", ""], facts, "facts")


def _training_history(workdir: Store) -> dict[str, dict[int, float]]:
    """Step metrics of the training run from MLflow (loss, lr, eval/...), else the losses of summary.json."""
    model = workdir.read_json(f"train/{MODEL_RECORD}")
    history: dict[str, dict[int, float]] = {}
    uri = model.get("tracking_uri", "")
    if model.get("model_id") and uri.startswith(("sqlite:", "file:", "http://127.0.0.1", "http://localhost")):
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            run_id = client.get_logged_model(model["model_id"]).source_run_id
            keys = [
                k
                for k in client.get_run(run_id).data.metrics
                if k in ("loss", "lr", "grad_norm") or k.startswith(("eval/", "mixture/"))
            ]
            for key in keys:
                history[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        except Exception:  # noqa: BLE001 (an unreachable store leaves the summary's losses)
            history = {}
    if "loss" not in history:
        losses = workdir.read_json("train/summary.json").get("losses", [])
        if losses:
            history["loss"] = {i + 1: v for i, v in enumerate(losses)}
    return history


def _training(workdir: Store, index: dict[str, Any]) -> str:
    history = _training_history(workdir)
    if not history:
        return ""
    return _curves(history) + _mixture(index, history)


def _curves(history: dict[str, dict[int, float]]) -> str:

    def curve(fig: go.Figure, key: str, name: str | None = None) -> None:
        points = sorted(history[key].items())
        fig.add_scatter(x=[s for s, _ in points], y=[v for _, v in points], name=name or key,
                        mode="lines+markers" if len(points) < 30 else "lines")  # fmt: skip

    figs = []
    loss = go.Figure()
    curve(loss, "loss", "training loss")
    if "eval/val_loss" in history:
        curve(loss, "eval/val_loss", "held-out loss (periodic)")
    figs.append(_layout(loss, "loss", 280, xaxis_title="step"))
    if "lr" in history:
        lr = go.Figure()
        curve(lr, "lr", "learning rate")
        figs.append(_layout(lr, "learning rate", 280, xaxis_title="step"))
    tasks = sorted(k for k in history if k.startswith("eval/") and k.endswith(("/acc", "/acc_norm")))
    if tasks:
        ev = go.Figure()
        for key in tasks:
            curve(ev, key, key.removeprefix("eval/"))
        figs.append(
            _layout(ev, "benchmark accuracy during training (capped subsets)", 280, xaxis_title="step")
        )
    return '<div class="grid">' + "".join(f'<div class="cell">{_div(f)}</div>' for f in figs) + "</div>"


def _mixture(index: dict[str, Any], history: dict[str, dict[int, float]]) -> str:
    """A mixture's target against what the run saw: each source's weight per phase and its share of the
    run, the tokens seen and how often they repeat; the target and realised share at each step."""
    mixture = index.get("mixture")
    if not mixture:
        return ""
    figures, phases, c = mixture["sources"], mixture["phases"], index["counters"]
    steps = c["steps"]
    header = ["source", "training tokens", "target share", "tokens seen", "realised share", "repetition"]
    header[2:2] = [f"weight from step {p['start_step']}" for p in phases]
    rows = [
        [
            _e(source),
            _num(f["tokens"]),
            *(_num(p["weights"].get(source, 0.0)) for p in phases),
            _num(f["share"]),
            _num(c.get(f"tokens_seen.{source}")),
            _num(c.get(f"tokens_seen.{source}", 0) / c["tokens_seen"]),
            f"{c.get(f'repetition.{source}', 0):.2f}x",
        ]
        for source, f in figures.items()
    ]
    fig = go.Figure()
    per_step = c["tokens_seen"] / steps
    for n, source in enumerate(figures):
        color = PALETTE[n % len(PALETTE)]
        ends = [p["start_step"] for p in phases[1:]] + [steps]
        xs = [x for p, end in zip(phases, ends) for x in (p["start_step"], end)]
        ys = [p["weights"].get(source, 0.0) for p in phases for _ in (0, 1)]
        fig.add_scatter(
            x=xs, y=ys, name=f"{source} target", mode="lines", line={"dash": "dash", "color": color}
        )
        seen = sorted(history.get(f"mixture/tokens.{source}", {}).items())
        if seen:  # step k's share: the tokens it added (steps are 1-based in MLflow: step k ends at k)
            shares = np.diff([0.0] + [v for _, v in seen]) / per_step
            fig.add_scatter(x=[k - 1 for k, _ in seen], y=shares, name=f"{source} realised",
                            mode="lines", line={"shape": "hv", "color": color})  # fmt: skip
    fig.update_yaxes(range=[0, 1])
    return (
        "<h3>Mixture</h3>"
        + _table(header, rows, "facts")
        + _div(
            _layout(fig, "share of each global batch per step: target and realised", 300, xaxis_title="step")
        )
    )


def _evaluation(workdir: Store) -> str:
    metrics = workdir.read_json("evaluate/metrics.json")
    if not metrics:
        return ""
    tasks = metrics.pop("tasks", {})
    sources = metrics.pop("sources", {})
    rows = [[_e(k), _num(v)] for k, v in metrics.items()]
    out = _table(["held-out split", "value"], rows, "facts")
    if sources:
        keys = [k for k in metrics if k not in ("tokens", "bytes") and all(k in m for m in sources.values())]
        rows = [[_e(s), *(_num(m[k]) for k in keys)] for s, m in sources.items()]
        out += _table(["held-out split of source", *keys], rows, "facts")
    if tasks:
        fig = go.Figure()
        for metric, color in (("acc", KEPT), ("acc_norm", "#1f5fa8")):
            names = [n for n, t in tasks.items() if metric in t["metrics"]]
            fig.add_bar(x=names, y=[tasks[n]["metrics"][metric] for n in names], name=metric, marker_color=color,
                        error_y={"type": "data", "array": [tasks[n]["metrics"].get(f"{metric}_stderr", 0) for n in names]})  # fmt: skip
        fig.update_yaxes(range=[0, 1])
        out = _div(_layout(fig, "benchmark scores (± standard error)", 300, barmode="group")) + out
        rows = [[_e(n), _num(int(t["metrics"].get("examples", 0))), *(_num(t["metrics"].get(m, "")) for m in ("acc", "acc_norm", "perplexity"))]
                for n, t in tasks.items()]  # fmt: skip
        out += _table(["task", "examples", "acc", "acc_norm", "perplexity"], rows, "facts")
    return out


def _finetuning(workdir: Store, index: dict[str, Any] | None) -> str:
    """The fine-tuned model on each split: headline metrics, per-class precision/recall/F1 and the
    confusion matrix (rows: true label, columns: predicted), or the seq2seq scores."""
    metrics = workdir.read_json("finetune/metrics.json")
    if index is None or not metrics:
        return ""
    c = index.get("counters", {})
    facts = [["base model", f"<code>{_e(index.get('base_model', ''))}</code>"],
             ["steps", _num(c.get("steps"))],
             ["loss", f"{_num(c.get('first_loss'))} → {_num(c.get('final_loss'))}"]]  # fmt: skip
    out = [_table(["", ""], facts, "facts")]
    for split, m in metrics.items():
        head = [k for k in _HEADLINE if k in m]
        out.append(f"<h3>{_e(split)} ({_num(m.get('examples', 0))} examples)</h3>")
        out.append(_table(["metric", "value"], [[_e(k), _num(m[k])] for k in head], "facts"))
        names = m.get("label_names", [])
        per_class = [
            [_e(n), *(_num(m.get(f"{k}/{n}", "")) for k in ("precision", "recall", "f1"))] for n in names
        ]
        if per_class:
            out.append(_table(["class", "precision", "recall", "F1"], per_class, "facts"))
        matrix = m.get("confusion_matrix")
        if matrix and names and not isinstance(matrix[0][0], list):  # single-label: classes x classes
            fig = go.Figure(go.Heatmap(z=matrix, x=names, y=names, colorscale="Blues", text=matrix,
                                       texttemplate="%{text}", showscale=False))  # fmt: skip
            fig.update_xaxes(title="predicted")
            fig.update_yaxes(title="true", autorange="reversed")
            out.append(_div(_layout(fig, f"{split}: confusion matrix", 140 + 40 * len(names))))
    return "".join(out)


#: The fine-tuning metrics shown first for a split, where present.
_HEADLINE = (
    "accuracy", "subset_accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_micro", "f1_weighted",
    "exact_match", "bleu", "chrf", "loss",
)  # fmt: skip


def _records(index: dict[str, Any]) -> str:
    """What an output holds: documents (a token dataset's once, not its shards and their id sidecars
    both), WARC records, examples; a model or metrics: none."""
    kind = index.get("kind")
    if kind == "tokens":
        return f"{_num(index.get('documents', 0))} documents"
    if kind in ("documents", "labeled"):
        rows = sum(f.get("rows", 0) for f in index.get("files", []) if f["path"].endswith(".parquet"))
        return f"{_num(rows)} {'documents' if kind == 'documents' else 'examples'}"
    if kind == "warc":
        return f"{_num(index.get('rows', 0))} WARC records"
    return "—"


def _lineage(workdir: Store, stages: dict[str, dict[str, Any]]) -> str:
    run, model = workdir.read_json(RUN_RECORD), workdir.read_json(f"train/{MODEL_RECORD}")
    rows = []
    for name, index in stages.items():
        inputs = ", ".join(f"{k} <code>{_e(v)}</code>" for k, v in index.get("inputs", {}).items()) or "—"
        rows.append([f"<b>{_e(name)}</b>", f"<code>{_e(index_digest(index))}</code>", inputs,
                     _records(index), f"<code>{_e(workdir / output_path(name))}</code>"])  # fmt: skip
    out = _table(["stage", "output digest", "read", "records", "location"], rows, "lineage")
    facts = []
    if run.get("mlflow_run_id"):
        facts.append(["pipeline run", f"<code>runs:/{_e(run['mlflow_run_id'])}</code>"])
        facts.append(["tracking store", f"<code>{_e(run.get('tracking_uri', ''))}</code>"])
    if model.get("model_id"):
        facts.append(["logged model", f"<code>models:/{_e(model['model_id'])}</code>"])
    if model.get("version"):
        facts.append(["registered version", _e(model["version"])])
    if run.get("tracking_uri"):
        facts.append(["browse", f"<code>lmforge ui --tracking-uri {_e(run['tracking_uri'])}</code>"])
    return out + (_table(["", ""], facts, "facts") if facts else "")


def _checks(rep: dict[str, Any]) -> str:
    items = "".join(
        f'<li class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {_e(name)}</li>'
        for name, ok in rep["checks"].items()
    )
    warned = "".join(f'<li class="warn">⚠ {_e(w)}</li>' for w in rep.get("warnings", []))
    return f'<ul class="checks">{items}</ul>' + (f'<ul class="warnings">{warned}</ul>' if warned else "")


# ---- the page ---------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1d2733; --muted: #5f6b7a; --line: #e3e8ee; --bg: #f6f8fa; --accent: #2f7ed8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { background: #16324f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header .sub { color: #c9d6e3; font-size: 13px; }
nav { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 32px; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 500; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 32px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
section h2 { margin: 0 0 4px; font-size: 17px; }
section p.lead { margin: 0 0 12px; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 8px 16px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
table.funnel td:not(:first-child), table.funnel th:not(:first-child) { text-align: right; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--bg); padding: 1px 4px; border-radius: 3px; }
details { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; padding: 6px 10px; }
details > summary { cursor: pointer; }
.example { border-top: 1px dashed var(--line); padding: 6px 0; }
.example .meta { color: var(--muted); font-size: 12px; }
.example pre { white-space: pre-wrap; max-height: 220px; overflow: auto; background: var(--bg); padding: 8px; margin: 4px 0; }
.example details.raw { font-size: 12px; color: var(--muted); }
.example details.raw pre { font-size: 11px; color: #333; }
ul.checks { list-style: none; padding: 0; columns: 2; }
ul.checks li.ok { color: #217a3c; } ul.checks li.bad { color: #b3261e; font-weight: 600; }
ul.warnings { list-style: none; padding: 0; } ul.warnings li.warn { color: #8a5a00; font-weight: 600; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #dff3e4; color: #217a3c; } .badge.warn { background: #fff2c6; color: #8a5a00; } .badge.bad { background: #fde7e4; color: #b3261e; }
table.diff { font: 11px ui-monospace, monospace; } .diff_header { background: var(--bg); }
.diff_add { background: #d9f5dd; } .diff_chg { background: #fff2c6; } .diff_sub { background: #fbdcd8; }
td.diff_next { display: none; }
"""

_SECTIONS = [
    ("funnel", "Funnel", "Documents, characters and tokens after each stage, and the share removed at each step."),
    ("rejections", "Rejections", "Why documents were removed, with examples: the signal's value against the filter's threshold, and the raw record."),
    ("signals", "Quality signals", "The distribution of every signal the filters computed, kept vs rejected, with the filter's cut."),
    ("languages", "Languages and domains", "Before cleaning (every extracted document) and after cleaning and deduplication."),
    ("duplicates", "Duplicates", "Cluster sizes, and the largest clusters: the kept document beside one removed copy."),
    ("quality", "Quality scores", "The quality classifier's held-out precision, recall and F1, and each scored source's score distribution with the cut."),
    ("tokens", "Tokens", "Shards, the train/validation split and the tokenizer."),
    ("training", "Training", "Loss, learning rate and periodic evaluation at each step."),
    ("evaluation", "Evaluation", "The trained model on the held-out split and the benchmark tasks."),
    ("finetuning", "Fine-tuning", "The fine-tuned model on each held-out split: its metrics, per class and as a confusion matrix."),
    ("lineage", "Lineage", "Each stage output by digest, what it read, and the MLflow run and model."),
    ("checks", "Checks", "Consistency of the manifests: every document accounted for, every input the output it names."),
]  # fmt: skip


def build_html(
    workdir: str | Path | Store, last: str | list[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The page, and the key figures for MLflow: ``metrics``, and ``tables`` (artifact name -> rows: the
    funnel, rejections by reason, each signal's kept/rejected quartiles, languages before and after)."""
    workdir = Store(workdir)
    rep = build_report(workdir, last)
    stages = run_stages(workdir, last)
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    body, key_figures = _source_sections(workdir, stages, tables)
    body |= {
        "quality": _quality(stages.get("quality_classifier"), stages.get("quality")),
        "tokens": _tokens(stages.get("tokenize")),
        "training": _training(workdir, stages["train"]) if "train" in stages else "",
        "evaluation": _evaluation(workdir) if "evaluate" in stages else "",
        "finetuning": _finetuning(workdir, stages.get("finetune")),
        "lineage": _lineage(workdir, stages),
        "checks": _checks(rep),
    }
    shown = [(key, title, lead) for key, title, lead in _SECTIONS if body[key]]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in shown)
    sections = "".join(
        f'<section id="{key}"><h2>{title}</h2><p class="lead">{lead}</p>{body[key]}</section>'
        for key, title, lead in shown
    )
    run = workdir.read_json(RUN_RECORD)
    title = run.get("name", Path(workdir.root).name)
    badge = (
        '<span class="badge ok">all checks pass</span>'
        + (
            f' <span class="badge warn">{len(rep["warnings"])} warning(s)</span>'
            if rep.get("warnings")
            else ""
        )
        if rep["ok"]
        else '<span class="badge bad">checks failed</span>'
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge report: {_e(title)}</title><style>{_CSS}</style>
<script>{plotly.offline.get_plotlyjs()}</script></head>
<body><header><h1>Data-quality report: {_e(title)} {badge}</h1>
<div class="sub">{_e(workdir)} · written {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} · stages: {_e(", ".join(stages))}</div></header>
<nav>{nav}</nav><main>{sections}</main></body></html>
"""
    key_figures["report.checks_passed"] = float(sum(rep["checks"].values()))
    key_figures["report.checks_failed"] = float(len(rep["checks"]) - sum(rep["checks"].values()))
    return page, {"metrics": key_figures, "tables": {k: v for k, v in tables.items() if v}}


def _source_sections(
    workdir: Store, stages: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, str], dict[str, float]]:
    """The corpus sections of each source's chain (headed by its name; a single corpus's as they are),
    then the duplicates found across sources; their key figures and tables (rows tagged by source)."""
    body: dict[str, str] = defaultdict(str)
    key_figures: dict[str, float] = {}
    for source, chain in chains(stages).items():
        view = {stage: stages[name] for stage, name in chain.items()}
        if "dedup_across" in stages and source is not None:  # what of it survived dedup across sources
            view["dedup_across"] = {
                "counters": {"kept": stages["dedup_across"]["counters"].get(f"kept.{source}", 0)}
            }
        if "quality" in stages:  # what of it the quality selection kept
            quality = stages["quality"]
            view["quality"] = (
                quality
                if source is None
                else {"counters": {"kept": quality["counters"].get(f"kept.{source}", 0)}}
            )
        if "tokenize" in stages:  # a source's share of the shards
            tokens = stages["tokenize"]
            view["tokenize"] = (
                tokens if source is None else {"counters": tokens.get("sources", {}).get(source, {})}
            )
        root = workdir if source is None else workdir / "sources" / source  # its chain's stages, by name
        own: dict[str, list[dict[str, Any]]] = defaultdict(list)
        sections, figures = _corpus_sections(root, view, own)
        for key, html_ in sections.items():
            if html_:
                body[key] += html_ if source is None else f"<h3>source {_e(source)}</h3>{html_}"
        key_figures |= {
            k if source is None else k.replace("report.", f"report.{source}.", 1): v
            for k, v in figures.items()
        }
        for name, rows in own.items():
            tables[name] += rows if source is None else [{"source": source, **row} for row in rows]
    if "dedup_across" in stages:
        across = _duplicates(workdir, stages["dedup_across"], "dedup_across")
        body["duplicates"] += f"<h3>across sources</h3>{across}"
    return body, key_figures


def _corpus_sections(
    root: Store, stages: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, str], dict[str, float]]:
    """The sections of one corpus's chain (``stages`` by stage name, their outputs under ``root``):
    funnel, rejections, signals, languages and duplicates; and its key figures."""
    facts: dict[str, _Docs] = {}
    for name in ("clean", "dedup"):
        if name in stages:
            facts[name] = _Docs(root / name)
            facts[f"{name}/rejected"] = _Docs(root / name / "rejected", rejected=True)
    funnel, key_figures = _funnel(stages, facts, tables)
    clean_config = root.read_json(f"clean/{STAGE_CONFIG}")
    rejections, records = _rejections(root, facts, _warc_files(root, clean_config))
    tables["report/rejections.json"] += records
    sections = {
        "funnel": funnel,
        "rejections": rejections,
        "signals": _distributions(facts, _thresholds(clean_config, records), tables),
        "languages": _languages_and_domains(facts, tables),
        "duplicates": _duplicates(root, stages.get("dedup")),
    }
    return sections, key_figures


def write_html_report(
    workdir: str | Path | Store, last: str | list[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write report.html into the work dir; returns its path on this machine and the key figures."""
    page, figures = build_html(workdir, last)
    store = Store(workdir)
    store.write_bytes("report.html", page.encode("utf-8"))
    return local_output(store, "report.html"), figures
