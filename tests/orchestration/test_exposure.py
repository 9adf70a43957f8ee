"""What an embedded run listens on: lmforge's own servers on loopback only, and beyond it nothing but the
Ray servers the README's security section names (Ray 2.60 cannot bind those to loopback), which refuse a
client without the run's own token."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.serial]  # Ray's fixed metrics ports: one run at a time

LISTENERS = """
import json, os, subprocess, sys, psutil, ray
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
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout  # the same moment
    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(json.dumps({"listeners": found, "pids": sorted(names), "ss": ss, "dashboard": dashboard, "site": server.url, "token": token,
                      "token_mode": os.stat(token).st_mode & 0o777, "gcs": ray.get_runtime_context().gcs_address}))
    sys.stdout.flush()
    sys.stdin.readline()  # the test tries its clients meanwhile
"""

# A client holding only the machine-wide token (~/.ray/auth_token), or none.
OUTSIDER = """
import sys, ray
ray.init(address=sys.argv[1])
print("CONNECTED")
"""

# Ray's own servers that listen beyond loopback (README, "Security and what a run leaves behind").
RAY_EXPOSED = {"gcs_server", "raylet", "ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "driver"}
RAY_METRICS_PORTS = {44217, 44227}  # autoscaler and dashboard Prometheus exporters


def test_only_the_servers_the_readme_names_listen_beyond_loopback_and_refuse_other_tokens(tmp_path):
    machine_token = Path.home() / ".ray" / "auth_token"
    before = machine_token.read_bytes() if machine_token.exists() else None
    run = subprocess.Popen(
        [sys.executable, "-c", LISTENERS, str(tmp_path / "site")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = run.stdout.readline()
        assert line, run.communicate(timeout=60)[1][-3000:]
        out = json.loads(line)
        # The run's own token: readable by its owner only; the machine-wide one neither written nor used.
        assert out["token_mode"] == 0o600
        assert (machine_token.read_bytes() if machine_token.exists() else None) == before
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")} | {
            "RAY_AUTH_MODE": "token"
        }
        if before is None:
            env["RAY_AUTH_TOKEN"] = "0" * 64
        outsider = subprocess.run(
            [sys.executable, "-c", OUTSIDER, out["gcs"]], capture_output=True, text=True, timeout=120, env=env
        )
        assert outsider.returncode != 0 and "CONNECTED" not in outsider.stdout
        assert "Failed to connect to Ray cluster" in outsider.stderr, outsider.stderr[-2000:]
        # `ss -ltnp`, the kernel's own table, lists the same listening sockets for the run's processes.
        table = subprocess.run(
            ["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        pids = set(out["pids"])
        seen = {
            (local.rsplit(":", 1)[0].strip("[]"), int(local.rsplit(":", 1)[1]))
            for line in table.splitlines()
            for local in [line.split()[3]]
            if pids & {int(x) for x in re.findall(r"pid=(\d+)", line)}
        }
        wildcard = {"*": "::"}  # ss writes the dual-stack wildcard [::] as *; psutil as ::
        assert {(wildcard.get(ip, ip), port) for ip, port in seen} == {
            (ip, port) for ip, port, _ in out["listeners"]
        }
    finally:
        stderr = run.communicate("\n", timeout=120)[1]
    assert run.returncode == 0, stderr[-3000:]
    assert not Path(out["token"]).exists()  # removed at exit
    listeners = [tuple(x) for x in out["listeners"]]
    loopback = {"127.0.0.1", "::1"}
    site_port = int(out["site"].rsplit(":", 1)[1].strip("/"))
    dashboard_port = int(out["dashboard"].rsplit(":", 1)[1])
    ours = [(ip, port) for ip, port, _ in listeners if port in (site_port, dashboard_port)]
    assert ours and all(ip in loopback for ip, _ in ours), ours
    beyond = [(ip, port, name) for ip, port, name in listeners if ip not in loopback]
    unexpected = [x for x in beyond if x[2] not in RAY_EXPOSED and x[1] not in RAY_METRICS_PORTS]
    assert unexpected == [], unexpected
