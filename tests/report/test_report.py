"""The HTML report: written where asked, self-contained, and loaded by a real headless Chromium
with every picture decoded and no console errors (the check is shown to catch a broken page)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from lrpscale import cli
from lrpscale.results import open_run
from tests.helpers.demo_runs import DEMO_RUN_BAD

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("strategies", "summary", "classes", "trust", "worst", "errors")


class _Page(HTMLParser):
    """The ids, <img> sources and every src/href/url of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.references, self.tags = set(), [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.references += [attrs[name] for name in ("src", "href", "data", "poster", "srcset") if name in attrs]


@pytest.fixture(scope="module")
def report(demo_runs, tmp_path_factory):
    """The report of the demo run compared with its epsilon-plus-flat twin, written to --output."""
    out = tmp_path_factory.mktemp("report")
    started = time.time()
    assert cli.main(["report", str(demo_runs["run"]), "--compare", str(demo_runs["other"]), "--output", str(out)]) == 0
    print(f"report written in {time.time() - started:.1f} s")
    return out / "report.html"


def test_report_goes_to_output_and_is_self_contained(report, demo_runs):
    assert report.is_file() and not (demo_runs["run"] / "report.html").exists()
    text = report.read_text()
    page = _Page(text)
    assert set(SECTIONS) | {"comparison"} <= page.ids
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:  # every picture is a whole PNG
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    assert all(ref.startswith(("data:", "#")) for ref in page.references), [
        ref[:80] for ref in page.references if not ref.startswith(("data:", "#"))]
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in text and "@import" not in text

    run = open_run(demo_runs["run"])
    for image_id in DEMO_RUN_BAD:  # the errors section lists the bad inputs
        assert image_id in text
    scores = run.scores[run.scores.chosen & (run.scores.variant == "fidelity")]
    worst = scores.sort_values("smape", ascending=False).image_id.drop_duplicates().head(3)
    worst_section = text.split('id="worst"')[1].split("</section>")[0]
    assert all(image_id in worst_section for image_id in worst)
    assert run.info["run_id"] in text and run.info["model_id"] in text
    other = open_run(demo_runs["other"])
    comparison = text.split('id="comparison"')[1]
    assert other.info["run_id"] in comparison and "epsilon-plus-flat" in comparison


def _section(text: str, key: str) -> str:
    return text.split(f'id="{key}"')[1].split("</section>")[0]


def test_trust_section_shows_the_audits_curves_and_the_aopc_per_class(report, demo_runs):
    """The audit perturbed a seeded sample of the demo run; the section pictures its curves and
    lists the AOPC of every class with perturbed images, the reducer's numbers."""
    trust = _section(report.read_text(), "trust")
    run = open_run(demo_runs["run"])
    perturbed = run.faithfulness["image_id"].nunique()
    assert perturbed > 0 and f"{perturbed} perturbed images" in trust
    assert 'alt="mean drop of the target logit against the fraction removed, per order"' in trust
    classes = run.class_heatmaps[(run.class_heatmaps["by"] == "label") & (run.class_heatmaps["faithfulness_images"] > 0)]
    cells = re.findall(r"<tr><td>([^<]*)</td><td class=num>(\d+)</td><td class=num>([^<]*)</td>",
                       trust.split("AOPC per class")[1])
    assert sorted(cls for cls, _, _ in cells) == sorted(classes["class"])
    expected = classes.set_index("class")
    for cls, images, morf in cells:
        assert int(images) == expected.loc[cls, "faithfulness_images"]
        assert float(morf) == pytest.approx(expected.loc[cls, "aopc_morf"], rel=1e-2)
    assert "lrpscale evaluate" in trust  # no evaluation yet: the section says how to get one


def test_trust_section_shows_an_evaluation_with_its_cascade(demo_runs, tmp_path):
    from lrpscale.report.page import write_report
    from lrpscale.run.evaluation import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(demo_runs["run"], run)
    evaluation = evaluate_run(run, methods=["epsilon-plus-flat"], sample=6, cascade_sample=2, mprt_sample=2)
    trust = _section(write_report(run).read_text(), "trust")
    assert evaluation.settings_id in trust and f"<b>{evaluation.most_faithful}</b>" in trust
    assert 'alt="mean drop of the target logit per method and order"' in trust
    assert 'alt="randomisation cascade per method"' in trust
    for method in ("epsilon-plus-flat", "gradient", "gradient_x_input"):
        assert f"<td>{method}</td>" in trust


def test_strategies_section_comes_first_with_the_classes_in_rank_order(demo_runs, tmp_path):
    """Without strategies the section says which command makes them; with them it lists the classes
    by label in rank order (cut to --rows) and a card for the first --gallery of them: the eigenvalue
    and t-SNE picture, and per cluster its prototype, members and distinguishing neurons."""
    run = tmp_path / "run"
    shutil.copytree(demo_runs["run"], run)
    assert cli.main(["report", str(run), "--output", str(tmp_path / "before")]) == 0
    assert "lrpscale strategies RUN" in _section((tmp_path / "before" / "report.html").read_text(), "strategies")
    assert cli.main(["strategies", str(run)]) == 0
    assert cli.main(["report", str(run), "--output", str(tmp_path / "after"), "--gallery", "3", "--rows", "4"]) == 0
    text = (tmp_path / "after" / "report.html").read_text()
    assert re.findall(r'<section id="([^"]+)"', text)[0] == "strategies"
    section = _section(text, "strategies")
    opened = open_run(run)
    classes = opened.strategy_classes[opened.strategy_classes["grouping"] == "label"].sort_values("rank")
    listed = re.findall(r"<tr><td class=num>(\d+)</td><td>([^<]+)</td>", section)
    assert listed == [(str(rank), name) for rank, name in zip(classes["rank"].head(4), classes["class_name"].head(4))]
    assert f"The first 4 of {len(classes)} classes" in section and f"first 3 of {len(classes)} classes" in section
    cards = re.findall(r'<article class=card id="strategies-([^"]+)">(.*?)</article>', section, re.S)
    assert [cls for cls, _ in cards] == classes["class"].head(3).tolist()
    members = opened.strategies[opened.strategies["grouping"] == "label"].set_index("image_id")["cluster"]
    clusters = opened.strategy_clusters[opened.strategy_clusters["grouping"] == "label"]
    for (cls, card), expected in zip(cards, classes.head(3).itertuples()):
        assert f'alt="eigenvalues and t-SNE layout of class {cls}"' in card
        mine = clusters[clusters["class"] == cls].sort_values("cluster")
        blocks = card.split("<div class=cluster ")[1:]
        assert len(blocks) == expected.clusters == len(mine)
        for block, cluster in zip(blocks, mine.itertuples()):
            assert f'alt="prototype of cluster {cluster.cluster} of class {cls}"' in block
            assert f"{cluster.images} images" in block
            shown = re.findall(r'<figure class=member title="([^,"]+), predicted', block)
            assert 1 <= len(shown) <= 4 and all(members[i] == cluster.cluster for i in shown)
            for neuron in cluster.distinguishing_neurons:
                assert f"#{neuron['neuron']}: " in block


def test_report_defaults_to_the_run_directory_and_reduces_first(demo_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(demo_runs["run"], run)
    shutil.rmtree(run / "classes")
    assert cli.main(["report", str(run), "--gallery", "2", "--rows", "5"]) == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out
    assert (run / "classes" / "summary_heatmaps.parquet").is_file()
    page = _Page((run / "report.html").read_text())
    assert set(SECTIONS) <= page.ids and "comparison" not in page.ids
    images = pd.read_parquet(run / "images")
    accuracy = (images.pred_label == images.label).groupby(images.label).mean()
    worst = sorted(accuracy.index, key=lambda c: (accuracy[c], int(c)))[:2]
    assert {i for i in page.ids if i.startswith("class-")} == {f"class-{c}" for c in worst}
    assert "The 2 of 10 classes with the lowest accuracy" in (run / "report.html").read_text()


def test_report_command_rejects_bad_input(demo_runs, tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not an lrpscale run" in capsys.readouterr().err
    assert cli.main(["report", str(demo_runs["run"]), "--classes", "42", "--output", str(tmp_path)]) == 2
    assert "no class '42'" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


# --- the browser check ---------------------------------------------------------------------------

PAGE_CHECK = """(async () => {
  const images = Array.from(document.images);
  const decoded = await Promise.all(images.map(i => i.decode().then(() => true, () => false)));
  return {
    images: images.map((i, n) => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, decoded: decoded[n]})),
    sections: Array.from(document.querySelectorAll("section[id]")).map(s => s.id),
    height: document.documentElement.scrollHeight,
  };
})()"""


class _DevTools:
    """A minimal Chrome DevTools Protocol client on one page target: calls and collected events."""

    def __init__(self, socket):
        self.socket, self.events, self.calls, self.next_id = socket, [], {}, 0
        self.arrived = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data:
                self.calls.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                self.arrived.set()

    async def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        answer = asyncio.get_running_loop().create_future()
        self.calls[self.next_id] = answer
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        data = await asyncio.wait_for(answer, timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    async def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(deadline - time.monotonic(), 0.01))


async def _inspect(port: int, url: str, screenshot: Path) -> dict:
    """Load ``url`` in a new tab of the browser listening on ``port``; a screenshot of the page (1280
    px wide) goes to ``screenshot``. Returns {images, sections, height, errors, broken_images}."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as answer:
            target = await answer.json()
        try:
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                tools = _DevTools(socket)
                for domain in ("Runtime", "Log", "Page"):
                    await tools.call(f"{domain}.enable")
                await tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                                 mobile=False)
                await tools.call("Page.navigate", url=url)
                await tools.wait_for("Page.loadEventFired")
                checked = await tools.call("Runtime.evaluate", expression=PAGE_CHECK, awaitPromise=True,
                                           returnByValue=True)
                state = checked["result"]["value"]
                shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                        clip={"x": 0, "y": 0, "width": 1280, "height": min(state["height"], 16000),
                                              "scale": 1})
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                tools.reader.cancel()
        finally:
            async with http.get(f"http://127.0.0.1:{port}/json/close/{target['id']}"):
                pass
    state["errors"] = _errors(tools.events)
    state["broken_images"] = [i["alt"] for i in state["images"]
                              if not (i["complete"] and i["width"] > 0 and i["decoded"])]
    return state


def _errors(events: list[dict]) -> list[str]:
    """What went wrong on the page: console errors and failed assertions, uncaught exceptions, and
    the browser's own error log (resources that failed to load, blocked requests, ...)."""
    found = []
    for event in events:
        params = event["params"]
        if event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            values = (str(a.get("value", a.get("description", ""))) for a in params["args"])
            found.append(f"console.{params['type']}: {' '.join(values)}")
        elif event["method"] == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(f"exception: {details.get('exception', {}).get('description') or details['text']}")
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            found.append(f"log {entry['source']}: {entry['text']} {entry.get('url', '')}".rstrip())
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with the DevTools protocol on a free loopback port; yields a function
    page(path, screenshot) -> {images, sections, errors, broken_images}."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: `make test` installs it when run as root "
                    "(apt-get install chromium), which the browser check of the report needs")
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (active.is_file() and active.read_text().strip()):
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"chromium did not start (exit code {process.poll()})")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        yield lambda path, screenshot: asyncio.run(_inspect(port, Path(path).resolve().as_uri(), screenshot))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_report_loads_in_chromium(report, browser, tmp_path):
    screenshot = tmp_path / "report.png"
    state = browser(report, screenshot)
    print(f"screenshot: {screenshot}")
    assert state["errors"] == []
    assert state["broken_images"] == []
    assert len(state["images"]) == len(_Page(report.read_text()).images) > 20
    assert state["sections"] == [*SECTIONS, "comparison"]
    assert screenshot.read_bytes().startswith(b"\x89PNG")


def test_browser_check_catches_a_broken_page(report, browser, tmp_path):
    good = _Page(report.read_text()).images[0]
    broken = tmp_path / "broken.html"
    # (a PNG cut short after its header still draws partly in Chromium: the whole-PNG check of the
    # self-containment test catches that one)
    broken.write_text(f'<!DOCTYPE html><html><body><section id="summary"><img alt="fine" src="{good}">'
                      '<img alt="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">'
                      '<img alt="not base64" src="data:image/png;base64,not*base64!">'
                      '<img alt="missing" src="missing.png"></section>'
                      "<script>console.error('drawn wrong'); null.width;</script></body></html>")
    state = browser(broken, tmp_path / "broken.png")
    assert state["broken_images"] == ["corrupt", "not base64", "missing"]
    assert state["sections"] == ["summary"]
    assert any("drawn wrong" in e for e in state["errors"]) and any("TypeError" in e for e in state["errors"])
    assert any(e.startswith("log network") and "missing.png" in e for e in state["errors"])
