// Opens Airflow's UI (through airstate's URL) on a task instance's state view in headless
// Chromium, waits until every text given (the key a worker wrote, its value) is on the
// page, and saves a screenshot. The value cells render after the keys, so both are waited for.
// usage: node ui_state_view.js <url> <screenshot.png> <text that must appear>...
// env: PLAYWRIGHT_CORE (the playwright-core package folder), CHROMIUM (the browser binary)
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const fs = require("fs");
const os = require("os");
const path = require("path");

const [url, screenshot, ...expected] = process.argv.slice(2);

(async () => {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "airstate-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const requests = [];
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("response", (r) => {
      if (r.url().includes("/api/v2/")) requests.push(`${r.status()} ${r.request().method()} ${r.url()}`);
    });
    await page.goto(url, { waitUntil: "domcontentloaded", timeout: 60000 });
    for (const text of expected) {
      await page.getByText(text).first().waitFor({ state: "visible", timeout: 60000 });
    }
    // Let the value cells render before the picture is taken.
    await page.waitForLoadState("networkidle", { timeout: 30000 }).catch(() => {});
    await page.screenshot({ path: screenshot, fullPage: true });
    const text = await page.innerText("body");
    console.log(JSON.stringify({ ok: true, requests, text }));
  } catch (error) {
    try {
      const page = context.pages()[0];
      if (page) await page.screenshot({ path: screenshot, fullPage: true });
    } catch (_) {}
    console.log(JSON.stringify({ ok: false, error: String(error), requests }));
    process.exitCode = 1;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
})();
