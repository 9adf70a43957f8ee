"""The test tiers, and the fixtures every tier shares: one local Ray per test session, free ports, a small
generated site, a local S3 server. The heavier shared chain (corpus -> token shards -> one tiny trained model
per objective) lives in tests/fixtures.py.

Every test carries exactly one tier marker (its own, or its module's ``pytestmark``):
- ``unit``: no Ray, no DeepSpeed engine, no shared trained model: seconds;
- ``integration``: the session's Ray, the DeepSpeed engine in this process, the shared data fixtures;
- ``system``: Ray Train launches (the shared trained models too), clusters and jobs of their own, S3 stages,
  browsers, kill-and-resume, whole pipelines.
``make test`` runs all three, ``make test-fast`` the first two.

The Ray tiers run on two xdist workers (``--dist loadgroup``, scheduled by ``pytest_xdist_make_scheduler``
below), each with a Ray of its own: a test is its own work unit unless it shares a module-scoped fixture
(then its module is one unit, built once), the shared ``masked_pipeline`` or one objective's shared trained
model (their users are one unit); the system tier's units are handed out first, the longest first among
them. A test that looks at what the whole machine holds (its /tmp, its listening sockets) is marked
``serial`` and runs alone, after the others.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures"]

TIERS = ("unit", "integration", "system")
#: Session fixtures too costly to build on both xdist workers: the tests that use one are one work unit.
GROUPED_FIXTURES = ("masked_pipeline",)
#: Work units known to take minutes: handed out first, so that they do not end the run alone.
LONG_UNITS = (
    "tests/orchestration/test_cluster.py",
    "masked_pipeline",
    "tests/orchestration/test_pipeline_e2e.py",
    "trained:causal_lm",
)
#: Fixtures a unit test may not use, directly or through another fixture: they start Ray, a process
#: group for the DeepSpeed engine, or train a model.
HEAVY_FIXTURES = {"ray_session", "single_process_dist", "trained", "masked_pipeline"}
#: A test whose call takes longer than this belongs to the system tier (reported at the end).
SYSTEM_SECONDS = 60.0

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as an embedded run's Ray (executors.py)


def tiers_of(item: pytest.Item) -> set[str]:
    """The tier markers of a test: its own and its module's (``-m`` selects on all of them, so a module
    with tests of two tiers marks each test, not the module)."""
    return {m.name for m in item.iter_markers() if m.name in TIERS}


#: Where the xdist workers leave each test's work unit for the controller's scheduler (WorkUnits).
UNITS_ENV = "LMFORGE_TEST_UNITS_DIR"


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` by work unit (``work_unit``), in the order the workers collected the tests.

    xdist's own loadgroup reads ``xdist_group`` marks through a node id suffix that pytest 9.2 no longer
    shows, so every test became a unit of its own (module fixtures built twice). The units come from the
    workers' collection instead, which knows each test's fixtures."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        _units: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._units is None:
                self._units = {}
                for f in Path(os.environ[UNITS_ENV]).glob("*.json"):
                    self._units.update(json.loads(f.read_text()))
            return self._units.get(nodeid, nodeid)

    return WorkUnits(config, log)


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in (
        ("unit", "no Ray, no DeepSpeed engine: seconds"),
        ("integration", "the session's Ray, the DeepSpeed engine in this process, the shared data fixtures"),
        (
            "system",
            "Ray Train launches, clusters, jobs, S3 stages, browsers, kill-and-resume, whole pipelines",
        ),
    ):
        config.addinivalue_line("markers", f"{tier}: {what}")
    config.addinivalue_line("markers", "serial: looks at machine-wide state; runs alone, after the others")
    if config.getoption("dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        # The controller of a `--dist loadgroup` run, before its workers start (they inherit the variable).
        os.environ[UNITS_ENV] = tempfile.mkdtemp(prefix="lmforge-test-units-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and os.environ.get(UNITS_ENV):
        shutil.rmtree(os.environ.pop(UNITS_ENV), ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked and given its unit
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without a tier, or a unit test that reaches for Ray or the DeepSpeed engine."""
    problems = []
    for item in items:
        tiers = tiers_of(item)
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: tier markers {sorted(tiers)}; needs exactly one of {TIERS}")
        elif tiers == {"unit"} and HEAVY_FIXTURES & set(item.fixturenames):
            heavy = ", ".join(sorted(HEAVY_FIXTURES & set(item.fixturenames)))
            problems.append(f"{item.nodeid}: marked unit but uses {heavy} (mark it integration or system)")
    if problems:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(problems))
    units_dir = os.environ.get(UNITS_ENV)
    if units_dir and hasattr(config, "workerinput"):  # an xdist worker of a `--dist loadgroup` run
        units = {item.nodeid: work_unit(item) for item in items}
        items.sort(key=lambda item: _start_order(item, units[item.nodeid]))
        (Path(units_dir) / f"{config.workerinput['workerid']}.json").write_text(json.dumps(units))


def work_unit(item: pytest.Item) -> str:
    """The xdist work unit of a test: the shared fixture it needs (for ``trained``, the objective's model:
    the ``objective`` it is parametrized with, else the causal one), its module when it uses a
    module-scoped fixture, else itself."""
    for name in GROUPED_FIXTURES:
        if name in item.fixturenames:
            return name
    if "trained" in item.fixturenames:  # each shared model trained once, on one worker
        params = getattr(item, "callspec", None)
        return f"trained:{params.params.get('objective', 'causal_lm') if params else 'causal_lm'}"
    defs = getattr(item, "_fixtureinfo", None)
    scopes = {d.scope for defs_ in (defs.name2fixturedefs.values() if defs else ()) for d in defs_}
    module = item.nodeid.split("::")[0]
    return module if scopes & {"module", "package", "class"} else item.nodeid


def _start_order(item: pytest.Item, unit: str) -> tuple[int, int]:
    """Long units first, then the rest of the system tier, then the integration tier (a stable sort keeps
    the collection order within each)."""
    if unit in LONG_UNITS:
        return (0, LONG_UNITS.index(unit))
    return (1 if "system" in tiers_of(item) else 2, 0)


_slow_outside_system: list[tuple[str, float]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SYSTEM_SECONDS and "system" not in report.keywords:
        _slow_outside_system.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _slow_outside_system:
        terminalreporter.section(
            f"tests over {SYSTEM_SECONDS:.0f} s outside the system tier (move them, or make them faster)"
        )
        for nodeid, seconds in _slow_outside_system:
            terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lasting_port() -> int:
    """A free port below the kernel's ephemeral range, for a server that must listen on the same port again
    later (its URLs are in document ids): a port from ``free_port`` may meanwhile be given to an outgoing
    connection (Ray's, another test's), and the second listen then fails with EADDRINUSE."""
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per session (two Ray instances in one process tree break Ray Train)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_site(tmp_path_factory):
    """A generated pydoc site (8 modules, 2 exact and 2 near duplicates, 2 private pages)."""
    from ingestion.demo_site import build_demo_site

    return build_demo_site(
        tmp_path_factory.mktemp("site"), modules=8, exact_duplicates=2, near_duplicates=2, private_pages=2
    )


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's server mode) on 127.0.0.1: there is no real S3 here. Yields a function
    that makes a bucket and returns its URI prefix, with the query pyarrow needs to reach the server
    (``s3://bucket?endpoint_override=127.0.0.1:PORT&scheme=http``)."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask the instance metadata address for credentials
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()

    def bucket(name: str) -> tuple[str, str]:
        import pyarrow.fs as pafs

        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}", query

    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
