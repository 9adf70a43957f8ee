"""The ``lmforge`` command line."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from core.redact import redact, redact_console
from orchestration.config import ConfigError, PipelineConfig, dotted_overrides, load_config, parse_config

app = typer.Typer(
    help="lmforge: crawl, clean, deduplicate and tokenize web text, train with DeepSpeed on Ray, track with MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config (YAML), e.g. configs/demo.yaml.")]
_CONFIG_ENV = "LMFORGE_CONFIG_YAML"
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.steps=10 (repeatable)."),
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--only",
        help="Run only these stages, e.g. --only train,evaluate (upstream outputs are used as they are).",
    ),
]
FromOpt = Annotated[
    str | None, typer.Option("--from", help="Start at this stage (earlier outputs are used as they are).")
]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Stop after this stage.")]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="Rerun these stages even when cached, e.g. --force dedup.")
]
AddressOpt = Annotated[
    str,
    typer.Option(
        envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
        help="Ray dashboard address of the cluster, e.g. http://head:8265.",
    ),
]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def _load(config: Path, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, dotted_overrides(overrides or []))
    except ConfigError as e:
        console.print(f"[bold red]invalid config[/bold red] {escape(str(e))}")
        raise typer.Exit(2) from None


def _load_env(name: str, overrides: list[str]) -> PipelineConfig:
    try:
        return parse_config(yaml.safe_load(os.environ[name]), f"${name}", dotted_overrides(overrides))
    except (ConfigError, KeyError) as e:
        console.print(f"[bold red]invalid config[/bold red] {escape(str(e))}")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="Pipeline config (YAML), e.g. configs/demo.yaml.")
    ] = None,
    config_env: Annotated[
        str | None, typer.Option(hidden=True, help="Read the config YAML from this environment variable.")
    ] = None,
    workdir: Annotated[
        str | None, typer.Option(help="Override the config's workdir (a directory or s3://bucket/prefix).")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Run on an existing Ray cluster ('auto' or ray://host:10001).")
    ] = None,
    only: OnlyOpt = None,
    from_: FromOpt = None,
    until: UntilOpt = None,
    force: ForceOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print which stages would run or be cached, and why; run nothing."),
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Run the pipeline (or the selected stages): embedded Ray and a sqlite MLflow store in the work dir
    unless configured."""
    overrides = list(set_ or [])
    if workdir is not None:
        overrides.append(f"workdir={workdir}")
    if address is not None:
        overrides.append(f"ray.address={address}")
    if (config is None) == (config_env is None):
        console.print("[bold red]give a config file[/bold red] (e.g. lmforge run configs/demo.yaml)")
        raise typer.Exit(2)
    cfg = _load(config, overrides) if config is not None else _load_env(config_env, overrides)
    from orchestration.executors import IN_JOB_ENV
    from orchestration.pipeline import Pipeline  # heavy imports only once the config is valid
    from orchestration.plan import Selection

    if os.environ.get(IN_JOB_ENV):  # which Python the job runs (its runtime_env's, if any)
        console.print(f"[dim]job driver: {sys.executable} on {os.uname().nodename}[/dim]", soft_wrap=True)

    selection = Selection(_names(only), from_, until, _names(force))
    start = time.perf_counter()
    try:
        if dry_run:
            plan = Pipeline(cfg, console).plan(selection)
            _print_plan(cfg, plan)
            missing = [e.stage for e in plan if e.action == "missing"]
            if missing:
                console.print(
                    f"[bold red]cannot run:[/bold red] {escape(', '.join(missing))} never ran in {redact(str(cfg.workdir))}"
                )
                raise typer.Exit(2)
            return
        result = Pipeline(cfg, console).run(selection=selection)
    except ConfigError as e:  # pre-flight: nothing ran
        console.print(f"[bold red]cannot run[/bold red] {escape(str(e))}")
        raise typer.Exit(2) from None
    _print_summary(cfg, result, time.perf_counter() - start)


def _names(values: list[str] | None) -> tuple[str, ...]:
    """Stage names from repeatable, comma-separated options (``--only a,b --only c``)."""
    return tuple(n.strip() for v in values or [] for n in v.split(",") if n.strip())


def _print_plan(cfg: PipelineConfig, plan) -> None:
    table = Table(title=f"lmforge run '{cfg.name}' --dry-run: the plan ({redact(str(cfg.workdir))})")
    table.add_column("stage")
    table.add_column("action")
    table.add_column("why")
    styles = {"run": "bold cyan", "cached": "dim", "use": "dim", "missing": "bold red", "blocked": "red"}
    for entry in plan:
        table.add_row(Text(entry.stage), f"[{styles[entry.action]}]{entry.action}[/]", Text(entry.reason))
    Console(width=200).print(table)
    runs = [e.stage for e in plan if e.action == "run"]
    if runs:
        typer.echo(f"{len(runs)} stage(s) would run: {', '.join(runs)}")
    elif all(e.action in ("cached", "use") for e in plan):
        typer.echo("nothing to run: all cached")


def _print_summary(cfg: PipelineConfig, result, seconds: float) -> None:
    table = Table(title=f"lmforge run '{cfg.name}' finished in {seconds:.0f}s")
    table.add_column("stage")
    table.add_column("output")
    table.add_column("cached")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    from orchestration.stages import component_of

    for name, stage in result.stages.items():
        component = component_of(name)
        line = component.summary(stage.index) if component is not None and stage.index else ""
        cells = (name, str(stage.out_dir), "yes" if stage.cached else "", f"{stage.seconds:.1f}", line)
        table.add_row(*map(Text, cells))  # clean[web] is a name, not console markup
    console.print(table)
    for key, value in result.metrics.items():
        console.print(f"  {key}: {value:.4f}")
    if result.model_id:
        console.print(
            f"  model: {result.model_id}"
            + (f" (registered version {result.model_version})" if result.model_version else "")
        )
    if result.finetuned_model_id:
        counters = result.stages["finetune"].index["counters"]
        shown = [
            k
            for k in ("test_accuracy", "test_f1_macro", "test_exact_match", "test_bleu", "test_chrf")
            if k in counters
        ]
        version = result.finetuned_model_version
        console.print(
            f"  fine-tuned model: {result.finetuned_model_id} ("
            + ", ".join(f"{k} {counters[k]:.4f}" for k in shown)
            + ")"
            + (f", registered version {version} of {cfg.tracking.finetuned_name()}" if version else "")
        )
    console.print(f"  report: {result.report_path.with_suffix('.md')}")
    console.print("  browse runs and models in the MLflow UI (it prints the links to open):")
    sys.stderr.write(f"    lmforge ui --tracking-uri {shlex.quote(cfg.tracking_uri)}\n")  # never wrapped


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config without running anything; prints the full config with defaults filled in."""
    cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    from orchestration.preflight import embedded_resources, preflight

    try:
        preflight(cfg)  # the files it names
        # The cluster it will start, as `run` checks it; a remote cluster is checked when the run starts.
        if cfg.ray.address is None:
            preflight(cfg, embedded_resources(cfg))
    except ConfigError as e:
        console.print(f"[bold red]{config}:[/bold red] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"[green]{config}: valid[/green]")


_DONE = ("SUCCEEDED", "FAILED", "STOPPED")


@app.command()
def submit(
    config: ConfigArg,
    address: AddressOpt = DEFAULT_DASHBOARD,
    set_: SetOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends.")] = True,
    retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="Resubmit a job that failed up to N times; each attempt resumes from the finished tasks.",
        ),
    ] = 0,
    submission_id: Annotated[
        str | None, typer.Option(help="The job's id (default: lmforge-NAME-TIME; a resubmission adds -rN).")
    ] = None,
    requirements: Annotated[
        str | None,
        typer.Option(
            help="Packages to pip-install for the job on every node (Ray's runtime_env pip, kept per node for "
            "later jobs): a requirements file, or 'lmforge' for the dependencies in pyproject.toml. "
            "Default: the cluster's Python as it is.",
        ),
    ] = None,
    only: OnlyOpt = None,
    from_: FromOpt = None,
    until: UntilOpt = None,
    force: ForceOpt = None,
) -> None:
    """Submit the pipeline (or the selected stages) as a Ray job: the repository ships as its working dir."""
    cfg = _load(config, set_)
    pip = _pip_requirements(requirements)
    if retries and not wait:
        console.print("[bold red]--retries needs --wait[/bold red]: a failed job is resubmitted when it ends")
        raise typer.Exit(2)
    if isinstance(cfg.workdir, Path) and not cfg.workdir.is_absolute():
        console.print(
            f"[yellow]workdir {cfg.workdir} is relative: outputs stay in the job's working directory on the "
            "cluster; set workdir to a shared path for results you want to keep[/yellow]"
        )
    flags = [f"--only={','.join(_names(only))}"] if only else []
    flags += [f"--from={from_}"] * bool(from_) + [f"--until={until}"] * bool(until)
    flags += [f"--force={name}" for name in _names(force)]
    client = _client(address)
    base_id = submission_id or f"lmforge-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(retries + 1):
        job_id = f"{base_id}-r{attempt}" if attempt else base_id
        _submit_with_retry(client, submission_id=job_id, **_job_spec(cfg, flags, pip, requirements, attempt))
        console.print(f"submitted job [bold]{job_id}[/bold] to {address}")
        if not wait or _ended(client, job_id, requirements, attempt, retries, cfg):
            return


def _job_spec(
    cfg: PipelineConfig, flags: list[str], pip: dict | None, requirements: str | None, attempt: int
) -> dict[str, Any]:
    """The job's entrypoint, runtime environment (the repository as its working dir; the validated config in
    its environment: nothing is written into the repository) and metadata."""
    return {
        "entrypoint": " ".join(
            ["python -m orchestration.cli run --config-env", _CONFIG_ENV, "--address auto"]
            + [shlex.quote(f) for f in flags]
        ),
        "runtime_env": {
            "working_dir": str(Path(__file__).resolve().parent.parent),
            "excludes": [".venv/", "work/", ".git/", "*.warc.gz"],
            "env_vars": {
                _CONFIG_ENV: yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                "LMFORGE_IN_RAY_JOB": "1",
            },
            **({"pip": pip} if pip else {}),
        },
        "metadata": {
            "lmforge.config": cfg.name,
            "lmforge.workdir": redact(str(cfg.workdir)),
            "lmforge.attempt": str(attempt),
            "lmforge.stages": " ".join(flags) or "all",
            "lmforge.requirements": requirements or "",
        },
    }


def _ended(
    client: Any, job_id: str, requirements: str | None, attempt: int, retries: int, cfg: PipelineConfig
) -> bool:
    """Follow the job to its end: True when it succeeded; False when it failed and is to be resubmitted;
    exit 1 when it failed (or stopped) with no attempt left."""
    status = _follow(client, job_id)
    console.print(f"job {job_id}: {status}")
    if status == "SUCCEEDED":
        return True
    if hint := _missing_module_hint(client.get_job_logs(job_id), requirements):
        console.print(f"[yellow]{hint}[/yellow]")
    if status != "FAILED" or attempt == retries:
        raise typer.Exit(1)
    console.print(
        f"[yellow]resubmitting (attempt {attempt + 2} of {retries + 1}): the finished tasks and stages in "
        f"{redact(str(cfg.workdir))} are kept[/yellow]"
    )
    return False


def _pip_requirements(requirements: str | None) -> dict | None:
    """Ray's runtime_env ``pip`` for ``--requirements``: a requirements file's lines, or lmforge's own
    dependencies (``lmforge``). pip's check of the whole environment is off: the cluster's other packages
    are the cluster's business."""
    if requirements is None:
        return None
    if requirements == "lmforge":
        from importlib.metadata import requires

        # The installed distribution's requirements are pyproject.toml's (extras' carry an ``extra`` marker).
        packages = [r for r in requires("lmforge") or [] if "extra ==" not in r]
    else:
        path = Path(requirements)
        if not path.is_file():
            console.print(f"[bold red]--requirements {requirements}[/bold red]: no such file (or 'lmforge')")
            raise typer.Exit(2)
        lines = (line.split(" #")[0].strip() for line in path.read_text().splitlines())
        packages = [line for line in lines if line and not line.startswith("#")]
        if not packages:
            console.print(f"[bold red]--requirements {requirements}[/bold red]: the file names no package")
            raise typer.Exit(2)
    return {"packages": packages, "pip_check": False}


def _missing_module_hint(logs: str, requirements: str | None) -> str | None:
    """What to do when a job's logs say the cluster's Python lacks a module (None when they do not)."""
    import re

    missing = re.findall(r"ModuleNotFoundError: No module named '([^']+)'", logs)
    if not missing:
        return None
    how = "add it to the requirements file" if requirements else "pass --requirements lmforge (or a file)"
    return f"the cluster's Python has no module {missing[-1]!r}: {how} to have the job install it, or install it on every node"


def _follow(client, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in _DONE:
            return status
        time.sleep(poll_s)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        console.print(f"[bold red]cannot reach the Ray cluster at {address}[/bold red]: {escape(str(e))}")
        raise typer.Exit(2) from None


def _job(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError:  # the job server's 404
        console.print(f"[bold red]no job {job_id!r}[/bold red] on this cluster (lmforge jobs lists them)")
        raise typer.Exit(2) from None


JobArg = Annotated[str, typer.Argument(help="The job's submission id (lmforge jobs lists them).")]


@app.command()
def jobs(address: AddressOpt = DEFAULT_DASHBOARD) -> None:
    """The cluster's jobs, newest first: id, status, lmforge config and stages, start and end."""
    client = _client(address)
    table = Table(title=f"jobs on {address}")
    for column in ("job", "status", "config", "stages", "started", "ended"):
        table.add_column(column)
    for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        meta = job.metadata or {}
        table.add_row(
            job.submission_id or job.job_id or "",
            str(job.status.value),
            meta.get("lmforge.config", ""),
            meta.get("lmforge.stages", ""),
            _when(job.start_time),
            _when(job.end_time),
        )
    Console(width=200).print(table)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


@app.command()
def status(job_id: JobArg, address: AddressOpt = DEFAULT_DASHBOARD) -> None:
    """A job's status, and its message when it failed or was stopped."""
    job = _job(_client(address), job_id)
    typer.echo(f"{job_id}: {job.status.value}" + (f" ({job.message})" if job.message else ""))


@app.command()
def logs(
    job_id: JobArg,
    address: AddressOpt = DEFAULT_DASHBOARD,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """A job's logs: the pipeline's console output on the cluster."""
    client = _client(address)
    _job(client, job_id)
    if follow:
        console.print(f"job {job_id}: {_follow(client, job_id)}")
    else:
        sys.stdout.write(client.get_job_logs(job_id))


@app.command()
def stop(
    job_id: JobArg,
    address: AddressOpt = DEFAULT_DASHBOARD,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for it to stop.")] = 60,
) -> None:
    """Stop a running job and wait until it has (its finished tasks stay in the work dir)."""
    client = _client(address)
    _job(client, job_id)
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while (state := str(client.get_job_status(job_id).value)) not in _DONE:
        if time.monotonic() > deadline:
            console.print(f"[bold red]job {job_id} is still {state} after {timeout_s:.0f}s[/bold red]")
            raise typer.Exit(1)
        time.sleep(1)
    typer.echo(f"{job_id}: {state}")


def _submit_with_retry(client, timeout_s: float = 120, **job) -> str:
    """Submit, retrying while a freshly started head has no job agent yet (Ray answers 500 until it has)."""
    deadline = time.monotonic() + timeout_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() + delay > deadline:
                raise
            console.print(f"[dim]cluster not ready to take jobs yet, retrying in {delay:.0f}s[/dim]")
            time.sleep(delay)
            delay = min(delay * 2, 10)


@app.command()
def report(
    workdir: Annotated[str, typer.Argument(help="A run's work dir (the config's workdir: a path or URI).")],
) -> None:
    """Rebuild report.html (plots, examples, lineage; opens offline) and report.md / report.json of a
    work dir from its stage outputs; exit 1 if a check fails."""
    from orchestration.report import write_report
    from orchestration.report_html import write_html_report

    try:
        path = write_report(workdir)
        with console.status("writing report.html"):
            page, _ = write_html_report(workdir)
    except FileNotFoundError as e:
        console.print(f"[bold red]{escape(str(e))}[/bold red]")
        raise typer.Exit(2) from None
    rep = json.loads(path.read_text())
    for name, ok in rep["checks"].items():
        console.print(f"  [{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] {name}")
    console.print(f"report: {page} (and {path.with_suffix('.md').name})")
    if not rep["ok"]:
        raise typer.Exit(1)


TrackingOpt = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (sqlite file or server); default: --config's, else $MLFLOW_TRACKING_URI."
    ),
]
TrackingConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="A pipeline config whose tracking store to read.")
]


def _tracking_uri(uri: str | None, config: Path | None) -> str:
    if uri:
        return uri
    if config is not None:
        return _load(config, []).tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    console.print(
        "[bold red]which MLflow store?[/bold red] give --tracking-uri, --config CONFIG (the pipeline config "
        "that logged the model) or set MLFLOW_TRACKING_URI"
    )
    raise typer.Exit(2)


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            help="An exported model directory, or models:/NAME@ALIAS, models:/NAME/VERSION, models:/ID."
        ),
    ],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks: built-in names or .jsonl/.yaml task files.")
    ] = "",
    data: Annotated[
        list[str] | None, typer.Option(help="Text dataset for bits per byte and perplexity (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="First N examples (documents) of each.")] = None,
    batch_tokens: Annotated[
        int | None, typer.Option(help="Tokens per forward pass (default: 1,024 on CPU, 8,192 on GPU).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    tracking_uri: TrackingOpt = None,
    config: TrackingConfigOpt = None,
    log: Annotated[
        bool, typer.Option(help="Log metrics to MLflow against the model (models:/ only).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Score a model on benchmark tasks and text: acc/acc_norm as lm-evaluation-harness, bits per byte."""
    import tempfile

    from evaluation.harness import evaluate
    from evaluation.tasks import BUILTIN_TASKS
    from orchestration.tracking import log_evaluation, resolve_model

    names = [t for t in tasks.split(",") if t]
    if not names and not data:
        console.print(
            f"[bold red]nothing to evaluate[/bold red]: give --tasks ({', '.join(BUILTIN_TASKS)}) or --data"
        )
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
        try:
            if model.startswith("models:/"):
                tracking_uri = _tracking_uri(tracking_uri, config)
            model_dir, logged = resolve_model(model, tracking_uri or "", Path(tmp))
            with console.status("evaluating") as status:
                results = evaluate(
                    model_dir,
                    names,
                    data or [],
                    limit,
                    batch_tokens,
                    threads,
                    progress=lambda done, total: status.update(f"evaluating: {done}/{total} requests"),
                )
        except (FileNotFoundError, ValueError, LookupError) as e:
            console.print(f"[bold red]{escape(str(e))}[/bold red]")
            raise typer.Exit(2) from None
    if logged is not None and log:
        run_id = log_evaluation(tracking_uri or "", logged, results, {"model": model, "limit": limit})
        console.print(f"logged to MLflow run {run_id} against model {logged.model_id}")
    _print_evaluation(results, as_json)


def _print_evaluation(results: dict[str, Any], as_json: bool) -> None:
    """``lmforge eval``'s results: JSON, or a table of each task's metrics with their standard errors."""
    if as_json:
        typer.echo(
            json.dumps(
                {k: {"source": v.source, "digest": v.digest, **v.metrics} for k, v in results.items()},
                indent=1,
            )
        )
        return
    table = Table("task / data", "metric", "value", "± stderr")
    for key, ev in results.items():
        for metric, value in ev.metrics.items():
            if metric.endswith("_stderr") or metric in ("seconds",):
                continue
            err = ev.metrics.get(f"{metric}_stderr")
            table.add_row(key, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}")
    Console().print(table)


@app.command()
def lineage(
    model: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or models:/MODEL_ID.")
    ],
    tracking_uri: TrackingOpt = None,
    config: TrackingConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage as JSON.")] = False,
) -> None:
    """Walk a model back to its data: training run, token shards, tokenizer, dedup/clean outputs, crawl."""
    from orchestration.lineage import LineageError, render, walk

    try:
        found = walk(model, _tracking_uri(tracking_uri, config))
    except LineageError as e:
        console.print(f"[bold red]{escape(str(e))}[/bold red]")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(found, indent=1))
    else:
        typer.echo("\n".join(render(found)))


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    config: TrackingConfigOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 over the run's tracking store and print its URL (Ctrl-C stops it)."""
    from mlflow.tracking import MlflowClient

    from orchestration.tracking import start_mlflow_ui, wait_until_ready

    uri = _tracking_uri(tracking_uri, config)
    url = f"http://127.0.0.1:{port}"

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM too stops the server below, not only Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    server = start_mlflow_ui(uri, port)
    try:
        with console.status(f"starting the MLflow UI over {uri}"):
            wait_until_ready(url, server)
        typer.echo(f"MLflow UI: {url}")  # plain lines on stdout: never wrapped, easy to read by a script
        for exp in MlflowClient(uri).search_experiments():
            if exp.name != "Default":
                # The UI's global workflow switch defaults to GenAI (traces); this link opens runs and models.
                link = f"{url}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
                typer.echo(f"  experiment {exp.name}: {link}")
        sys.stdout.flush()
        server.wait()
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[bold red]{escape(str(e))}[/bold red]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(timeout=30)


@app.command()
def schema() -> None:
    """Print the config JSON schema (every field, its type, default and description)."""
    typer.echo(json.dumps(PipelineConfig.model_json_schema(), indent=1))


def main() -> None:
    redact_console()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    app()


if __name__ == "__main__":
    main()
