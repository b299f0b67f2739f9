// carryon-test: sqlite-only (the CLI's tables are the subject; the admin routes it calls run on PostgreSQL in console-api and the console test)
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { renderTable, ago, left, rate } from '../../src/cli/format.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

const run = promisify(execFile);
let broker: RunningBroker & { dir: string };
let http: Api;
let env: NodeJS.ProcessEnv;
const main = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');

async function cli(...args: string[]): Promise<string> {
  return (await run(process.execPath, [main, 'admin', ...args], { env })).stdout;
}
async function fails(...args: string[]): Promise<string> {
  const r = await run(process.execPath, [main, 'admin', ...args], { env }).then(() => null, (e: { stderr: string }) => e);
  assert.ok(r, `carryon admin ${args.join(' ')} should fail`);
  return r.stderr;
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  env = { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password, NEW_USER_PASSWORD: 'frank-password' };
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

test('table and unit helpers: aligned columns, right-aligned numbers, MB/s, "3 h ago"', () => {
  const now = Date.parse('2026-01-01T12:00:00Z');
  assert.equal(ago('2026-01-01T09:00:00Z', now), '3 h ago');
  assert.equal(ago('2026-01-01T11:59:58Z', now), 'just now');
  assert.equal(left('2026-01-04T12:00:00Z', now), '3 d left');
  assert.equal(rate(12_345_678), '12.3 MB/s');
  assert.equal(rate(0), '0.0 MB/s');
  const t = renderTable([{ a: 'x', n: '1.0 MiB' }, { a: 'longer', n: '10.0 MiB' }], [{ h: 'name', v: (r) => r.a }, { h: 'size', v: (r) => r.n, right: true }]);
  assert.equal(t, 'NAME        SIZE\nx        1.0 MiB\nlonger  10.0 MiB\n');
});

test('carryon admin: the console\'s actions from the command line, readable tables, --json unchanged', async () => {
  const image = makeImage(broker.dir, 4, 'cli.raw');
  assert.match(await cli('desktops', 'create', 'win11', image, '--quiet'), /desktop win11 .*chunks stored/);
  assert.match(await fails('desktops', 'create', 'rel', 'images/x.raw'), /relative path.*broker host/);
  assert.match(await cli('desktops', 'upload', 'uploaded', image, '--quiet'), /desktop uploaded .*chunks stored/);
  await cli('desktops', 'clone', 'win11', 'golden2');
  await cli('pools', 'add', 'lab');
  const list = await cli('desktops', 'list');
  assert.match(list, /^NAME\s+POOL\s+STATE\s+DISK\s+VCPUS\s+RAM\s+LEASE\s+CREATED$/m);
  assert.match(list, /^win11\s+available\s+4\.0 MiB\s+2\s+2048 MiB\s+(just now|\d+ s ago)$/m);
  assert.doesNotMatch(list, /[{}]/, 'no raw JSON');
  const shown = await cli('desktops', 'show', 'win11');
  assert.match(shown, /^state:\s+available$/m);
  assert.match(shown, /^maxLeaseHours\s+168\s+default$/m);
  assert.doesNotMatch(shown, /[{}]/);
  assert.deepEqual(Object.keys(JSON.parse(await cli('--json', 'desktops', 'show', 'win11')) as object).sort(), ['checkout', 'config', 'createdAt', 'currentSnapshot', 'id', 'lineageId', 'name', 'policy', 'poolId', 'powerState', 'snapshots'].sort());

  // Users: add, disable, re-enable, reset the password (the new one logs in), groups, entitlements by name.
  await cli('users', 'add', 'frank');
  await cli('users', 'disable', 'frank');
  assert.match(await cli('users', 'list'), /^frank\s+user\s+local\s+disabled/m);
  await cli('users', 'enable', 'frank');
  assert.match(await cli('users', 'list'), /^frank\s+user\s+local\s+active/m);
  await run(process.execPath, [main, 'admin', 'users', 'reset-password', 'frank'], { env: { ...env, NEW_USER_PASSWORD: 'frank-new-password' } });
  await http.login('frank', 'frank-new-password');
  await cli('groups', 'add', 'ops', 'frank');
  assert.match(await cli('groups', 'list'), /^ops\s+frank$/m);
  await cli('groups', 'remove-member', 'ops', 'frank');
  assert.match(await cli('groups', 'list'), /^ops\s+\(empty\)$/m);
  await cli('groups', 'delete', 'ops');
  await cli('entitlements', 'add', 'user', 'frank', 'desktop', 'win11');
  assert.match(await cli('entitlements', 'list'), /^user frank\s+desktop win11\s+[0-9a-f-]{36}$/m);
  await cli('pools', 'delete', 'lab');
  assert.equal((await cli('pools', 'list')).trim(), '(none)');

  // Policies: layers side by side with the winner.
  await cli('policies', 'set', 'desktop', 'win11', 'maxLeaseHours=48');
  await cli('policies', 'set', 'user', 'frank', 'usbAllowed=true');
  const pol = await cli('policies', 'show', '--desktop', 'win11', '--for-user', 'frank');
  assert.match(pol, /^POLICY\s+GLOBAL\s+DESKTOP WIN11\s+USER FRANK\s+EFFECTIVE\s+SOURCE$/m);
  assert.match(pol, /^maxLeaseHours\s+48\s+48\s+desktop win11$/m);
  assert.match(pol, /^usbAllowed\s+true\s+true\s+user frank$/m);
  // `set` changes the keys it names; the layer's other keys stay. `inherit` takes one out; --replace sets the whole layer.
  assert.match(await cli('policies', 'set', 'desktop', 'win11', 'usbAllowed=true'), /^desktop win11 layer now: maxLeaseHours=48 usbAllowed=true$/m);
  // USB lists: comma-separated, IDs in any case as lsusb prints them, empty for none; a bad entry is refused.
  assert.match(await cli('policies', 'set', 'desktop', 'win11', 'usbDeny=0781:*,046D:C31C', 'usbClasses=03', 'usbStorageAllowed=false'), /layer now: maxLeaseHours=48 usbAllowed=true usbClasses=03 usbDeny=0781:\*,046d:c31c usbStorageAllowed=false$/m);
  assert.match(await cli('policies', 'set', 'desktop', 'win11', 'usbDeny='), /usbDeny= /);
  assert.match(await fails('policies', 'set', 'desktop', 'win11', 'usbAllow=logitech'), /usbAllow\.0: a USB device is vendor:product in hex/);
  assert.match(await cli('policies', 'set', 'desktop', 'win11', 'usbDeny=inherit', 'usbClasses=inherit', 'usbStorageAllowed=inherit'), /layer now: maxLeaseHours=48 usbAllowed=true$/m);
  assert.match(await cli('policies', 'set', 'desktop', 'win11', 'usbAllowed=inherit'), /^desktop win11 layer now: maxLeaseHours=48$/m);
  assert.match(await cli('policies', 'set', 'user', 'frank', 'exportAllowed=true'), /layer now: usbAllowed=true exportAllowed=true$/m);
  assert.match(await cli('policies', 'set', 'user', 'frank', '--replace', 'usbAllowed=true'), /layer now: usbAllowed=true$/m);
  assert.match(await fails('policies', 'set', 'user', 'frank', 'nonsense=inherit'), /unknown name nonsense/);

  // Restore points: list and restore a chosen one.
  const rps = JSON.parse(await cli('--json', 'desktops', 'restore-points', 'win11')) as { restorePoints: { id: string; kind: string }[] };
  assert.match(await cli('desktops', 'restore', 'win11', rps.restorePoints[0]!.id, '--reason', 'cli test'), /win11 restored from/);
  assert.match(await cli('desktops', 'restore-points', 'win11'), /^[0-9a-f-]{36}\s+restore\s+(just now|\d+ s ago)\s+4\.0 MiB\s+yes$/m);

  // Check-outs, transfers, devices, commands: tables even when empty.
  assert.equal((await cli('checkouts', 'list')).trim(), '(none)');
  assert.match(await cli('transfers'), /^embedded\S*\s+https:\/\/127\.0\.0\.1:\d+\s+0\/4\s+alive/m);
  assert.equal((await cli('devices', 'list')).trim(), '(none)');
  assert.match(await fails('checkouts', 'force-unlock', 'win11'), /no checkout/);

  // Audit: newest first, filtered, CSV export.
  const events = await cli('events', '--limit', '3');
  const rows = events.trim().split('\n').slice(1);
  assert.match(rows[0]!, /\broot\s+login\s+ok$/, 'the newest event is this command\'s own login');
  const json = JSON.parse(await cli('--json', 'events', '--limit', '5')) as { id: number }[];
  assert.ok(json[0]!.id > json[1]!.id, 'newest first');
  const csv = await cli('events', '--csv', '--action', 'restore');
  assert.match(csv, /^id,time,actor,desktopId,action,outcome,detail\n.*"restore","ok",".*cli test"\n$/s);
  assert.match(await cli('events', '--search', 'pool-delete'), /pool-delete\s+ok/);
});
