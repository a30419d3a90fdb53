"""Drives headless Chromium through the sign-in pages that tests/suite/browser.rs lists.

One browser launch, one page per case. The test CA is trusted through an NSS database under the
`home` folder the spec names (Chromium on Linux reads $HOME/.pki/nssdb), never by ignoring
certificate errors; the test's host names resolve to 127.0.0.1 for the browser only
(--host-resolver-rules). Reads the spec (JSON) from the file named by the first argument and
prints one JSON result per case, in order, as a JSON list on stdout.

A case: {"url": where to start, "until": the URL prefix that ends it, "hold": optional URL
prefix of a navigation to hold while the page is screenshotted, "shot": screenshot the final
page}. A result: the final URL and text, every request the page made (method, URL, form body),
the CSP issues Chromium reported (CDP Audits) and console errors, and screenshot checks.
"""

import base64
import io
import json
import os
import subprocess
import sys

from PIL import Image
from playwright.sync_api import sync_playwright

# Every wait in here is bounded: a case that does not reach its end within this fails alone.
CASE_TIMEOUT_MS = 15_000


def trust(home, ca):
    """An NSS database under `home` that trusts the test CA for TLS servers."""
    nssdb = os.path.join(home, ".pki", "nssdb")
    os.makedirs(nssdb, exist_ok=True)
    certutil = ["certutil", "-d", "sql:" + nssdb]
    subprocess.run(certutil + ["-N", "--empty-password"], check=True, capture_output=True)
    subprocess.run(certutil + ["-A", "-t", "C,,", "-n", "oauth-relay test CA", "-i", ca], check=True)


def grey(png):
    """How much of a screenshot is dark (text) and the range of its grey."""
    image = Image.open(io.BytesIO(png)).convert("L")
    lo, hi = image.getextrema()
    return {"dark_pixels": sum(image.histogram()[:128]), "grey_range": hi - lo}


def shot(page, path):
    """Screenshot a settled `page` to `path`, with the text it shows."""
    png = page.screenshot(path=path)
    return dict(grey(png), text=page.inner_text("body"))


def held_shot(context, cdp, path, text):
    """Screenshot a page whose next navigation is held, and whether it looks exactly like a
    plain page that shows `text`.

    Only the browser side answers while the navigation is pending (CDP's Page.captureScreenshot;
    page.screenshot(), inner_text() and DOM queries wait for the page and never return), so the
    text is checked by comparing pixels with a reference page that says `text` and nothing else.
    """
    png = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"})["data"])
    with open(path, "wb") as f:
        f.write(png)
    reference = context.new_page()
    reference.set_content(f'<!doctype html><html><head><meta charset="utf-8"></head><body><p>{text}</p></body></html>')
    pixels = [Image.open(io.BytesIO(p)).convert("RGB").tobytes() for p in (png, reference.screenshot())]
    reference.close()
    same = pixels[0] == pixels[1]
    return dict(grey(png), text=text if same else "")


def run_case(context, case, index, out_dir):
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Audits.enable")
    cdp.send("Log.enable")
    result = {"requests": [], "issues": [], "console": [], "held": None, "shot": None}
    cdp.on("Audits.issueAdded", lambda e: result["issues"].append(e["issue"]["code"]))
    page.on("console", lambda m: m.type == "error" and result["console"].append(m.text))
    page.on(
        "request",
        lambda r: result["requests"].append({"method": r.method, "url": r.url, "body": r.post_data}),
    )
    held = []
    if case.get("hold"):
        prefix = case["hold"]

        def hold(route):
            # Held until the page that asked for it has been screenshotted; later ones go on.
            if result["held"] is None:
                held.append(route)
            else:
                route.continue_()

        page.route(lambda url: url.startswith(prefix), hold)
    try:
        page.goto(case["url"], wait_until="commit", timeout=CASE_TIMEOUT_MS)
        if case.get("hold"):
            for _ in range(CASE_TIMEOUT_MS // 100):
                if held:
                    break
                page.wait_for_timeout(100)
            # The page that asked for this navigation is still on screen until it is let go.
            result["held"] = held_shot(context, cdp, os.path.join(out_dir, f"case{index}-held.png"), case["hold_text"])
            for route in held:
                route.continue_()
        page.wait_for_url(lambda url: url.startswith(case["until"]), timeout=CASE_TIMEOUT_MS)
        page.wait_for_load_state("load", timeout=CASE_TIMEOUT_MS)
        result["final_url"] = page.url
        result["text"] = page.inner_text("body")
        if case.get("shot"):
            result["shot"] = shot(page, os.path.join(out_dir, f"case{index}.png"))
    except Exception as e:  # noqa: BLE001 - reported per case, the test says which failed
        result["error"] = f"{type(e).__name__}: {e}"
        result["final_url"] = page.url
    if case.get("hold"):
        page.unroute_all(behavior="ignoreErrors")
    page.close()
    return result


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    trust(spec["home"], spec["ca"])
    rules = ",".join(f"MAP {host} 127.0.0.1" for host in spec["hosts"])
    env = dict(os.environ, HOME=spec["home"])
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=spec["chromium"],
            args=[f"--host-resolver-rules={rules}"],
            env=env,
            timeout=60_000,
        )
        context = browser.new_context()
        results = [run_case(context, case, i, spec["home"]) for i, case in enumerate(spec["cases"])]
        browser.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
