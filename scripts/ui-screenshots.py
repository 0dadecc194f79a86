"""Screenshots of ``rollstream ui``'s pages (docs/ui/*.png), taken with headless Chromium through selenium.

Point it at a realistic run, e.g. a short demo:

    .venv/bin/rollstream demo --minutes 3 --target 0 --topic-prefix demo.uishots. --run-dir /tmp/ui-demo-run
    .venv/bin/python scripts/ui-screenshots.py --topic-prefix demo.uishots. --run-dir /tmp/ui-demo-run

It starts ``rollstream ui`` on the prefix (with the demo model's tokenizer from summary.json), waits
for the index, and saves list.png, rollout.png, curves.png and dead-letters.png under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ui"))
from ui_helpers import ROLLSTREAM, chrome  # noqa: E402

from rollstream.serving.launch import free_port  # noqa: E402


def shoot(driver: object, url: str, path: Path, height: int | None = None) -> None:
    driver.get(url)  # type: ignore[attr-defined]
    time.sleep(0.5)
    full = driver.execute_script("return document.body.scrollHeight")  # type: ignore[attr-defined]
    driver.set_window_size(1360, min(height or full, full) + 20)  # type: ignore[attr-defined]
    time.sleep(0.3)
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topic-prefix", required=True)
    p.add_argument("--run-dir", help="the demo run folder (held-out accuracy, and the model's tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the demo summary's model)")
    p.add_argument("--rollout", help="the rollout to show (default: a rewarded one with a tool call)")
    p.add_argument("--out", default=str(ROOT / "docs" / "ui"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if not tokenizer and args.run_dir and (Path(args.run_dir) / "summary.json").is_file():
        tokenizer = json.loads((Path(args.run_dir) / "summary.json").read_text()).get("model")
    port = free_port()
    cmd = [str(ROLLSTREAM), "ui", "--topic-prefix", args.topic_prefix, "--port", str(port)]
    cmd += ["--tokenizer", tokenizer] if tokenizer else []
    cmd += ["--run-dir", args.run_dir] if args.run_dir else []
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    driver = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/api/stats", timeout=2).json()["caught_up_s"] is not None:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        driver = chrome()
        shoot(driver, url + "/?live=0", out / "list.png", height=900)
        rid = args.rollout
        if not rid:
            driver.get(url + "/?reward=yes&status=SUCCEEDED&live=0&page=3")
            links = driver.find_elements("css selector", "#rollouts a.mono")
            rid = links[0].text
        shoot(driver, url + "/rollouts/" + rid, out / "rollout.png")
        shoot(driver, url + "/curves", out / "curves.png")
        shoot(driver, url + "/dead-letters", out / "dead-letters.png", height=1100)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
