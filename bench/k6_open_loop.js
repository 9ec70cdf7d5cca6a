// One open-loop step of bench/http_bench.py, run by k6 (https://k6.io), one k6 process per offered rate.
//
// Open loop: the constant-arrival-rate executor starts iteration i at i / RATE seconds whether or not
// earlier requests have been answered. Each iteration sends one request and waits for its answer, so a
// slow server ties up virtual users (VUs); when none is free at a scheduled start, k6 drops that
// iteration and counts it in `dropped_iterations`, which the harness reports as an error, never as a
// success. Every VU is pre-allocated (no VU is initialised during the step).
//
// Coordinated omission: the intended send time of iteration i is i * (1000 / RATE) ms after the start
// of the run (k6 numbers iterations in the order they start). `latency_corrected` is measured from that
// intended time to the end of the response, so generator lateness and queueing before the send are
// inside the figure; `gen_lag` is how late the iteration started. After a dropped iteration the numbering
// shifts by one slot per drop, which makes later samples pessimistic: such a step fails the error bound
// anyway. `http_req_duration` (from the actual send) is kept as the uncorrected latency.
//
// Traffic: TARGETS is a JSON array written by http_bench.py; each entry is
// [merchant index, idempotency key id or -1 for none, JSON body]. The Idempotency-Key is
// "<RUN>k<cycle>k<key id>", so one targets file gives fresh keys at every offered rate and on every
// wrap-around while its planned replays (repeated entries) stay replays. Letters between the numbers:
// with "-" the digits of the run, the cycle and the key id ran together into a card-number-like run
// in about 10% of keys, which the gateway refuses (400 card_number_not_allowed).
//
// The full latency distribution would be too large to export at high rates, so each answer is also
// counted in a log-spaced bucket (`hist`, tag b); a never-failing threshold per bucket makes k6 report
// every bucket's count in the summary. Status codes are counted the same way (`answers`, tag s).
//
// ACK_LOG=1 (bench/pipeline.py) also logs one console line per 2xx answer to a keyed request,
// `ack <Idempotency-Key> <wall clock ms>`, so that the harness can follow each acknowledged payment to its
// final status; off by default (a log line per request costs the generator CPU).
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter, Trend } from 'k6/metrics';

const RATE = Number(__ENV.RATE);
const DURATION_S = Number(__ENV.DURATION_S);
const VUS = Number(__ENV.VUS || 256);
const BASE = __ENV.BASE;
const RUN = __ENV.RUN || 'run';
const TIMEOUT = __ENV.TIMEOUT || '2s';
const API_KEYS = (__ENV.API_KEYS || '').split(',');
const OK = new Set((__ENV.OK || '200,201,202').split(',').map(Number));
const SUMMARY = __ENV.SUMMARY || 'summary.json';
const ACK_LOG = __ENV.ACK_LOG === '1';
// Histogram: HIST_PER_DECADE log-spaced buckets per decade from HIST_MIN_MS to HIST_MAX_MS, plus an
// underflow bucket (b=0) and an overflow bucket (b=HIST_BUCKETS+1).
const HIST_MIN_MS = 0.01;
const HIST_PER_DECADE = 10;
const HIST_DECADES = 6;
const HIST_BUCKETS = HIST_PER_DECADE * HIST_DECADES;
const KNOWN_STATUSES = [0, 200, 201, 202, 400, 401, 402, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504];
const KNOWN_SET = new Set(KNOWN_STATUSES);
const PERIOD_MS = 1000 / RATE;

const targets = new SharedArray('targets', () => JSON.parse(open(__ENV.TARGETS)));

const latencyCorrected = new Trend('latency_corrected', true);
const genLag = new Trend('gen_lag', true);
const hist = new Counter('hist');
const answers = new Counter('answers');
const notOk = new Counter('not_ok');
const timeouts = new Counter('timeouts');
const transportErrors = new Counter('transport_errors');

const thresholds = {};
for (let b = 0; b <= HIST_BUCKETS + 1; b++) thresholds[`hist{b:${b}}`] = ['count>=0'];
for (const s of [...KNOWN_STATUSES, 'other']) thresholds[`answers{s:${s}}`] = ['count>=0'];

export const options = {
  scenarios: {
    step: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${DURATION_S}s`,
      preAllocatedVUs: VUS,
      maxVUs: VUS,
      // Requests still in flight at the end get the request timeout, then the step ends by itself.
      gracefulStop: '3s',
    },
  },
  thresholds,
  discardResponseBodies: true,
  summaryTrendStats: ['p(50)', 'p(90)', 'p(99)', 'p(99.9)', 'max', 'avg', 'count'],
  summaryTimeUnit: 'ms',
  systemTags: ['status'],
  noCookiesReset: true,
  setupTimeout: '10s',
};

function bucket(ms) {
  if (ms <= HIST_MIN_MS) return 0;
  const b = Math.floor(Math.log10(ms / HIST_MIN_MS) * HIST_PER_DECADE) + 1;
  return b > HIST_BUCKETS ? HIST_BUCKETS + 1 : b;
}

export default function () {
  const i = exec.scenario.iterationInTest;
  const started = exec.instance.currentTestRunDuration;
  const intended = i * PERIOD_MS;
  genLag.add(Math.max(0, started - intended));
  const t = targets[i % targets.length];
  const headers = { Authorization: `Bearer ${API_KEYS[t[0]]}`, 'Content-Type': 'application/json' };
  const key = t[1] >= 0 ? `${RUN}k${Math.floor(i / targets.length)}k${t[1]}` : null;
  if (key !== null) headers['Idempotency-Key'] = key;
  const res = http.post(`${BASE}/v1/payments`, t[2], { headers, timeout: TIMEOUT, responseType: 'none' });
  const done = exec.instance.currentTestRunDuration;
  const status = res.status;
  answers.add(1, { s: KNOWN_SET.has(status) ? String(status) : 'other' });
  if (!OK.has(status)) notOk.add(1);
  if (status === 0) {
    // 1050 is k6's request-timeout error code; anything else is a transport error.
    if (res.error_code === 1050) timeouts.add(1);
    else transportErrors.add(1);
    return;
  }
  if (ACK_LOG && key !== null && status >= 200 && status < 300) console.log(`ack ${key} ${Date.now()}`);
  const ms = done - intended;
  latencyCorrected.add(ms);
  hist.add(1, { b: String(bucket(ms)) });
}

export function handleSummary(data) {
  return { [SUMMARY]: JSON.stringify({ metrics: data.metrics, state: data.state }) };
}
