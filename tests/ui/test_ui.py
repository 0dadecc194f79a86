"""``rollstream ui`` in a real headless Chromium, over a small demo-like run joined by the real processor.

The run: calculator rollouts (a tool call, its result, the answer) in two groups, one reward that
arrives seconds after its rollout ended, one after the processor completed the rollout (a late
event), and one undecodable record (a dead letter). The viewer runs as ``rollstream ui`` in a
subprocess; selenium reads what a person would see.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from ui_helpers import ROLLSTREAM, Processor, RunWriter, chrome, publish_run

from rollstream.schemas import make_event
from rollstream.schemas.codec import EventCodec
from rollstream.schemas.topics import Topics, consumer_config
from rollstream.serving.launch import free_port
from rollstream.settings import ConnectionSettings


def _wait(pred: Any, what: str, timeout: float, log: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout:.0f} s; last {last}\n{log()}")


@pytest.fixture
def trainer_run(settings: ConnectionSettings, topics: Topics) -> dict[str, Any]:
    """A trainer consumer group on the prefix (offsets committed at 0) and its MLflow run with held-out accuracy."""
    from mlflow import MlflowClient

    group = f"{topics.prefix}trainer"
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp = client.create_experiment(f"ui-test-{topics.prefix}")
    run = client.create_run(exp, run_name=f"{topics.prefix}calc-train")
    client.log_param(run.info.run_id, "consumer_group", group)
    for step, (reward, accuracy) in enumerate([(0.25, 0.30), (0.5, 0.55), (0.75, 0.8)], start=1):
        client.log_metric(run.info.run_id, "reward_mean", reward, step=step)
        client.log_metric(run.info.run_id, "held_out_accuracy", accuracy, step=step)
    client.set_terminated(run.info.run_id)
    return {"group": group, "run_name": run.info.run_name, "run_id": run.info.run_id}


def commit_at_start(settings: ConnectionSettings, topic: str, partitions: int, group: str) -> None:
    """Offsets committed at 0 on every partition of ``topic`` for ``group``: its lag is the topic's size."""
    c = Consumer(consumer_config(group, settings))
    try:
        c.commit(offsets=[TopicPartition(topic, p, 0) for p in range(partitions)], asynchronous=False)
    finally:
        c.close()


@pytest.fixture
def ui(settings: ConnectionSettings, topics: Topics, tmp_path: Path) -> Iterator[str]:
    # A demo run folder: its summary.json carries the held-out accuracy per policy version.
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"accuracy_curve": [[0.0, 0.25, 0], [30.0, 0.625, 1]]}))
    port = free_port()
    env = {**os.environ, "ROLLSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "ROLLSTREAM_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
           "ROLLSTREAM_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}
    log = (tmp_path / "ui.log").open("ab")
    proc = subprocess.Popen([str(ROLLSTREAM), "ui", "--topic-prefix", topics.prefix, "--port", str(port),
                             "--run-dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, "rollstream ui did not answer", 60,
              lambda: (tmp_path / "ui.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
@pytest.mark.slow
def test_the_viewer_shows_a_runs_rollouts_tool_calls_and_rewards(
        settings: ConnectionSettings, topics: Topics, codec: EventCodec, tmp_path: Path, ui: str,
        trainer_run: dict[str, Any]) -> None:
    driver = chrome()  # first: without a browser the test fails at once, with the fix in its message
    processor = Processor(settings, topics, tmp_path)
    try:
        writer = RunWriter(settings, topics, codec)
        run = publish_run(writer)
        stats = lambda: httpx.get(ui + "/api/stats", timeout=5).json()  # noqa: E731
        # Every call becomes a transition (the terminal reward given to each), and the bad record a dead letter.
        _wait(lambda: stats()["records"].get("transitions", 0) >= 2 * len(run["rids"])
              and stats()["records"].get("dead-letters", 0) >= 1, "the processor's transitions never all arrived",
              120, processor.log)
        first = run["rids"][0]
        writer.send(topics.rewards, make_event("Reward", source="grader", rollout_id=first, name="primary",
                                               value=0.5, terminal=True))
        writer.flush()
        _wait(lambda: stats()["records"].get("late-events", 0) >= 1, "the late reward never reached late-events",
              60, processor.log)

        driver.get(ui + "/")
        table = driver.find_element("id", "rollouts").text
        for rid in run["rids"]:
            assert rid in table, table
        assert "succeeded" in table and "grp-1" in table

        delayed = run["delayed"]
        driver.find_element("link text", delayed).click()
        page = driver.find_element("tag name", "main").text
        assert f"Rollout {delayed}" in page
        assert "tool call calculator" in page, page
        assert '"expression": "18 * 28"' in page, page  # the second group's question, its arguments pretty-printed
        # The tool's result is shown as the answer to its call (the role upper-cased by the page's CSS, not the id).
        results = [m.text for m in driver.find_elements("css selector", ".msg.tool")]
        assert results and all("TOOL · RESULT OF call_" in m and "504" in m for m in results), results
        assert "The answer is 504." in page, page
        rewards = driver.find_element("id", "rewards").text
        assert "slow-grader" in rewards, rewards
        delay = float(rewards.split("+")[-1].split(" s")[0])
        assert 1.0 <= delay < 60, rewards  # posted ~2 s after the rollout's end
        # Its two calls became transitions, each credited with the rollout's terminal reward (it was right: 1).
        rows = [r.text for r in driver.find_elements("css selector", "#transitions tbody tr")]
        assert len(rows) == 2, rows
        for row, call in zip(rows, ("c0", "c1"), strict=True):
            cells = row.split()
            assert cells[0] == call and cells[3] == "1.000" and "engine" in cells, row
        shaded = driver.find_elements("css selector", ".tok")
        assert len(shaded) == 16 and shaded[0].get_attribute("title").startswith("id "), len(shaded)

        driver.get(ui + "/rollouts/" + first)
        assert "2 · 2 · 1" in driver.find_element("tag name", "main").text  # calls · transitions · late events

        # The trainer group's committed offsets (all at 0) make it one the curves and lag read.
        commit_at_start(settings, topics.transitions, topics.partitions, trainer_run["group"])
        driver.get(ui + "/curves")
        versions = [r.text for r in driver.find_elements("css selector", "#versions tbody tr")]
        assert [v.split()[:4] for v in versions] == [["0", "3", "3", "0.667"], ["1", "3", "3", "0.667"]], versions
        for chart in ("reward", "accuracy", "trainer", "held_out_accuracy"):
            assert driver.find_elements("css selector", f"#chart-{chart} svg"), (chart, driver.page_source[-3000:])
        curves = driver.find_element("tag name", "main").text
        assert f"MLflow run {trainer_run['run_name']}" in curves, curves
        held_out = driver.find_element("id", "chart-held_out_accuracy").get_attribute("innerHTML")
        assert "held_out_accuracy (MLflow)" in held_out

        driver.get(ui + "/dead-letters")
        letters = [r.text for r in driver.find_elements("css selector", "#dead-letters tbody tr")]
        assert len(letters) == 1, letters
        assert f"{topics.calls}[" in letters[0] and "ro-broken" in letters[0], letters
        reason = driver.find_element("css selector", "#dead-letters tbody td:nth-child(4)").text
        assert len(reason) > 10, letters  # the processor's reason for refusing the record
        lags = {r.find_element("css selector", "td").text: r.text.split()
                for r in driver.find_elements("css selector", "#lag tbody tr")}
        assert f"{topics.prefix}processor" in lags and lags[f"{topics.prefix}processor"][1] == "processor", lags
        trainer = lags[trainer_run["group"]]
        # Nothing read yet: its lag is the whole topic (the transitions, and the processor's transaction markers).
        committed, end, lag = (int(x) for x in trainer[-3:])
        assert trainer[1] == "trainer" and committed == 0 and lag == end >= 2 * len(run["rids"]), trainer
    finally:
        driver.quit()
        processor.stop()


def test_a_missing_browser_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import ui_helpers

    monkeypatch.setattr(ui_helpers, "CHROMIUM", "/nonexistent/chromium-for-the-ui-test")
    with pytest.raises(AssertionError, match="apt-get install -y chromium chromium-driver"):
        ui_helpers.chrome()
