"""Check that HTML figures render with the network off: no request leaves the machine, and something is drawn.

Each page is opened in headless Chromium (through choreographer, which kaleido already needs) with the network
emulated offline. Every request whose URL is not ``file:``, ``data:``, ``blob:`` or ``about:`` is recorded, as is
every failed load; after the load event the page is asked how many plotly plots (``.main-svg``) or circuitsvis
views (children of the ``circuits-vis-*`` div) it drew. Usage: ``python -m mhop_lens.viz.offline_check DIR
[--max-mb N]``: for a folder it also prints the folder's total size (the shared ``plotly.min.js`` and PNG/PDF
included) and fails above ``N`` MB (10^6 bytes).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOCAL = ("file:", "data:", "blob:", "about:")
DRAWN_JS = ("document.querySelectorAll('.main-svg').length"
            " + document.querySelectorAll('[id^=circuits-vis-] *').length")


@dataclass
class PageCheck:
    path: Path
    remote_requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    drawn: int = 0  # plotly svg layers + circuitsvis elements rendered

    @property
    def ok(self) -> bool:
        return not self.remote_requests and not self.failed and self.drawn > 0


async def _check(browser, path: Path, settle: float) -> PageCheck:
    result = PageCheck(path)
    tab = await browser.create_tab("about:blank")

    async def on_request(msg):
        url = msg["params"]["request"]["url"]
        if not url.startswith(LOCAL):
            result.remote_requests.append(url)

    async def on_failed(msg):
        result.failed.append(f"{msg['params'].get('type')}: {msg['params'].get('errorText')}")

    await tab.send_command("Network.enable")
    await tab.send_command("Network.emulateNetworkConditions", params={
        "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    await tab.send_command("Page.enable")
    tab.subscribe("Network.requestWillBeSent", on_request)
    tab.subscribe("Network.loadingFailed", on_failed)
    loaded = tab.subscribe_once("Page.loadEventFired")
    await tab.send_command("Page.navigate", params={"url": path.resolve().as_uri()})
    await asyncio.wait_for(loaded, timeout=60)
    await asyncio.sleep(settle)
    value = await tab.send_command("Runtime.evaluate", params={"expression": DRAWN_JS, "returnByValue": True})
    result.drawn = int(value["result"]["result"].get("value", 0))
    await browser.close_tab(tab.target_id)
    return result


async def _check_all(paths: list[Path], settle: float) -> list[PageCheck]:
    import choreographer

    from mhop_lens.viz.export import find_browser

    async with choreographer.Browser(path=find_browser(), headless=True) as browser:
        return [await _check(browser, p, settle) for p in paths]


def check_pages(paths, settle: float = 1.5) -> list[PageCheck]:
    """Open each HTML file offline in headless Chromium; one ``PageCheck`` per file (``.ok`` when clean)."""
    from mhop_lens.viz.export import find_browser

    if find_browser() is None:
        raise RuntimeError("no Chromium browser found (install `chromium` or set BROWSER_PATH).")
    return asyncio.run(_check_all([Path(p) for p in paths], settle))


def folder_bytes(folder: Path) -> int:
    """Total size of the files in ``folder`` (not recursive)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str]) -> int:
    max_mb = None
    if len(argv) == 3 and argv[1] == "--max-mb":
        max_mb, argv = float(argv[2]), argv[:1]
    if len(argv) != 1:
        print("usage: python -m mhop_lens.viz.offline_check DIR_OR_HTML [--max-mb N]", file=sys.stderr)
        return 2
    target = Path(argv[0])
    paths = sorted(target.glob("*.html")) if target.is_dir() else [target]
    checks = check_pages(paths)
    for c in checks:
        status = "ok" if c.ok else "FAIL"
        print(f"{status:<5}{c.path.name}: drawn={c.drawn} remote={c.remote_requests[:3]} failed={c.failed[:3]}")
    ok = all(c.ok for c in checks)
    if target.is_dir():
        size = folder_bytes(target)
        within = max_mb is None or size <= max_mb * 1e6
        print(f"{'ok' if within else 'FAIL':<5}{target}: {size / 1e6:.2f} MB ({size / 2**20:.2f} MiB) in "
              f"{sum(1 for p in target.iterdir() if p.is_file())} files" + (f", limit {max_mb:g} MB" if max_mb else ""))
        ok = ok and within
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
