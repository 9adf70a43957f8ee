"""Data-quality ablation, the FineWeb method in miniature: the same small model trained for the same
number of tokens on the raw extracted text and on the cleaned + deduplicated text of one crawl, both
evaluated on the same held-out clean English text (bits per byte) and on benchmark tasks.

The crawl (``--site web``, the default): one host on 127.0.0.1 serving a small web that mixes good prose
with what real crawls are full of, all of it real text from installed Debian packages:
- the Debian Administrator's Handbook (``debian-handbook``: 3,302 HTML pages in 26 languages;
  untranslated passages stay English, so the languages share text) under /handbook/;
- rust-doc under /rust/: the Rust books (prose with code) and std's generated API index pages;
- every installed package's copyright file (the same licence texts hundreds of times over) and Debian
  changelog (bullet lists, names, e-mail addresses) under /packages/, as a package tracker shows them.
``--site handbook`` crawls the handbook alone: documentation with little junk, where cleaning has
little to remove (see benchmarks/README.md for both). ``--site demo`` crawls the generated pydoc site of
``lmforge``'s demo (8 modules, an exact and a near duplicate; no Debian package needed), with the filters
relaxed for documentation as ``--filters docs``; ``--smoke`` runs it at the smallest size: a one-layer
model, 2 steps, one worker, 4 examples of one task.

Held out: every 8th English handbook chapter file (demo: module page); the server answers 404 for that
file name everywhere, so neither corpus contains any copy of it. The held-out text is those English pages
through the clean pipeline's own stages (the same filters as "clean"), so it is clean text.

Two pipeline runs (in this process, on one embedded Ray) share everything but the cleaning, the crawl
included (fetched once: the second run finds the first's linked into its work dir, cached): "raw" extracts and normalizes only (no language, Gopher or PII step, no dedup); "clean" runs
the filters (language en, Gopher quality and repetition, PII; ``--filters docs`` relaxes Gopher for
technical documentation as configs/demo.yaml does) and exact + MinHash dedup. Both use one tokenizer (a
BPE fit on the raw corpus) and train the same GPT-2 (4 layers, width 256) for the same steps of 4,096
tokens. Goal (issue 15): the cleaned corpus wins on held-out bits per byte (``ratio`` = raw bpb / clean
bpb > 1).

    .venv/bin/python benchmarks/ablation.py [--quick | --smoke] [--site web|handbook|demo] [--steps 80]
        [--filters default|docs] [--languages all]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gzip  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import yaml  # noqa: E402

HANDBOOK = Path("/usr/share/doc/debian-handbook/html")
REPO = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="4 languages, 60 steps")
parser.add_argument("--steps", type=int, default=80, help="optimizer steps of each run (4,096 tokens each)")
parser.add_argument("--languages", default="all", help="comma-separated handbook languages, or all")
parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa")
parser.add_argument("--task-limit", type=int, default=500)
parser.add_argument(
    "--filters",
    choices=["default", "docs"],
    default="default",
    help="default: the published thresholds; docs: as configs/demo.yaml sets them for technical documentation "
    "(Gopher alpha-words ratio 0.5 instead of 0.8, no Gopher repetition filter), which keeps code-heavy pages",
)
parser.add_argument(
    "--site",
    choices=["web", "handbook", "demo"],
    default="web",
    help="web: the handbook mixed with rust-doc and package copyright/changelog pages; handbook: alone; "
    "demo: the generated pydoc site (implies --filters docs)",
)
parser.add_argument("--keep", action="store_true", help="keep the work directory")
parser.add_argument(
    "--quality",
    type=float,
    default=0.5,
    metavar="FRACTION",
    help="a third arm: the cleaned corpus's top FRACTION by a fastText quality classifier (positives: the "
    "Python documentation, else configs/data/docs.jsonl; negatives: the crawl itself, DCLM's recipe); 0: none",
)
parser.add_argument(
    "--serve",
    action="store_true",
    help="only serve the site on --port until Ctrl-C (configs/quality.yaml crawls it)",
)
parser.add_argument("--port", type=int, default=8791, help="fixed, so a rerun's crawl (and ids) is the same")
parser.add_argument("--work", type=Path, help="work directory (stages already there are reused)")
parser.add_argument(
    "--smoke", action="store_true", help="--site demo, a one-layer model, 2 steps, 4 task examples"
)
args = parser.parse_args()
if args.quick:
    args.steps, args.languages, args.task_limit = 60, "en-US,de-DE,fr-FR,ja-JP", 100
if args.smoke:
    args.site, args.steps, args.tasks, args.task_limit, args.port = "demo", 2, "arc_easy", 4, 0
if args.site == "demo":
    args.filters = "docs"  # pydoc pages are half code: the published alpha-words ratio rejects them all


def held_out_names(english: Path) -> list[str]:
    pages = sorted(p.name for p in english.glob("*.html") if p.name != "index.html")
    return pages[3::8]


RUST = Path("/usr/share/doc/rust-doc/html")
#: The rust-doc books served whole (prose and code), and the std pages served (module indexes, macros,
#: keywords; the 27,000 generated item pages of core/std/alloc are left out to bound the crawl).
RUST_BOOKS = ("book", "reference", "rust-by-example", "nomicon", "edition-guide")
RUST_STD = re.compile(r"^std/(index\.html|[a-z0-9_]+/index\.html|macro\.[^/]+\.html|keyword\.[^/]+\.html)$")
PAGE = (
    "<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head><body>{body}</body></html>"
)


def packages() -> list[str]:
    return sorted(p.name for p in Path("/usr/share/doc").iterdir() if (p / "copyright").is_file())


def package_page(name: str, kind: str) -> str | None:
    """A package's copyright or Debian changelog as a web page, as a package tracker shows them."""
    root = Path("/usr/share/doc") / name
    path = root / "copyright" if kind == "copyright" else root / "changelog.Debian.gz"
    if not path.is_file():
        return None
    text = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    body = f"<h1>{html.escape(name)}: {kind}</h1><pre>{html.escape(text.decode('utf-8', 'replace'))}</pre>"
    return PAGE.format(title=f"{html.escape(name)} {kind}", body=body)


class Handler(SimpleHTTPRequestHandler):
    """The crawl's site. ``--site handbook``: the handbook alone. ``--site web``: a small web in one host,
    mixing good prose with what real crawls are full of: the handbook in 26 languages under /handbook/;
    rust-doc under /rust/ (the Rust books' prose and code, std's generated API pages); under /packages/
    every installed package's copyright file (the same licence texts hundreds of times) and Debian
    changelog (bullet lists, names, e-mail addresses). The held-out chapter files answer 404 everywhere."""

    held_out: frozenset[str] = frozenset()
    languages: list[str] = []
    root: Path = HANDBOOK  # the site's files: --site handbook and demo

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path.rsplit("/", 1)[-1] in self.held_out:
            self.send_error(404)
            return
        if args.site in ("handbook", "demo"):
            self.directory = str(self.root)
            super().do_GET()
            return
        if path in ("/", "/index.html"):
            links = [f"/handbook/{lang}/index.html" for lang in self.languages]
            links += ["/rust/index.html", "/packages/index.html"]
            self._send(PAGE.format(title="site", body="".join(f'<a href="{u}">{u}</a><br>' for u in links)))
        elif path == "/packages/index.html":
            rows = "".join(
                f'<li>{n}: <a href="{n}/copyright.html">copyright</a> <a href="{n}/changelog.html">changelog</a></li>'
                for n in packages()
            )
            self._send(PAGE.format(title="packages", body=f"<ul>{rows}</ul>"))
        elif m := re.fullmatch(r"/packages/([^/]+)/(copyright|changelog)\.html", path):
            page = package_page(m[1], m[2])
            self._send(page) if page is not None else self.send_error(404)
        elif path.startswith("/handbook/"):
            self.directory, self.path = str(HANDBOOK), self.path[len("/handbook") :]
            super().do_GET()
        elif path.startswith("/rust/") and self._rust_allowed(path[len("/rust/") :]):
            self.directory, self.path = str(RUST), self.path[len("/rust") :]
            super().do_GET()
        else:
            self.send_error(404)

    @staticmethod
    def _rust_allowed(rel: str) -> bool:
        return (
            not rel.endswith(".html")
            or "/" not in rel
            or rel.split("/", 1)[0] in RUST_BOOKS
            or bool(RUST_STD.match(rel))
        )

    def _send(self, page: str) -> None:
        data = page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a) -> None:
        pass


def serve(held_out: list[str], languages: list[str], root: Path) -> ThreadingHTTPServer:
    Handler.held_out, Handler.languages, Handler.root = frozenset(held_out), languages, root
    server = ThreadingHTTPServer(("127.0.0.1", args.port), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


#: The quality classifier's positive documents: documentation not on the crawled site.
POSITIVES = [Path("/usr/share/doc/python3.11/html"), REPO / "configs" / "data" / "docs.jsonl"]


def positives() -> Path:
    """The Python documentation when installed (the smoke run: the shipped plain-text pydoc, seconds)."""
    return POSITIVES[-1] if args.smoke else next(p for p in POSITIVES if p.exists())


def quality_section() -> dict:
    positive = positives()
    small = args.smoke or args.site == "demo"
    return {
        "classifier": {
            "positive": [{"paths": [str(positive)]}],
            "negative": [{"source": "corpus"}],
            "max_documents": 300 if small else 20_000,
            "test_fraction": 0.3 if small else 0.1,  # the demo's 13 pages: a few held out of each class
            "fasttext": {"bucket": 20_000 if small else 200_000},
        },
        "select": {"top_fraction": args.quality},
    }


def clean_section() -> dict:
    if args.filters == "docs":
        return {"gopher": {"min_alpha_words_ratio": 0.5}, "gopher_repetition": None}
    return {}


def config(name: str, work: Path, seeds: list[str], cleaned: bool, tokenizer: str | None) -> dict:
    clean: dict = clean_section()
    dedup: dict = {"minhash": {"ngram": 5, "num_perm": 128, "threshold": 0.8}}
    if not cleaned:
        clean = {"language": None, "gopher_repetition": None, "gopher": None, "pii": None}
        dedup = {"exact": None, "minhash": None, "lines": None}
    if args.smoke:
        model, vocab, seq_len, batch, workers = {"n_layer": 1, "n_embd": 32, "n_head": 2}, 512, 64, 2, 1
    else:
        model, vocab, seq_len, batch, workers = {"n_layer": 4, "n_embd": 256, "n_head": 4}, 8192, 256, 8, 2
    return {
        "name": name,
        "workdir": str(work / name),
        "ray": {"num_cpus": 2, "dashboard": True},
        "tracking": {"experiment": "ablation"},
        "crawl": {
            "seeds": seeds,
            "allow_private_addresses": True,
            "min_delay_s": 0,
            "host_concurrency": 4,
            "max_pages": 12000,
            "max_depth": 20,
        },
        "clean": clean,
        "dedup": dedup,
        "tokenize": {
            "tokenizer": {"path": tokenizer} if tokenizer else {"vocab_size": vocab},
            # the demo's 13 pages, their ids from a free port's URLs: half, so the split holds one 64-token
            # sequence whatever ids the port makes (a fifth held one 26-token page in a CI run)
            "val_fraction": 0.5 if args.smoke else 0.02,
        },
        "train": {
            "model": {"arch": "gpt2", "preset": "debug", **model},
            "seq_len": seq_len,
            "micro_batch_size": batch,
            "num_workers": workers,
            "zero_stage": 2,
            "steps": args.steps,
            "lr": 0.002,
            "warmup_steps": max(1, args.steps // 20),
            "seed": 0,
        },
        "evaluate": {"max_batches": 1 if args.smoke else 10},
    }


def run(cfg: dict, work: Path, crawl_from: Path | None = None, reused: tuple[str, ...] = ("crawl",)) -> dict:
    """One arm: the pipeline in this process (the arms share one embedded Ray), its config kept beside its
    work dir. ``crawl_from``: a work dir whose ``reused`` stages (the crawl) this arm's equal (same config
    and code): their files are linked in, so the pipeline finds them cached instead of running them again."""
    from orchestration.config import load_config
    from orchestration.pipeline import Pipeline

    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    workdir = Path(cfg["workdir"])
    for stage in reused if crawl_from is not None else ():
        if not (workdir / stage).exists():
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(crawl_from / stage, workdir / stage, copy_function=os.link)
    start = time.perf_counter()
    Pipeline(load_config(path)).run()

    def index(stage: str) -> dict:
        return json.loads((workdir / stage / "index.json").read_text())

    train = cfg["train"]
    per_step = train["micro_batch_size"] * train["num_workers"] * train["seq_len"]
    return {
        "seconds": time.perf_counter() - start,
        "trained_tokens": train["steps"] * per_step,
        "model_dir": workdir / "train" / "model",
        "tokenizer": str(workdir / "tokenize" / "tokenizer.json"),
        "documents": index("tokenize")["counters"]["documents"],
        "train_tokens": index("tokenize")["counters"]["train_tokens"],
        "crawled": index("crawl")["rows"],
        "crawl_cached": crawl_from is not None,
    }


def held_out_texts(english: Path, names: list[str]) -> list[str]:
    """The held-out English pages through the clean pipeline's own stages (default filters): the held-out
    text is clean text."""
    import pyarrow as pa

    from core.schema import HTML_SCHEMA
    from core.stage import StageContext
    from orchestration.config import CleanConfig
    from orchestration.stages.clean import clean_stages

    pages = [(english / n).read_text(encoding="utf-8") for n in names]
    n = len(pages)
    batch = pa.RecordBatch.from_pydict(
        {
            "id": names,
            "url": [f"http://127.0.0.1/en-US/{x}" for x in names],
            "html": pages,
            "source": ["heldout"] * n,
            "lang": [None] * n,
            "fetched_at": [None] * n,
            "meta": [[] for _ in range(n)],
        },
        schema=HTML_SCHEMA,
    )
    ctx = StageContext("heldout")
    batches = [batch]
    for stage in clean_stages(CleanConfig.model_validate(clean_section())):
        batches = list(stage.run(batches, ctx))
    return [t for b in batches for t in b.column("text").to_pylist() if t]


def main() -> None:
    from benchmarks.common import result, summary
    from evaluation.harness import evaluate

    if args.site != "demo" and not HANDBOOK.is_dir():
        raise SystemExit(
            f"{HANDBOOK}: install the debian-handbook package (apt-get install debian-handbook), "
            "or use --site demo"
        )
    if args.site == "web" and not RUST.is_dir():
        raise SystemExit(
            f"{RUST}: install the rust-doc package (apt-get install rust-doc), or use --site handbook"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray's workers fork after the tokenizer ran
    work = args.work or Path(tempfile.mkdtemp(prefix="lmf-bench-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.site == "demo":
        from ingestion.demo_site import build_demo_site

        root = english = work / "site"
        build_demo_site(root, modules=8, exact_duplicates=1, near_duplicates=1, private_pages=0)
        languages = ["en"]
    else:
        root, english = HANDBOOK, HANDBOOK / "en-US"
        languages = sorted(p.name for p in HANDBOOK.iterdir() if p.is_dir())
        if args.languages != "all":
            languages = [x for x in languages if x in args.languages.split(",")]
    held_out = held_out_names(english)
    server = serve(held_out, languages, root)
    base = f"http://127.0.0.1:{server.server_port}"
    if args.site == "handbook":
        seeds = [f"{base}/{lang}/index.html" for lang in languages]
    else:
        seeds = [f"{base}/index.html"]
    if args.serve:
        print(f"serving the {args.site} site at {', '.join(seeds)} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        return
    try:
        texts = held_out_texts(english, held_out)
        heldout = work / "heldout.jsonl"
        heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        print(
            f"held out: {len(texts)} of {len(held_out)} English pages kept by the cleaning, "
            f"{sum(len(t.encode()) for t in texts):,} bytes",
            flush=True,
        )
        raw = run(config("raw", work, seeds, cleaned=False, tokenizer=None), work)
        print(
            f"raw: {raw['documents']} documents, {raw['train_tokens']:,} tokens ({raw['seconds']:.0f}s)",
            flush=True,
        )
        clean = run(
            config(
                "clean" if args.filters == "default" else "clean_docs",
                work,
                seeds,
                cleaned=True,
                tokenizer=raw["tokenizer"],
            ),
            work,
            crawl_from=Path(raw["model_dir"]).parents[1],
        )
        print(
            f"clean: {clean['documents']} documents, {clean['train_tokens']:,} tokens ({clean['seconds']:.0f}s)",
            flush=True,
        )
        arms = [("raw", raw), ("clean", clean)]
        if args.quality:
            cfg = config("quality", work, seeds, cleaned=True, tokenizer=raw["tokenizer"])
            cfg["quality"] = quality_section()
            clean_dir = Path(clean["model_dir"]).parents[1]
            quality = run(cfg, work, crawl_from=clean_dir, reused=("crawl", "clean", "dedup"))
            classifier = json.loads((Path(cfg["workdir"]) / "quality_classifier" / "index.json").read_text())
            quality["classifier"] = classifier["counters"]
            print(
                f"quality: {quality['documents']} documents, {quality['train_tokens']:,} tokens "
                f"({quality['seconds']:.0f}s); classifier held-out F1 {classifier['counters']['f1']:.3f}",
                flush=True,
            )
            arms.append(("quality", quality))
        import ray

        ray.shutdown()  # before the result line: no worker log line printed after it
        tasks = [t for t in args.tasks.split(",") if t]
        scores = {}
        for name, run_ in arms:
            evals = evaluate(run_["model_dir"], tasks=tasks, data=[str(heldout)], limit=args.task_limit)
            scores[name] = {ev.name: ev.metrics for ev in evals.values()}
            print(
                f"{name}: "
                + json.dumps(
                    {
                        k: {m: round(v, 4) for m, v in x.items() if m in ("acc", "acc_norm", "bits_per_byte")}
                        for k, x in scores[name].items()
                    }
                ),
                flush=True,
            )
        bpb = {name: s["heldout.jsonl"]["bits_per_byte"] for name, s in scores.items()}
        extra = {
            f"{name}_{task}_acc_norm": round(m.get("acc_norm", m.get("acc", float("nan"))), 4)
            for name, s in scores.items()
            for task, m in s.items()
            if task != "heldout.jsonl"
        }
        line = result(
            "ablation.heldout_bits_per_byte",
            "raw bpb / clean bpb",
            bpb["raw"],
            "the same model on the cleaned + deduplicated crawl",
            bpb["clean"],
            1.0,
            raw_bpb=round(bpb["raw"], 4),
            clean_bpb=round(bpb["clean"], 4),
            raw_documents=raw["documents"],
            clean_documents=clean["documents"],
            raw_train_tokens=raw["train_tokens"],
            clean_train_tokens=clean["train_tokens"],
            trained_tokens=raw["trained_tokens"],
            site=args.site,
            languages=len(languages),
            heldout_pages=len(texts),
            **extra,
        )
        lines = [line]
        if args.quality:
            c = quality["classifier"]
            lines.append(
                result(
                    "ablation.quality_heldout_bits_per_byte",
                    "clean bpb / quality bpb",
                    bpb["clean"],
                    f"the same model on the cleaned corpus's top {args.quality:.0%} by the quality classifier",
                    bpb["quality"],
                    1.0,
                    clean_bpb=round(bpb["clean"], 4),
                    quality_bpb=round(bpb["quality"], 4),
                    quality_documents=quality["documents"],
                    quality_train_tokens=quality["train_tokens"],
                    trained_tokens=quality["trained_tokens"],
                    classifier_f1=round(c["f1"], 4),
                    classifier_precision=round(c["precision"], 4),
                    classifier_recall=round(c["recall"], 4),
                    classifier_documents=c["train_documents"] + c["test_documents"],
                    positives=str(positives()),
                )
            )
        summary("ablation", lines)
    finally:
        server.shutdown()
        import ray

        ray.shutdown()  # (after a failure) its session files are under the first arm's work dir
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
