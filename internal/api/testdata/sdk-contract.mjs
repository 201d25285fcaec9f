// sdk-contract.mjs drives a running vaultfleet through Apideck's own
// TypeScript SDK (@apideck/unify, pinned in the repository's package.json)
// exactly as an app written for Apideck Vault would. It is run by
// TestVaultSDKContract (vault_sdk_test.go), which starts the server and
// passes its address and the catalog's mappings in the environment:
//
//	VF_URL       the server, e.g. http://127.0.0.1:41234
//	VF_TOKEN     an API token
//	VF_MAPPINGS  JSON: every value vaultfleet can put in an enum field
//
// Values are checked against the enums the SDK exports, never against
// lists copied by hand. Any failed check throws: the exit code is 1 and the
// message says which call and what.
import assert from "node:assert/strict";
import sdk from "@apideck/unify";
import components from "@apideck/unify/models/components/index.js";
import errors from "@apideck/unify/models/errors/index.js";

const { Apideck } = sdk;
const { ConnectionState, AuthType, Health, IntegrationState, ConnectionStatus, OAuthGrantType,
  ConnectionHealth, FormFieldType } = components;

const serverURL = process.env.VF_URL;
const mappings = JSON.parse(process.env.VF_MAPPINGS);
const consumerId = "sdk-consumer-1";
const appId = "sdk-app";

const client = (opts = {}) => new Apideck({
  apiKey: process.env.VF_TOKEN, appId, consumerId, serverURL,
  retryConfig: { strategy: "none" }, ...opts,
});
const vault = client().vault;

const log = [];
async function check(name, fn) {
  try {
    await fn();
  } catch (e) {
    console.error(`sdk-contract: check "${name}" failed (passed before it: ${log.join(", ") || "none"})`);
    throw e;
  }
  log.push(name);
}

// expectError runs fn and asserts the SDK raised errClass with the status,
// and Apideck's envelope with typeName.
async function expectError(fn, errClass, status, typeName) {
  let err;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err, `expected ${errClass.name} ${status}, got a success`);
  assert.ok(err instanceof errClass, `expected ${errClass.name}, got ${err?.constructor?.name}: ${err?.message}`);
  assert.equal(err.httpMeta.response.status, status);
  const body = JSON.parse(err.httpMeta.body ?? err.body);
  assert.equal(body.status_code, status);
  assert.equal(body.type_name, typeName);
  assert.equal(typeof body.error, "string");
  assert.equal(typeof body.message, "string");
  return body;
}

const values = (e) => Object.values(e);

// Every value vaultfleet can emit is a member of the SDK's enum.
await check("mappings are members of the SDK enums", async () => {
  for (const s of mappings.states) assert.ok(values(ConnectionState).includes(s), `state ${s}`);
  for (const h of mappings.health) {
    assert.ok(values(Health).includes(h), `health ${h}`);
    assert.ok(values(ConnectionHealth).includes(h), `consumer connection health ${h}`);
  }
  for (const a of mappings.auth_types) assert.ok(values(AuthType).includes(a), `auth_type ${a}`);
  for (const s of mappings.statuses) assert.ok(values(ConnectionStatus).includes(s), `status ${s}`);
  for (const s of mappings.integration_states) assert.ok(values(IntegrationState).includes(s), `integration_state ${s}`);
  for (const g of mappings.grant_types) assert.ok(values(OAuthGrantType).includes(g), `oauth_grant_type ${g}`);
});

function assertConnection(c) {
  assert.ok(values(ConnectionState).includes(c.state), `state ${c.state}`);
  assert.ok(values(Health).includes(c.health), `health ${c.health}`);
  assert.ok(values(AuthType).includes(c.authType), `auth_type ${c.authType}`);
  assert.ok(values(IntegrationState).includes(c.integrationState), `integration_state ${c.integrationState}`);
  assert.ok(values(ConnectionStatus).includes(c.status), `status ${c.status}`);
  if (c.oauthGrantType !== undefined) assert.ok(values(OAuthGrantType).includes(c.oauthGrantType));
  for (const f of c.formFields) {
    assert.ok(values(FormFieldType).includes(f.type), `form field type ${f.type}`);
    assert.equal(f.value, undefined, `form field ${f.id} carries a value`);
  }
  assert.ok(Array.isArray(c.configurableResources) && Array.isArray(c.subscriptions));
}

let list;
await check("list", async () => {
  const res = await vault.connections.list({});
  assert.equal(res.httpMeta.response.status, 200);
  list = res.getConnectionsResponse;
  assert.equal(list.statusCode, 200);
  assert.equal(list.status, "OK");
  assert.ok(list.data.length >= 3);
  for (const c of list.data) assertConnection(c);
  const bamboo = list.data.find((c) => c.serviceId === "bamboohr");
  assert.equal(bamboo.state, ConnectionState.Available);
  assert.equal(bamboo.authType, AuthType.ApiKey);
  assert.equal(bamboo.status, ConnectionStatus.Live);
  const keyField = bamboo.formFields.find((f) => f.id === "api_key");
  assert.equal(keyField.sensitive, true);
  assert.equal(keyField.type, FormFieldType.Password);
  const upcoming = list.data.find((c) => c.serviceId === "gusto");
  assert.equal(upcoming.status, ConnectionStatus.Upcoming);
  const cc = list.data.find((c) => c.serviceId === "ccapi");
  assert.equal(cc.oauthGrantType, OAuthGrantType.ClientCredentials);
  const hris = await vault.connections.list({ api: "hris" });
  assert.ok(hris.getConnectionsResponse.data.every((c) => c.unifiedApi === "hris"));
  const configured = await vault.connections.list({ configured: true });
  assert.equal(configured.getConnectionsResponse.data.length, 0);
});

await check("get (available)", async () => {
  const res = await vault.connections.get({ unifiedApi: "hris", serviceId: "bamboohr" });
  const c = res.getConnectionResponse.data;
  assert.equal(c.id, "hris+bamboohr");
  assert.equal(c.state, ConnectionState.Available);
  assert.equal(c.enabled, false);
});

await check("update (adds, credentials in settings)", async () => {
  const res = await vault.connections.update({
    unifiedApi: "hris", serviceId: "bamboohr",
    connection: { enabled: true, settings: { api_key: "sdk-secret-key-0001", subdomain: "acme" },
      metadata: { additionalProperties: { team: "blue" } } },
  });
  assert.equal(res.httpMeta.response.status, 200);
  const c = res.updateConnectionResponse.data;
  assertConnection(c);
  assert.equal(c.state, ConnectionState.Added);
  assert.equal(c.enabled, true);
  assert.deepEqual(c.settings, { subdomain: "acme" }, "the credential never comes back in settings");
  assert.equal(c.metadata.additionalProperties?.team ?? c.metadata.team, "blue");
  assert.equal(typeof c.createdAt, "number");
  assert.ok(c.createdAt > 1.7e12, "epoch milliseconds");
  assert.equal(typeof c.updatedAt, "number");
  assert.ok(!JSON.stringify(res).includes("sdk-secret-key-0001"), "no credential echo anywhere");
  const again = await vault.connections.get({ unifiedApi: "hris", serviceId: "bamboohr" });
  assert.equal(again.getConnectionResponse.data.state, ConnectionState.Added);
});

await check("validate", async () => {
  const res = await vault.validateConnection.state({ unifiedApi: "hris", serviceId: "bamboohr", requestBody: {} });
  assert.equal(res.httpMeta.response.status, 200);
  const d = res.validateConnectionStateResponse.data;
  assert.equal(d.id, "hris+bamboohr");
  assert.ok(values(ConnectionState).includes(d.state));
});

await check("import", async () => {
  const res = await vault.connections.imports({
    unifiedApi: "crm", serviceId: "salesforce",
    connectionImportData: {
      credentials: { accessToken: "sdk-access-0001", refreshToken: "sdk-refresh-0001",
        issuedAt: new Date(), expiresIn: 3600 },
      settings: { instance_url: "https://acme.my.salesforce.com" },
      metadata: { source: "sdk" },
    },
  });
  assert.equal(res.httpMeta.response.status, 200);
  const c = res.createConnectionResponse.data;
  assertConnection(c);
  assert.equal(c.state, ConnectionState.Callable);
  assert.equal(c.authType, AuthType.Oauth2);
  assert.equal(c.oauthGrantType, OAuthGrantType.AuthorizationCode);
  assert.equal(c.health, Health.Ok);
  assert.ok(!JSON.stringify(res).includes("sdk-access-0001"));
  assert.ok(!JSON.stringify(res).includes("sdk-refresh-0001"));
  // No issued_at or expires_in: age unknown, refresh queued at once.
  const stale = await vault.connections.imports({
    unifiedApi: "crm", serviceId: "salesforce", consumerId: "sdk-consumer-2",
    connectionImportData: { credentials: { accessToken: "sdk-access-0002", refreshToken: "sdk-refresh-0002" },
      settings: { instance_url: "https://acme.my.salesforce.com" } },
  });
  assert.equal(stale.createConnectionResponse.data.health, Health.PendingRefresh);
});

await check("token (client credentials)", async () => {
  await vault.connections.update({ unifiedApi: "accounting", serviceId: "ccapi",
    connection: { settings: { client_id: "cc-client", client_secret: "cc-secret-0001" } } });
  const res = await vault.connections.token({ unifiedApi: "accounting", serviceId: "ccapi", requestBody: {} });
  assert.equal(res.httpMeta.response.status, 200);
  const c = res.getConnectionResponse.data;
  assert.equal(c.state, ConnectionState.Callable);
  assert.equal(c.oauthGrantType, OAuthGrantType.ClientCredentials);
  assert.ok(!JSON.stringify(res).includes("cc-secret-0001"));
  assert.ok(!JSON.stringify(res).includes("cc-token"), "the token is never echoed");
});

await check("delete", async () => {
  const res = await vault.connections.delete({ unifiedApi: "crm", serviceId: "salesforce" });
  assert.equal(res.httpMeta.response.status, 204);
  const after = await vault.connections.get({ unifiedApi: "crm", serviceId: "salesforce" });
  assert.equal(after.getConnectionResponse.data.state, ConnectionState.Available);
});

await check("consumers create", async () => {
  const res = await vault.consumers.create({ createConsumerRequest: {
    consumerId: "sdk-new-1", metadata: { accountName: "Acme", email: "ops@acme.example" } } });
  assert.equal(res.httpMeta.response.status, 200);
  const c = res.createConsumerResponse.data;
  assert.equal(c.consumerId, "sdk-new-1");
  assert.equal(c.metadata.accountName, "Acme");
  assert.ok(!Number.isNaN(Date.parse(c.created)));
  for (let i = 2; i <= 5; i++) {
    await vault.consumers.create({ createConsumerRequest: { consumerId: `sdk-new-${i}` } });
  }
});

await check("consumers list (cursor, filter)", async () => {
  const seen = [];
  let pages = 0;
  // The SDK follows meta.cursors.next itself.
  for await (const page of await vault.consumers.list({ limit: 2, filter: { consumerId: "sdk-new-" } })) {
    const r = page.getConsumersResponse;
    assert.equal(r.status, "OK");
    assert.ok(r.data.length <= 2);
    assert.equal(r.meta.itemsOnPage, r.data.length);
    seen.push(...r.data.map((c) => c.consumerId));
    pages++;
  }
  assert.ok(pages >= 3, `pages ${pages}`);
  assert.deepEqual([...seen].sort(), ["sdk-new-1", "sdk-new-2", "sdk-new-3", "sdk-new-4", "sdk-new-5"]);
  const all = await vault.consumers.list({ limit: 200 });
  const ids = all.getConsumersResponse.data.map((c) => c.consumerId);
  assert.ok(ids.includes(consumerId), "a consumer written through /vault connections is listed");
});

await check("consumers get", async () => {
  const res = await vault.consumers.get({ consumerId });
  const c = res.getConsumerResponse.data;
  assert.equal(c.consumerId, consumerId);
  assert.deepEqual([...c.services].sort(), ["bamboohr", "ccapi"]);
  for (const conn of c.connections) {
    assert.ok(values(ConnectionHealth).includes(conn.health));
    assert.ok(values(ConnectionState).includes(conn.state));
  }
});

await check("consumers update", async () => {
  const res = await vault.consumers.update({ consumerId: "sdk-new-1",
    updateConsumerRequest: { metadata: { userName: "Jo" } } });
  assert.equal(res.updateConsumerResponse.data.metadata.userName, "Jo");
});

await check("consumers delete", async () => {
  const res = await vault.consumers.delete({ consumerId });
  assert.equal(res.deleteConsumerResponse.data.consumerId, consumerId);
  const conns = await vault.connections.list({ configured: true });
  assert.equal(conns.getConnectionsResponse.data.length, 0, "the consumer's connections are gone");
});

await check("400 missing consumer header", async () => {
  const noConsumer = client({ consumerId: undefined }).vault;
  const body = await expectError(() => noConsumer.connections.list({}), errors.BadRequestResponse, 400,
    "RequestHeadersValidationError");
  assert.match(body.message, /x-apideck-consumer-id/);
});

await check("400 invalid body", async () => {
  await expectError(() => vault.consumers.create({ createConsumerRequest: { consumerId: "bad id with spaces" } }),
    errors.BadRequestResponse, 400, "RequestValidationError");
});

await check("401", async () => {
  const bad = client({ apiKey: "not-a-token-0000000000" }).vault;
  await expectError(() => bad.connections.list({}), errors.UnauthorizedResponse, 401, "UnauthorizedError");
});

await check("404", async () => {
  await expectError(() => vault.connections.get({ unifiedApi: "crm", serviceId: "nosuch" }),
    errors.NotFoundResponse, 404, "EntityNotFoundError");
  await expectError(() => vault.consumers.get({ consumerId: "sdk-never-seen" }),
    errors.NotFoundResponse, 404, "EntityNotFoundError");
});

await check("409", async () => {
  // The SDK has no typed 409 for these operations: its generic APIError.
  await expectError(() => vault.consumers.create({ createConsumerRequest: { consumerId: "sdk-new-2" } }),
    errors.APIError, 409, "ConflictError");
});

await check("422", async () => {
  await vault.connections.update({ unifiedApi: "hris", serviceId: "bamboohr", consumerId: "sdk-consumer-3",
    connection: { settings: { api_key: "k-3", subdomain: "acme" } } });
  await expectError(() => vault.connections.token({ unifiedApi: "hris", serviceId: "bamboohr",
    consumerId: "sdk-consumer-3", requestBody: {} }), errors.UnprocessableResponse, 422, "InvalidStateError");
});

console.log(JSON.stringify({ ok: true, checks: log }));
