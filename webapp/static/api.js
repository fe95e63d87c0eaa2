// Identity and the JSON API (the user's id, voices, regions, minutes used today), and the
// guard every socket message is parsed behind.
// The server names the user: the uid cookie it set when it served this page (HttpOnly,
// signed), or a user token an integration put in the page's URL (?token=T), passed on.
import { state } from "./state.js";
import { measureRegions } from "./beacons.js";
import { setButtons, setStatus, ui } from "./ui.js";

export const userToken = new URLSearchParams(location.search).get("token");

// `path` with the page's user token, if it has one.
function withToken(path) {
  if (!userToken) return path;
  return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(userToken)}`;
}

// A socket's text message, or null for anything that is not one of ours (never throws).
export function parseMessage(data) {
  let m;
  try {
    m = JSON.parse(data);
  } catch {
    return null;
  }
  return m && typeof m.type === "string" ? m : null;
}

// The JSON `path` answers; an error says what the server said, if it said why.
async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (r.ok) return r.json();
  const why = await r.json().then((body) => body && body.message, () => null);
  throw new Error(why || `${path} answered HTTP ${r.status}`);
}

export async function loadIdentity() {
  try {
    ui.uid.textContent = (await getJson(withToken("/api/me"))).user;
  } catch (err) {
    ui.uid.textContent = `unknown (${err.message})`;
  }
}

export async function loadModels() {
  try {
    const models = (await getJson("/api/models")).filter((m) => m.state === "live");
    const names = [...new Map(models.map((m) => [m.name, m])).values()];
    ui.model.replaceChildren(...names.map((m) => new Option(`${m.name} (v${m.version})`, m.name)));
    state.modelsLoaded = names.length > 0;
    if (state.modelsLoaded) setStatus("Ready. Pick a voice and press Start.", "idle", "idle");
    else setStatus("No voices are available right now. Try again later.", "error", "error");
  } catch (err) {
    state.modelsLoaded = false;
    setStatus("Cannot reach the server (loading voices failed). Retrying…", "error", "error");
    setTimeout(loadModels, 3000);
  }
  setButtons();
}

export async function loadRegions() {
  try {
    const regions = await getJson("/api/regions");
    for (const r of regions) {
      ui.region.add(new Option(`${r.name} (${r.provider})`, r.name));
    }
    measureRegions(regions);
  } catch (err) {
    /* keep "Nearest (auto)" only */
  }
}

export async function refreshUsage() {
  try {
    const u = await getJson(withToken("/api/usage"));
    const today = new Date().toISOString().slice(0, 10);
    const secs = u.minutes.filter((m) => m.minute.startsWith(today))
      .reduce((a, m) => a + m.seconds, 0);
    ui.usage.textContent = `Minutes used today: ${(secs / 60).toFixed(1)}`;
    ui.usage.hidden = false;
  } catch (err) {
    ui.usage.hidden = true; // endpoint missing or server down: say nothing
  }
}
