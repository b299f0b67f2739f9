import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Client } from 'ldapts';
import { authenticate, checkLdapConfig, DirectoryUnavailableError, type LdapConfig } from '../../src/broker/auth/directory.js';
import { api, cleanup, testBroker } from './harness.js';
import { freePort } from '../support/ports.js';

// A real OpenLDAP slapd (Debian package slapd), started here on 127.0.0.1 with its own config.
const SLAPD = '/usr/sbin/slapd';
const skip = existsSync(SLAPD) ? false : 'slapd is not installed (Debian package slapd); .ci/run installs it';
const SUFFIX = 'dc=carryon,dc=test';
const ROOT = { dn: `cn=admin,${SUFFIX}`, password: 'root-secret' };

let dir: string;
let slapd: ChildProcess | undefined;
let url: string;
let ldap: LdapConfig;

async function connectable(u: string): Promise<boolean> {
  const c = new Client({ url: u, connectTimeout: 500 });
  try {
    await c.bind(ROOT.dn, ROOT.password);
    return true;
  } catch {
    return false;
  } finally {
    await c.unbind().catch(() => undefined);
  }
}

before(async () => {
  if (skip) return;
  dir = mkdtempSync(join(tmpdir(), 'carryon-ldap-'));
  mkdirSync(join(dir, 'db'));
  const schema = ['core', 'cosine', 'inetorgperson', 'nis'].map((s) => `include /etc/ldap/schema/${s}.schema`).join('\n');
  writeFileSync(join(dir, 'slapd.conf'), `${schema}
pidfile ${join(dir, 'slapd.pid')}
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 16777216
suffix "${SUFFIX}"
rootdn "${ROOT.dn}"
rootpw ${ROOT.password}
directory ${join(dir, 'db')}
`);
  const port = await freePort();
  url = `ldap://127.0.0.1:${port}`;
  slapd = spawn(SLAPD, ['-f', join(dir, 'slapd.conf'), '-h', `${url}/`, '-d', '0'], { stdio: 'ignore' });
  for (let i = 0; i < 100 && !(await connectable(url)); i++) await new Promise((r) => setTimeout(r, 100));
  const c = new Client({ url });
  await c.bind(ROOT.dn, ROOT.password);
  await c.add(SUFFIX, { objectClass: ['top', 'dcObject', 'organization'], dc: 'carryon', o: 'Carryon test' });
  for (const ou of ['people', 'groups']) await c.add(`ou=${ou},${SUFFIX}`, { objectClass: ['organizationalUnit'], ou });
  const person = (uid: string, password: string) =>
    c.add(`uid=${uid},ou=people,${SUFFIX}`, { objectClass: ['inetOrgPerson'], uid, cn: uid, sn: uid, userPassword: password });
  await person('ldapalice', 'alice-ldap-pw');
  await person('ldapbob', 'bob-ldap-pw');
  const group = (cn: string, members: string[]) =>
    c.add(`cn=${cn},ou=groups,${SUFFIX}`, { objectClass: ['groupOfNames'], cn, member: members.map((m) => `uid=${m},ou=people,${SUFFIX}`) });
  await group('travellers', ['ldapalice', 'ldapbob']);
  await group('desktop-admins', ['ldapbob']);
  await c.unbind();
  // This lab slapd speaks plain LDAP: said so explicitly (the broker refuses it otherwise).
  ldap = { url, userDnTemplate: `uid={user},ou=people,${SUFFIX}`, groupBase: `ou=groups,${SUFFIX}`, adminGroup: 'desktop-admins', allowInsecure: true };
});

after(() => {
  slapd?.kill('SIGTERM');
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('LDAP bind against a real slapd: password, groups, admin group, refusals', { skip }, async () => {
  const broker = await testBroker(undefined, { settings: { passwordCostN: 1024, ldap } });
  const http = api(broker.url, broker.fingerprint);
  try {
    const meta = broker.ctx.meta;
    const alice = await authenticate(meta, ldap, 'ldapalice', 'alice-ldap-pw');
    assert.deepEqual(alice && { name: alice.name, role: alice.role, groups: alice.groups }, { name: 'ldapalice', role: 'user', groups: ['travellers'] });
    assert.equal((await meta.getUser('ldapalice'))?.source, 'ldap', 'first login records the directory user (no password kept)');
    const bob = await authenticate(meta, ldap, 'ldapbob', 'bob-ldap-pw');
    assert.equal(bob?.role, 'admin');
    assert.deepEqual(bob?.groups.sort(), ['desktop-admins', 'travellers']);
    assert.equal(await authenticate(meta, ldap, 'ldapalice', 'wrong'), null);
    assert.equal(await authenticate(meta, ldap, 'nobody', 'whatever'), null);
    assert.equal(await authenticate(meta, ldap, 'ldapalice,ou=x', 'alice-ldap-pw'), null, 'names outside the allowed alphabet never reach the directory');

    // Over HTTPS: the LDAP user logs in; a wrong password is 401 and audited.
    assert.equal((await http.call('POST', '/v1/auth/login', { username: 'ldapalice', password: 'alice-ldap-pw' })).status, 200);
    const bad = await http.call('POST', '/v1/auth/login', { username: 'ldapalice', password: 'nope' });
    assert.equal(bad.status, 401);
    assert.ok((await meta.listEvents({ limit: 50 })).some((e) => e.actor === 'ldapalice' && e.action === 'login' && e.outcome === 'denied'));

    // The directory matches uid regardless of case: every spelling is the one account, one record.
    const shouted = await http.call('POST', '/v1/auth/login', { username: 'LDAPAlice', password: 'alice-ldap-pw' });
    assert.deepEqual([shouted.status, (shouted.body.user as { name: string }).name], [200, 'ldapalice']);
    assert.equal(await meta.getUser('LDAPAlice'), null, 'no second record for another spelling');
    // … and one throttle: guesses spread over spellings add up (5 free per user by default).
    for (const spelling of ['LdapBob', 'LDAPBOB', 'ldapBob', 'LDAPbob', 'ldapbob']) {
      assert.equal((await http.call('POST', '/v1/auth/login', { username: spelling, password: 'guess' })).status, 401);
    }
    const held = await http.call('POST', '/v1/auth/login', { username: 'LdApBoB', password: 'bob-ldap-pw' });
    assert.deepEqual([held.status, held.body.error], [429, 'too-many-attempts']);
    assert.ok((await meta.listEvents({ limit: 50 })).filter((e) => e.actor === 'ldapbob' && /bad credentials/.test(e.detail ?? '')).length === 5);
    // A local account's name in another case is not a way in through the directory.
    await meta.createUser({ name: 'carol', passwordHash: null, role: 'admin', source: 'local' });
    assert.equal(await authenticate(meta, ldap, 'CAROL', 'anything'), null);
  } finally {
    await http.close();
    await broker.close();
    cleanup(broker.dir);
  }
});

test('a directory that cannot be reached is a 503 naming LDAP, not a wrong password', { skip }, async () => {
  const down: LdapConfig = { ...ldap, url: `ldap://127.0.0.1:${await freePort()}` };
  const broker = await testBroker(undefined, { settings: { passwordCostN: 1024, ldap: down } });
  const http = api(broker.url, broker.fingerprint);
  try {
    await assert.rejects(authenticate(broker.ctx.meta, down, 'ldapalice', 'alice-ldap-pw'), DirectoryUnavailableError);
    const res = await http.call('POST', '/v1/auth/login', { username: 'ldapalice', password: 'alice-ldap-pw' });
    assert.equal(res.status, 503);
    assert.equal(res.body.error, 'directory-unavailable');
    // Local accounts still work while the directory is down.
    assert.equal((await http.call('POST', '/v1/auth/login', { username: 'root', password: 'root-password-1' })).status, 200);
  } finally {
    await http.close();
    await broker.close();
    cleanup(broker.dir);
  }
});

test('LDAP passwords never travel in clear unless configured so: ldap:// needs StartTLS or allowInsecure', async () => {
  const base = { userDnTemplate: 'uid={user},dc=x' };
  assert.throws(() => checkLdapConfig({ ...base, url: 'ldap://dir.example' }), { code: 'bad-config' });
  assert.throws(() => checkLdapConfig({ ...base, url: 'http://dir.example' }), { code: 'bad-config' });
  checkLdapConfig({ ...base, url: 'ldaps://dir.example' });
  checkLdapConfig({ ...base, url: 'ldap://dir.example', startTls: true });
  checkLdapConfig({ ...base, url: 'ldap://dir.example', allowInsecure: true });
  await assert.rejects(testBroker(undefined, { settings: { passwordCostN: 1024, ldap: { ...base, url: 'ldap://127.0.0.1:1' } } }), { code: 'bad-config' });
});
