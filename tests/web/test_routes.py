"""The chat page's routes, without a browser: what is served, under which headers, with and without a key,
`--no-web-ui`, and that the files ship in the wheel (the Docker image installs the project non-editable)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from server.api.web import FILES, WEB_DIR
from server.app import create_app
from server.config import Config, add_arguments, from_namespace

REPO = Path(__file__).resolve().parents[2]


def get(config: Config, *paths: str) -> list[httpx.Response]:
    """GET each path from an app in this process (no lifespan: no model is loaded, none is needed)."""

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(path) for path in paths]

    return asyncio.run(main())


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_page_and_its_files_are_served_with_a_strict_policy() -> None:
    index, *files = get(Config(model="tiny"), "/", *(f"/web/{name}" for name in FILES))
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "<title>tokenferry chat</title>" in index.text
    policy = index.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    assert index.headers["x-content-type-options"] == "nosniff"
    for name, response in zip(FILES, files, strict=True):
        assert response.status_code == 200, name
        assert response.headers["content-type"] == FILES[name]
        assert response.content == (WEB_DIR / name).read_bytes()


def test_everything_the_page_loads_is_served_here() -> None:
    """No CDN and no other origin: every src and href in the page is one of our files, every fetch is /v1."""
    html = (WEB_DIR / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references and all(ref.removeprefix("/web/") in FILES for ref in references), references
    scripts = {name: (WEB_DIR / name).read_text() for name in FILES if name.endswith(".js")}
    fetched = [url for script in scripts.values() for url in re.findall(r'fetch\(\s*"([^"]*)"', script)]
    assert fetched and all(url.startswith("/v1/") for url in fetched), fetched
    for name, script in scripts.items():
        # Modules import each other by relative path, and nothing else.
        imported = re.findall(r'^import .* from "([^"]*)";$', script, re.M)
        assert all(path.startswith("./") and path[2:] in FILES for path in imported), (name, imported)
        assert len(re.findall(r"\bimport\b", script)) == len(imported), f"{name}: an import that is not a module's"
        assert not re.search(r"https?://\w", script), f"{name} must not load anything from elsewhere"
    assert "@import" not in (WEB_DIR / "style.css").read_text() and "url(" not in (WEB_DIR / "style.css").read_text()


@pytest.mark.parametrize("path", ["/web/nothing.js", "/web/..%2Fapp.py", "/web/%2e%2e%2fconfig.py", "/web/", "/index.html"])
def test_only_the_listed_files_are_served(path: str) -> None:
    assert_not_found(get(Config(model="tiny"), path)[0])


def test_the_page_needs_no_key_but_the_api_does() -> None:
    index, script, models = get(Config(model="tiny", api_key="s3cret"), "/", "/web/app.js", "/v1/models")
    assert index.status_code == 200 and script.status_code == 200
    assert models.status_code == 401


def test_no_web_ui_answers_404_in_openai_shape() -> None:
    for response in get(Config(model="tiny", web_ui=False), "/", "/web/app.js"):
        assert_not_found(response)
        assert response.json()["error"]["code"] == "not_found"


def test_the_page_stays_out_of_the_api_schema() -> None:
    paths = create_app(Config(model="tiny")).openapi()["paths"]
    assert "/" not in paths and not any(p.startswith("/web") for p in paths)


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), environ or {})


def test_web_ui_flags_and_environment() -> None:
    assert parse([]).web_ui is True
    assert parse(["--no-web-ui"]).web_ui is False
    assert parse(["--web-ui", "false"]).web_ui is False
    assert parse([], {"TOKENFERRY_WEB_UI": "false"}).web_ui is False
    assert parse(["--web-ui"], {"TOKENFERRY_WEB_UI": "false"}).web_ui is True  # a flag beats the environment
    assert parse(["--no-web-ui"], {"TOKENFERRY_WEB_UI": "true"}).web_ui is False


def test_the_files_ship_in_the_wheel(tmp_path: Path) -> None:
    """Build the wheel from the files the Dockerfile copies, as `pip install /src` does, and look inside."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools in this environment")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("server", "models"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("tokenferry-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"server/web/{name}" for name in FILES} <= shipped
