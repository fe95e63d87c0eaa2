// Which region is nearest, measured: each region's beacon (GET /api/regions' beacon_url) is
// timed a few times, all regions at once, within BUDGET_MS; the best of each region's
// samples goes with the lobby request (?rtt=us-west:23.5,...), and placement prefers it to
// the guess from the time zone. Measured once per page, when the regions load.
import { state } from "./state.js";

const SAMPLES = 3; // the first may pay for a TCP (and TLS) handshake: the best one counts
const BUDGET_MS = 900;

export function measureRegions(regions) {
  const beacons = regions.filter((r) => typeof r.beacon_url === "string" && r.beacon_url);
  if (!beacons.length) return;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), BUDGET_MS);
  const once = async (url) => {
    const t0 = performance.now();
    await fetch(url, { cache: "no-store", mode: "no-cors", signal: abort.signal });
    return performance.now() - t0;
  };
  state.rttsReady = Promise.all(beacons.map(async (r) => {
    let best = Infinity;
    for (let i = 0; i < SAMPLES; i++) {
      try {
        best = Math.min(best, await once(r.beacon_url));
      } catch {
        break; // unreachable, or the budget is spent: what we have counts
      }
    }
    if (best < Infinity) state.rtts[r.name] = Math.round(best * 10) / 10;
  })).finally(() => clearTimeout(timer));
}

// `rtt=` for the lobby's query, or "" if nothing was measured.
export function rttParam() {
  return Object.entries(state.rtts).map(([name, ms]) => `${name}:${ms}`).join(",");
}
