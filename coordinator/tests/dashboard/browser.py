"""The dashboard in a real browser: headless Chromium (Debian's), driven by Playwright.

Run by coordinator/tests/dashboard.rs, which owns the processes: a coordinator and four
agents. When this script needs something done to them it prints `ACTION <what>` and waits
for a line on stdin. Every check compares what the page shows with what the status API
says (read here with urllib, independently of the page). Exits non-zero, with the reason,
on the first check that fails.
"""

import argparse
import json
import re
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def say(*words):
    print(*words, flush=True)


def action(what):
    say("ACTION", what)
    line = sys.stdin.readline().strip()
    if line != "done":
        raise SystemExit(f"the test harness answered {line!r} to {what}")


def check(ok, message):
    if not ok:
        raise AssertionError(message)


class Api:
    def __init__(self, base, token):
        self.base, self.token = base, token

    def get(self, path):
        req = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def rounds(self):
        out, after = [], 0
        while True:
            page = self.get(f"/api/v1/rounds?after={after}&per_page=500")["rounds"]
            out += page
            if len(page) < 500:
                return out
            after = page[-1]["summary"]["round"]


def wait(what, predicate, timeout=120, every=0.25):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # the page is re-rendering; try again
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def fact(page, key):
    return page.locator(f'[data-fact="{key}"] dd').inner_text()


def number(text):
    return int(re.sub(r"[^0-9]", "", text.split(" ")[0]))


def sites_on_page(page):
    return page.eval_on_selector_all(
        "#sites-table tbody tr",
        """rows => rows.map(r => ({
            name: r.dataset.site,
            connected: r.querySelector('[data-connected]').dataset.connected === 'true',
            cells: [...r.children].map(c => c.innerText),
        }))""",
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--shots", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    api = Api(args.url, args.token)
    openapi = api.get("/api/v1/openapi.json")
    templates = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in openapi["paths"]]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        requests, problems = [], []
        page.on("request", lambda r: requests.append((r.method, r.url)))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        # Chromium logs each refused request (the wrong token's 401, a stopped coordinator)
        # as a console error: those are expected here; any other error is a fault.
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" and "Failed to load resource" not in m.text else None)

        # A wrong token: an error, and no data anywhere on the page.
        page.goto(args.url + "/")
        check(page.locator("#login").is_visible(), "the login form is shown first")
        check(page.locator("label[for=token]").inner_text() == "Status token", "the token field is labelled")
        page.fill("#token", "not-the-token-0123456789")
        page.click("#login-form button[type=submit]")
        wait("the wrong-token error", lambda: "Wrong token" in page.locator("#login-error").inner_text())
        check(page.locator("#dashboard").is_hidden(), "no dashboard with a wrong token")
        check(page.locator("#sites-table tbody tr").count() == 0, "no site rows with a wrong token")
        check(page.locator("#overview-facts div").count() == 0, "no facts with a wrong token")
        check(page.evaluate("sessionStorage.getItem('cohort.status.token')") is None, "a refused token is not kept")
        page.screenshot(path=f"{args.shots}/dashboard-wrong-token.png")
        say("OK a wrong token shows an error and no data")

        # The right one: live data, kept in sessionStorage (never in the URL).
        page.fill("#token", args.token)
        page.press("#token", "Enter")
        wait("live", lambda: page.locator("#connection").get_attribute("data-state") == "live")
        check(args.token not in page.url, "the token is not in the URL")
        check(page.evaluate("sessionStorage.getItem('cohort.status.token')") == args.token, "the token is kept for the tab")
        first = number(fact(page, "completed"))
        wait("rounds advance on the page", lambda: number(fact(page, "completed")) >= first + 3)
        say("OK rounds advance from", first, "to", number(fact(page, "completed")))
        check("secure" in fact(page, "aggregation"), "secure aggregation is shown")

        # One agent killed: its row changes; the run goes on with three.
        action("kill-agent va")
        wait("va's row says disconnected", lambda: not [s for s in sites_on_page(page) if s["name"] == "va"][0]["connected"])
        check("disconnected" in page.locator('tr[data-site="va"]').inner_text(), "va's row says disconnected")
        say("OK va's row changed to disconnected")

        # A second one: three are needed, so the run waits and everything holds still. Now
        # the page and the API must agree exactly.
        action("kill-agent switzerland")
        wait("waiting for sites", lambda: "waiting for sites" in fact(page, "state"), timeout=180)
        time.sleep(2 * 2 + 1)  # one more poll after the state settled
        status = api.get("/api/v1/status")
        check(status["state"] == "waiting_for_sites", f"the API agrees the run waits: {status['state']}")
        wait("the page's round counter equals the API's",
             lambda: number(fact(page, "completed")) == api.get("/api/v1/status")["rounds_completed"])
        rounds = api.rounds()
        n = len(rounds)
        check(n == status["rounds_completed"], f"{n} committed rounds in /api/v1/rounds, {status['rounds_completed']} in /api/v1/status")
        pooled = page.locator('#metric-chart polyline[data-series^="pooled"]')
        points = len(pooled.get_attribute("points").split())
        check(points == n, f"the pooled metric line has {points} points; the API has {n} rounds")
        for site in ["cleveland", "hungary", "switzerland", "va"]:
            line = page.locator(f'#metric-chart polyline[data-series="{site}"]')
            want = sum(1 for r in rounds if site in r["per_site"] and "accuracy" in r["per_site"][site].get("metrics", {}))
            got = len(line.get_attribute("points").split())
            check(got == want, f"{site}'s line has {got} points; the API has {want} rounds with its accuracy")
        last = rounds[-1]["summary"]
        row = page.locator("#rounds-table tbody tr").first
        check(row.get_attribute("data-round") == str(last["round"]), "the newest round heads the rounds table")
        check(f"{last['weighted']['accuracy']:.3f}" in row.inner_text(), f"round {last['round']}'s pooled accuracy is shown")
        api_sites = api.get("/api/v1/sites")["sites"]
        shown = sites_on_page(page)
        check([s["name"] for s in shown] == [s["name"] for s in api_sites], f"sites table {shown} vs API {api_sites}")
        for s, a in zip(shown, api_sites):
            check(s["connected"] == a["connected"], f"{s['name']}: connected {s['connected']} vs {a['connected']}")
            check(s["cells"][4] == f"{a['rounds_joined']:,}", f"{s['name']}: rounds joined {s['cells'][4]} vs {a['rounds_joined']}")
            check(s["cells"][5] == f"{a['dropouts']:,}", f"{s['name']}: dropouts {s['cells'][5]} vs {a['dropouts']}")
            check(s["cells"][9] == a["agent_version"], f"{s['name']}: agent {s['cells'][9]} vs {a['agent_version']}")
            check(a["certificate_expires_unix"] and "in " in s["cells"][8], f"{s['name']}: certificate expiry {s['cells'][8]}")
        canvas = page.locator("#heatmap")
        shards = api.get("/api/v1/shards")
        check(canvas.get_attribute("data-rows") == str(len(shards["shards"])), "one heat-map row per shard")
        cols = int(canvas.get_attribute("data-columns"))
        check(1 <= cols <= len(shards["samples"]) <= cols + 3, f"heat-map columns {cols} vs {len(shards['samples'])} samples")
        say("OK page and API agree:", n, "rounds,", points, "points,", len(shown), "sites")

        # The chart reads out by keyboard.
        page.focus('#metric-chart svg')
        page.keyboard.press("ArrowLeft")
        readout = page.locator("#metric-chart .readout").inner_text()
        check(readout.startswith("Round "), f"the keyboard readout: {readout!r}")
        # Every control has a label.
        unlabelled = page.evaluate("[...document.querySelectorAll('input,select')].filter(e => e.labels.length === 0).map(e => e.id)")
        check(unlabelled == [], f"controls without a label: {unlabelled}")
        page.evaluate("document.activeElement.blur()")
        page.screenshot(path=f"{args.shots}/dashboard.png", full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        time.sleep(0.5)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        check(overflow <= 390, f"at phone width the page is {overflow} px wide")
        page.screenshot(path=f"{args.shots}/dashboard-phone.png")
        page.set_viewport_size({"width": 1280, "height": 900})
        say("OK screenshots, keyboard, labels, phone width")

        # The coordinator killed and started again: the page says it is unreachable, then
        # shows the resumed run.
        before = api.get("/api/v1/status")["started_unix"]
        action("coordinator-down")
        wait("the page notices", lambda: page.locator("#connection").get_attribute("data-state") == "offline")
        say("OK unreachable:", page.locator("#connection").inner_text())
        action("coordinator-up")
        wait("live again", lambda: page.locator("#connection").get_attribute("data-state") == "live")
        wait("the restart is said", lambda: "restarted" in page.locator("#overview-alert").inner_text())
        after = api.get("/api/v1/status")
        check(after["started_unix"] >= before, "a new process")
        check(after["rounds_completed"] == n, f"the restarted coordinator resumed at {after['rounds_completed']} rounds, not {n}")
        wait("the page shows the resumed run", lambda: number(fact(page, "completed")) == n)
        # Reloaded once it is back: still logged in (the token is the tab's), same run.
        page.reload()
        wait("live after a reload", lambda: page.locator("#connection").get_attribute("data-state") == "live")
        check(page.locator("#login").is_hidden(), "a reload keeps the tab logged in")
        check(number(fact(page, "completed")) == n, "the reloaded page shows the resumed run")
        action("start-agents")
        wait("rounds advance after the restart", lambda: number(fact(page, "completed")) >= n + 2, timeout=180)
        wait("va connected again", lambda: [s for s in sites_on_page(page) if s["name"] == "va"][0]["connected"], timeout=60)
        page.screenshot(path=f"{args.shots}/dashboard-after-restart.png", full_page=True)
        say("OK recovered after the restart; rounds", number(fact(page, "completed")))

        # A site's words are shown as text, never run: a decline reason holding markup (what
        # a hostile agent could send) is injected into the API's answer to the page.
        hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'

        # And two certificates near their end, which the sites table must flag.
        now = int(time.time())

        def poisoned(route):
            body = json.loads(route.fetch().text())
            body["sites"][0]["last_decline"] = {"round": 1, "reason": hostile}
            body["sites"][1]["certificate_expires_unix"] = now + 10 * 86400 + 3600
            body["sites"][2]["certificate_expires_unix"] = now - 3600
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

        page.route("**/api/v1/sites", poisoned)
        first_site = api.get("/api/v1/sites")["sites"][0]["name"]
        wait("the hostile reason is shown as text",
             lambda: hostile in page.locator(f'tr[data-site="{first_site}"]').inner_text())
        check(page.evaluate("window.__pwned") is None, "markup from the API ran in the page")
        check(page.locator("#sites-table img, #sites-table script").count() == 0, "markup from the API became elements")
        rows = sites_on_page(page)
        soon = page.locator(f'tr[data-site="{rows[1]["name"]}"] td[data-days]')
        gone = page.locator(f'tr[data-site="{rows[2]["name"]}"] td[data-days]')
        check(soon.get_attribute("class") == "warning" and "in 10 days" in soon.inner_text(),
              f"a certificate ending in 10 days: {soon.inner_text()!r} ({soon.get_attribute('class')})")
        check(gone.get_attribute("class") == "bad" and "expired" in gone.inner_text(),
              f"an expired certificate: {gone.inner_text()!r} ({gone.get_attribute('class')})")
        ok = page.locator(f'tr[data-site="{rows[3]["name"]}"] td[data-days]')
        check(ok.get_attribute("class") is None, "a certificate with a year left is not flagged")
        page.unroute("**/api/v1/sites")
        say("OK a decline reason with markup is shown as text; expiring certificates are flagged")

        # A run with differential privacy: the overview says what was spent, of what. (This run
        # has none; the figures are put into the status the page reads, in the API's format.)
        def private(route):
            body = json.loads(route.fetch().text())
            body["privacy"] = {"epsilon": 1.234, "delta": 1e-5, "target_epsilon": 3.0, "sites": 4, "sites_exhausted": 1}
            body["site_level_privacy"] = {"epsilon": 0.5, "delta": 1e-5, "budget": 8.0, "noise_multiplier": 1.1,
                                          "min_survivors": 3, "mode": "distributed", "clip": 1.0}
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

        page.route("**/api/v1/status", private)
        wait("the privacy budget is shown", lambda: "site-level" in fact(page, "privacy"))
        spent = fact(page, "privacy")
        check("example-level ε = 1.23 of 3 at δ = 1e-5 (1 of 4 sites exhausted)" in spent, spent)
        check("site-level ε = 0.50 of 8 at δ = 1e-5 (distributed)" in spent, spent)
        page.unroute("**/api/v1/status")
        wait("no privacy again", lambda: fact(page, "privacy") == "no differential privacy in this run")
        say("OK the privacy budget spent is shown")

        # Every request the page made is a GET of a path in the OpenAPI document.
        paths = sorted({(m, re.sub(r"^https?://[^/]+", "", u).split("?")[0]) for m, u in requests})
        for method, path in paths:
            check(method == "GET", f"the page sent {method} {path}")
            check(any(t.match(path) for t in templates), f"the page requested {path}, which the OpenAPI document does not describe")
        check(("GET", "/api/v1/shards") in paths and ("GET", "/api/v1/rounds") in paths, f"requests: {paths}")
        check(problems == [], f"the page reported: {problems}")
        say("OK requests:", " ".join(p for _, p in paths))
        browser.close()
    say("PASS")


if __name__ == "__main__":
    main()
