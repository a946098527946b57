"""Compose's `monitoring` profile without Docker (there may be no Docker engine where the
tests run): its Prometheus config is one `promtool` accepts and a real Prometheus scrapes
a gateway with; the Grafana dashboard's expressions name only metrics a real `/metrics`
has, and each one evaluates in that Prometheus; the profile's files are where the
Compose file mounts them. Grafana itself and the containers are not run here."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llamaserve.store import users
from tests.conftest import ROOT
from tests.gateway.harness import Site
from tests.gateway.helpers import extra_gateway
from tests.gateway.helpers import mock_request as chat
from tests.gateway.test_prometheus import ADMIN, prometheus, wait
from tests.programs import need_program

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "llamaserve.json"
METRIC = re.compile(r"\bllamaserve_[a-z_]+\b")
# Grafana's variables, as the dashboard's defaults make them.
VARIABLES = {"$__rate_interval": "1m", "$user": ".*"}
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables'."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def test_the_profile_mounts_what_the_repository_holds() -> None:
    services = compose()["services"]
    assert "profiles" not in services["postgres"]  # `docker compose up -d postgres` as before
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    prometheus_service = services["prometheus"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    credentials = job["authorization"]["credentials_file"]
    assert f"> {credentials} " in prometheus_service["command"][0]  # written as it starts
    listen = re.search(r"--web.listen-address=(\S+)", prometheus_service["command"][0])
    assert listen is not None
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == f"http://{listen[1]}"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/llamaserve.yml").read_text()
    )["providers"][0]
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if "llamaserve.json" in v]
    assert mounted == [f"{provider['options']['path']}/llamaserve.json"]


def test_promtool_accepts_the_profiles_config(tmp_path: Path) -> None:
    promtool = need_program("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Whole, with the credentials file it reads (the container writes it as it starts).
    config = here(tmp_path, "127.0.0.1:8001")
    checked = subprocess.run([promtool, "check", "config", str(config)],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def here(where: Path, target: str, interval: str | None = None) -> Path:
    """The profile's Prometheus config, scraping `target` with the admin key in a file of
    `where` (and every `interval`)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    key_file = where / "llamaserve-admin-key"
    key_file.write_text(ADMIN)
    job["authorization"]["credentials_file"] = str(key_file)
    job["static_configs"] = [{"targets": [target]}]
    if interval is not None:
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    path = where / "profile.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def exported(scrape: str) -> set[str]:
    """The series' names a scrape's families make (those without samples too)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(scrape)
        for suffix in SUFFIXES.get(family.type, [""])
    }


def test_the_dashboard_reads_real_metrics_through_the_profiles_prometheus(
    site: Site, tmp_path: Path
) -> None:
    keys = {name: site.create_user(name) for name in ("graf-a", "graf-b")}
    _set_quota(site, "graf-b")
    with extra_gateway(site, LLAMA_ADMIN_API_KEY=ADMIN) as gateway:
        for name, key in keys.items():
            for stream in (False, True):
                httpx.post(f"{gateway}/v1/chat/completions", json=chat(name, stream=stream),
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)  # fmt: skip
        scrape = httpx.get(f"{gateway}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        assert scrape.status_code == 200
        names = exported(scrape.text)
        used = {name for expr in expressions() for name in METRIC.findall(expr)}
        assert used and not used - names, f"not exported: {used - names}"
        config = here(tmp_path, gateway.removeprefix("http://"), interval="1s")
        with prometheus(config.read_text(), tmp_path) as url:
            scraped = 'sum(llamaserve_prompt_tokens_total{job="llamaserve"})'
            assert wait(lambda: _instant(url, scraped), 60), "never scraped"
            for expr in expressions():
                promql = expr
                for variable, value in VARIABLES.items():
                    promql = promql.replace(variable, value)
                if promql.startswith("label_values("):
                    continue  # Grafana's own function: the label's values are read below
                _instant(url, promql)
            tokens_24h = next(e for e in expressions() if "[24h]" in e).replace("$user", ".*")
            assert wait(lambda: {r["metric"]["user"] for r in _instant(url, tokens_24h)}
                        == set(keys), 30), _instant(url, tokens_24h)  # fmt: skip
            values = httpx.get(f"{url}/api/v1/label/user/values",
                               params={"match[]": "llamaserve_requests_total"}).json()  # fmt: skip
            assert set(keys) <= set(values["data"])


def _instant(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result; it must be valid PromQL."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]["result"]  # type: ignore[no-any-return]


def _set_quota(site: Site, username: str) -> None:
    async def set_it() -> None:
        conn = await site.connect()
        try:
            await users.set_quota(conn, username=username, token_quota=1000, period="day")
        finally:
            await conn.close()

    asyncio.run(set_it())
