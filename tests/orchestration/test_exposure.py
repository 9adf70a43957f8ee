"""What an embedded run listens on: lmforge's own servers on loopback only, and beyond it nothing but the
Ray servers the README's security section names (Ray 2.60 cannot bind those to loopback)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system

LISTENERS = """
import json, os, sys, psutil, ray
from pathlib import Path
from ingestion.demo_site import DemoSiteServer
from orchestration.executors import ensure_ray
ensure_ray(None, 1, 200, dashboard=True, workdir=None)
@ray.remote
def ping():
    return 1
ray.get(ping.remote())
site = Path(sys.argv[1]); site.mkdir(exist_ok=True); (site / "index.html").write_text("hi")
with DemoSiteServer(site) as server:
    me = psutil.Process()
    names = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: "driver"}
    found = sorted({(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections("inet")
                    if c.status == "LISTEN" and c.pid in names})
    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
    print(json.dumps({"listeners": found, "dashboard": dashboard, "site": server.url}))
"""

# Ray's own servers that listen beyond loopback (README, "Security and what a run leaves behind").
RAY_EXPOSED = {"gcs_server", "raylet", "ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "driver"}
RAY_METRICS_PORTS = {44217, 44227}  # autoscaler and dashboard Prometheus exporters


def test_only_the_servers_the_readme_names_listen_beyond_loopback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", LISTENERS, str(tmp_path / "site")], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    listeners = [tuple(x) for x in out["listeners"]]
    loopback = {"127.0.0.1", "::1"}
    site_port = int(out["site"].rsplit(":", 1)[1].strip("/"))
    dashboard_port = int(out["dashboard"].rsplit(":", 1)[1])
    ours = [(ip, port) for ip, port, _ in listeners if port in (site_port, dashboard_port)]
    assert ours and all(ip in loopback for ip, _ in ours), ours
    beyond = [(ip, port, name) for ip, port, name in listeners if ip not in loopback]
    unexpected = [x for x in beyond if x[2] not in RAY_EXPOSED and x[1] not in RAY_METRICS_PORTS]
    assert unexpected == [], unexpected
