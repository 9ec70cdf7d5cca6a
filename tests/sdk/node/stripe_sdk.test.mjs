// The official `stripe` Node SDK, unchanged but for its host, against the gateway's Stripe-compatible
// surface. Started by tests/e2e/test_stripe_sdk_node.py (embedded) and tests/cluster (cluster), which
// start the gateway, push the test rules (tests/stripe_sdk_cases.py RULES) and pass GATEWAY_URL.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import { after, before, test } from 'node:test';
import Stripe from 'stripe';

const url = new URL(process.env.GATEWAY_URL);
const KEY = process.env.GATEWAY_API_KEY || 'sk_test_demo';
const stripe = new Stripe(KEY, {
  host: url.hostname, port: Number(url.port), protocol: url.protocol.replace(':', ''), maxNetworkRetries: 0,
});
const WAIT_MS = 20000;

let receiver;
const deliveries = [];
before(async () => {
  receiver = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      deliveries.push({ body: Buffer.concat(chunks).toString('utf8'), headers: req.headers });
      res.writeHead(200).end();
    });
  });
  await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
});
after(() => receiver.close());

async function rejects(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  assert.fail('the call succeeded');
}

async function until(fn) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const got = await fn();
    if (got) return got;
    if (Date.now() > deadline) assert.fail('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('confirm, partial capture, partial and multiple refunds', async () => {
  const auto = await stripe.paymentIntents.create({
    amount: 2000, currency: 'usd', payment_method: 'pm_card_visa', confirm: true, metadata: { order_id: 'N-1' },
  });
  assert.equal(auto.status, 'succeeded');
  assert.equal(auto.metadata.order_id, 'N-1');
  let pi = await stripe.paymentIntents.create({
    amount: 5000, currency: 'usd', payment_method: 'pm_card_mastercard', confirm: true, capture_method: 'manual',
  });
  assert.equal(pi.status, 'requires_capture');
  pi = await stripe.paymentIntents.capture(pi.id, { amount_to_capture: 4000 });
  assert.equal(pi.status, 'succeeded');
  assert.equal(pi.amount_received, 4000);
  const r1 = await stripe.refunds.create({ payment_intent: pi.id, amount: 1000 });
  const r2 = await stripe.refunds.create({ charge: pi.latest_charge, amount: 2000 });
  assert.equal(r1.status, 'succeeded');
  assert.equal(r2.amount, 2000);
  const charge = await stripe.charges.retrieve(pi.latest_charge);
  assert.equal(charge.amount_refunded, 3000);
  assert.equal(charge.refunded, false);
  const listed = await stripe.refunds.list({ payment_intent: pi.id });
  assert.deepEqual(listed.data.map((r) => r.id), [r2.id, r1.id]);
});

test('cancel', async () => {
  const pi = await stripe.paymentIntents.create({
    amount: 900, currency: 'usd', payment_method: 'pm_card_visa', confirm: true, capture_method: 'manual',
  });
  const canceled = await stripe.paymentIntents.cancel(pi.id, { cancellation_reason: 'duplicate' });
  assert.equal(canceled.status, 'canceled');
});

test('declines are card errors', async () => {
  const e = await rejects(stripe.paymentIntents.create({
    amount: 1500, currency: 'usd', payment_method: 'pm_card_chargeDeclinedInsufficientFunds', confirm: true,
  }));
  assert.equal(e.type, 'StripeCardError');
  assert.equal(e.statusCode, 402);
  assert.equal(e.decline_code, 'insufficient_funds');
  assert.equal(e.raw.payment_intent.status, 'requires_payment_method');
});

test('validation and authentication errors', async () => {
  let e = await rejects(stripe.paymentIntents.create({ currency: 'usd', payment_method: 'pm_card_visa', confirm: true }));
  assert.equal(e.type, 'StripeInvalidRequestError');
  assert.equal(e.param, 'amount');
  assert.equal(e.code, 'parameter_missing');
  e = await rejects(stripe.paymentIntents.retrieve('pi_' + 'y'.repeat(24)));
  assert.equal(e.statusCode, 404);
  assert.equal(e.code, 'resource_missing');
  const bad = new Stripe('sk_test_wrong', {
    host: url.hostname, port: Number(url.port), protocol: 'http', maxNetworkRetries: 0,
  });
  e = await rejects(bad.paymentIntents.list());
  assert.equal(e.type, 'StripeAuthenticationError');
  assert.equal(e.statusCode, 401);
});

test('idempotent replay and mismatch', async () => {
  // No digits: a key with a long digit run can look like a card number, which the gateway refuses.
  const key = `node-${crypto.randomUUID().replace(/[0-9]/g, (d) => 'ghijklmnop'[d])}`;
  const params = { amount: 3100, currency: 'usd', payment_method: 'pm_card_visa', confirm: true };
  const first = await stripe.paymentIntents.create(params, { idempotencyKey: key });
  const again = await stripe.paymentIntents.create(params, { idempotencyKey: key });
  assert.equal(again.id, first.id);
  const e = await rejects(stripe.paymentIntents.create({ ...params, amount: 3200 }, { idempotencyKey: key }));
  assert.equal(e.type, 'StripeIdempotencyError');
});

test('list with auto-pagination', async () => {
  const ids = [];
  for (let i = 0; i < 4; i += 1) {
    ids.push((await stripe.paymentIntents.create({
      amount: 800 + i, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
    })).id);
  }
  const seen = [];
  for await (const pi of stripe.paymentIntents.list({ limit: 2 })) seen.push(pi.id);
  assert.equal(new Set(seen).size, seen.length);
  for (const id of ids) assert.ok(seen.includes(id));
});

test('webhooks verified by constructEvent', async () => {
  const { port } = receiver.address();
  const endpoint = await stripe.webhookEndpoints.create({
    url: `http://127.0.0.1:${port}/hook`, enabled_events: ['payment_intent.succeeded'],
  });
  assert.ok(endpoint.secret.startsWith('whsec_'));
  const pi = await stripe.paymentIntents.create({
    amount: 4100, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
  });
  const d = await until(() => deliveries.find((x) => JSON.parse(x.body).data.object.id === pi.id));
  const event = stripe.webhooks.constructEvent(d.body, d.headers['stripe-signature'], endpoint.secret);
  assert.equal(event.type, 'payment_intent.succeeded');
  assert.equal(event.data.object.status, 'succeeded');
  assert.throws(() => stripe.webhooks.constructEvent(d.body, d.headers['stripe-signature'], 'whsec_wrong'));
  await stripe.webhookEndpoints.del(endpoint.id);
});

test('3-D Secure completion', async () => {
  const pi = await stripe.paymentIntents.create({
    amount: 2500, currency: 'usd', payment_method: 'pm_card_authenticationRequired', confirm: true,
  });
  assert.equal(pi.status, 'requires_action');
  assert.equal(pi.next_action.type, 'redirect_to_url');
  const page = pi.next_action.redirect_to_url.url;
  assert.equal((await fetch(page)).status, 200);
  const done = await fetch(page, {
    method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'result=succeed',
  });
  assert.equal(done.status, 200);
  const succeeded = await until(async () => {
    const cur = await stripe.paymentIntents.retrieve(pi.id);
    return cur.status === 'succeeded' ? cur : null;
  });
  assert.equal(succeeded.amount_received, 2500);
});

test('created without confirm, updated, confirmed, captured; an unconfirmed intent canceled', async () => {
  const pi = await stripe.paymentIntents.create({ amount: 1100, currency: 'usd', capture_method: 'manual' });
  assert.equal(pi.status, 'requires_payment_method');
  assert.equal(pi.payment_method, null);
  const updated = await stripe.paymentIntents.update(pi.id, {
    amount: 1300, payment_method: 'pm_card_visa', metadata: { order_id: 'N-9' },
  });
  assert.equal(updated.status, 'requires_confirmation');
  assert.equal(updated.amount, 1300);
  const confirmed = await stripe.paymentIntents.confirm(pi.id);
  assert.equal(confirmed.id, pi.id);
  assert.equal(confirmed.status, 'requires_capture');
  const captured = await stripe.paymentIntents.capture(pi.id, { amount_to_capture: 1000 });
  assert.equal(captured.status, 'succeeded');
  assert.equal(captured.amount_received, 1000);
  assert.equal(captured.metadata.order_id, 'N-9');
  const other = await stripe.paymentIntents.create({ amount: 500, currency: 'usd', payment_method: 'pm_card_visa' });
  assert.equal(other.status, 'requires_confirmation');
  const canceled = await stripe.paymentIntents.cancel(other.id, { cancellation_reason: 'abandoned' });
  assert.equal(canceled.status, 'canceled');
  const e = await rejects(stripe.paymentIntents.confirm(other.id));
  assert.equal(e.code, 'payment_intent_unexpected_state');
});

test('ending_before pages back', async () => {
  for (let i = 0; i < 3; i += 1) {
    await stripe.paymentIntents.create({ amount: 600 + i, currency: 'usd', payment_method: 'pm_card_visa', confirm: true });
  }
  const first = await stripe.paymentIntents.list({ limit: 2 });
  const second = await stripe.paymentIntents.list({ limit: 2, starting_after: first.data[1].id });
  const back = await stripe.paymentIntents.list({ limit: 2, ending_before: second.data[0].id });
  assert.deepEqual(back.data.map((x) => x.id), first.data.map((x) => x.id));
  const listed = (await stripe.paymentIntents.list({ limit: 20 })).data.map((x) => x.id);
  const newer = [];
  for await (const x of stripe.paymentIntents.list({ limit: 2, ending_before: listed[4] })) newer.push(x.id);
  assert.deepEqual([...newer].sort(), listed.slice(0, 4).sort());
});

test('events beyond the newest hundred payments', async () => {
  const pi = await stripe.paymentIntents.create({
    amount: 3400, currency: 'usd', payment_method: 'pm_card_visa', confirm: true,
  });
  const created = (await stripe.events.list({ type: 'payment_intent.created', limit: 10 })).data
    .find((x) => x.data.object.id === pi.id);
  assert.ok(created);
  for (let i = 0; i < 105; i += 1) {
    const r = await fetch(`${url.origin}/v1/payments`, {
      method: 'POST', headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ amount: 200 + i, currency: 'USD', payment_method: 'tok_visa' }),
    });
    assert.ok(r.status === 201 || r.status === 202);
  }
  const seen = [];
  for await (const x of stripe.events.list({ type: 'payment_intent.created', limit: 100 })) seen.push(x.id);
  assert.ok(seen.includes(created.id));
  assert.equal((await stripe.events.retrieve(created.id)).type, 'payment_intent.created');
});

test('payment_intent.created and payment_intent.requires_action delivered and verified', async () => {
  const { port } = receiver.address();
  const endpoint = await stripe.webhookEndpoints.create({
    url: `http://127.0.0.1:${port}/hook`, enabled_events: ['payment_intent.created', 'payment_intent.requires_action'],
  });
  const draft = await stripe.paymentIntents.create({
    amount: 2800, currency: 'usd', payment_method: 'pm_card_authenticationRequired',
  });
  const confirmed = await stripe.paymentIntents.confirm(draft.id);
  assert.equal(confirmed.status, 'requires_action');
  for (const type of ['payment_intent.created', 'payment_intent.requires_action']) {
    const d = await until(() => deliveries.find((x) => {
      const ev = JSON.parse(x.body);
      return ev.type === type && ev.data.object.id === draft.id;
    }));
    const event = stripe.webhooks.constructEvent(d.body, d.headers['stripe-signature'], endpoint.secret);
    assert.equal(event.type, type);
  }
  await stripe.paymentIntents.cancel(draft.id);
  await stripe.webhookEndpoints.del(endpoint.id);
});
