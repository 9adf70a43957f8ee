"""crawl: fetch the seeds' hosts (or the generated demo site, served here) into gzip WARC files."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.manifest import write_index
from core.storage import Store
from orchestration.component import RunContext, StageComponent
from orchestration.errors import ConfigError
from orchestration.stage_files import scratch

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Crawl(StageComponent):
    name = "crawl"
    produces = "warc"
    per_source = True

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus and (
            cfg.demo_site is not None or bool(cfg.crawl.seeds) or cfg.crawl.seeds_file is not None
        )

    def key_config(self, cfg: PipelineConfig) -> Any:
        return {"crawl": cfg.crawl, "demo_site": cfg.demo_site, "seed": cfg.seed}

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        return {"crawl.seeds_file": [str(cfg.crawl.seeds_file)]} if cfg.crawl.seeds_file is not None else {}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        seeds = cfg.crawl.seeds_file
        return (
            [f"crawl.seeds_file: {seeds} does not exist"]
            if seeds is not None and not Path(seeds).is_file()
            else []
        )

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        deeper = c.get("urls_not_fetched_max_depth", 0)
        beyond = f", {deeper} URLs beyond crawl.max_depth not fetched" if deeper else ""
        return f"{c.get('pages_fetched', 0)} pages, {c.get('fetch_failures', 0)} failed/refused URLs{beyond}"

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        """The crawl runs on this machine's disk (its frontiers are SQLite files): in the work dir, or for
        a remote one in a directory of the node cache, uploaded when the crawl ends."""
        from ingestion.demo_site import DemoSiteServer, build_demo_site
        from orchestration.crawl import run_crawl
        from orchestration.progress import StageProgress

        cfg = ctx.cfg
        work = scratch(out, key)
        with contextlib.ExitStack() as stack:
            crawl_cfg = cfg.crawl
            server = None
            if cfg.demo_site is not None:
                site_args = cfg.demo_site.model_dump(exclude={"port"})
                site = build_demo_site(ctx.local / "site", seed=cfg.seed, **site_args)
                try:
                    server = stack.enter_context(DemoSiteServer(site.root, port=cfg.demo_site.port))
                except OSError as e:
                    raise ConfigError(
                        f"demo_site.port: cannot serve the demo site on 127.0.0.1:{cfg.demo_site.port} ({e}); "
                        "set demo_site.port to a free port (0: any, at the price of other document ids)"
                    ) from None
                crawl_cfg = crawl_cfg.model_copy(update={"seeds": [server.url, *crawl_cfg.seeds]})
                ctx.console.print(f"  serving {len(site.pages)} demo pages at {server.url}")
            with StageProgress(ctx.console, ctx.stage, "pages", total=crawl_cfg.max_pages) as progress:
                files, counters = run_crawl(
                    crawl_cfg, work, on_progress=progress.update, on_this_node=out.local is None
                )
            if server is not None:
                counters["demo_pages_served"] = sum(
                    1 for path, status in server.served if status == 200 and path != "/robots.txt"
                )
        out.upload(work)
        return write_index(
            out, stage="crawl", kind="warc", cache_key=key, files=files, inputs=inputs, counters=counters
        )
