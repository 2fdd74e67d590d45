"""Screenshots of the TensorBoard views, taken in headless Chromium (rerunnable).

Runs a short fit of the digits demo (``examples/digits_demo.py``: a BatchNorm convnet whose
LightningModule calls ``save_hyperparameters()``) with the TensorBoard logger, starts TensorBoard on
its logs, and saves what a user sees in the Custom Scalars, HParams and Text tabs, as small PNGs
(palette-quantised) under ``docs/figures/``:

    python docs/screenshots/take_screenshots.py            # about 2-4 minutes on 2 CPU cores
    python docs/screenshots/take_screenshots.py --steps 60 --out /tmp/shots

Needs TensorBoard (in the dev extras) and a Chromium (Debian: ``apt-get install chromium``; else
``--chromium PATH``). Nothing is downloaded: the data are scikit-learn's bundled digits.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The tabs shot, and the PNG each is saved as.
TABS = {
    "custom_scalars": "tensorboard_custom_scalars.png",
    "hparams": "tensorboard_hparams.png",
    "text": "tensorboard_text.png",
}


def main(argv: list[str] | None = None) -> int:
    """Fit, serve, shoot; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the fit")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--chromium", default=None, help="the browser (default: on the PATH)")
    parser.add_argument("--size", default="1280,960", help="window size, width,height")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time per page")
    args = parser.parse_args(argv)
    browser = args.chromium or _find_browser()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdm_shots_") as tmp:
        logs = Path(tmp) / "logs"
        _fit(logs, args.steps)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logs / "digits_demo"),
             "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for(f"http://127.0.0.1:{port}/data/runs", timeout=120)
            for tab, name in TABS.items():
                path = args.out / name
                _shoot(browser, f"http://127.0.0.1:{port}/#{tab}", path, args.size, args.wait_ms)
                _shrink(path)
                print(f"{tab}: {path} ({path.stat().st_size // 1024} KiB)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


def _fit(logs: Path, steps: int) -> None:
    """The digits demo, short: windows of 5 every 5 steps, so that the charts have points."""
    sys.path.insert(0, str(ROOT / "examples"))
    from digits_demo import main as demo

    every = max(1, steps // 30)
    demo(["--steps", str(steps), "--every-n-steps", str(every), "--log-dir", str(logs),
          "--report", ""])  # fmt: skip


def _find_browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("No Chromium found: apt-get install chromium, or pass --chromium PATH.")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"TensorBoard did not answer at {url} within {timeout:.0f} s.")


def _shoot(browser: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="sdm_chromium_") as profile:
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={size}",
             f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
        )  # fmt: skip


def _shrink(path: Path) -> None:
    """A palette of 64 colours: a dashboard has few, and the file a fraction of the size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
