import { execFile } from 'node:child_process';
import { randomBytes, type KeyObject } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, readlink, realpath, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { z } from 'zod';
import { LAUNCHER_ENV_ASSIGNMENTS, NODE_FLAGS } from '../core/runtime/node-flags.js';
import { PACKAGE_VERSION } from '../core/version.js';
import { CarryonError } from '../core/errors.js';
import { compareVersions, MAX_BUNDLE_BYTES, ReleaseSignature, sha256File, verifyRelease, type ReleaseManifest } from '../core/tokens/release.js';
import type { BrokerClient } from '../net/broker-client.js';
import { readOwner } from '../live/fill/holder.js';
import { loadDevice } from './vault/home.js';
import { readReleasePin } from './vault/release-pin.js';
import { Vault } from './vault/vault.js';

/**
 * Client updates (issue 28). A managed install is laid out as
 *   <root>/versions/<version>/package/   one unpacked `npm pack` bundle each
 *   <root>/current -> versions/<version>  what runs: replaced by a rename (atomic)
 *   <root>/bin/carryon                    the launcher: runs current
 *   <root>/downloads/<version>.tgz.part   a bundle being fetched (kept between tries: resumed by Range)
 *   <root>/failed/<version>               a release that failed here: not tried again
 * The agent verifies a bundle against the release key pinned at enrolment, installs it beside the
 * running one, switches, runs the new version's self-check and switches back when it fails.
 */
export const UpdateOffer = z.object({ version: z.string(), size: z.number().int(), sha256: z.string(), signature: ReleaseSignature });
export type UpdateOffer = z.infer<typeof UpdateOffer>;
export type UpdateState = 'downloading' | 'verified' | 'waiting' | 'installed' | 'switched' | 'done' | 'refused' | 'rolled-back' | 'failed';

/** The package directory this code runs from (dist/src/client → the package root). */
export function runningPackageDir(): string {
  return fileURLToPath(new URL('../../../', import.meta.url)).replace(/\/$/, '');
}

/** The install root when this code runs from `<root>/versions/<v>/package`, else null (a checkout, an npm install: not updated here). */
export function installRootOf(packageDir: string): string | null {
  const versionDir = dirname(packageDir);
  return basename(packageDir) === 'package' && basename(dirname(versionDir)) === 'versions' ? dirname(dirname(versionDir)) : null;
}

export interface UpdateContext {
  root: string;
  home: string;
  /** The key pinned at enrolment; null: this device gets no updates (enrolled without one). Throws when its record was altered. */
  pinned: () => Promise<KeyObject | null>;
  running: { version: string; packageDir: string };
  broker: BrokerClient;
  device: { id: string; key: KeyObject };
  log: (l: string) => void;
  /** Self-check time limit (tests shorten it). */
  selfCheckMs?: number;
}

class Refused extends CarryonError {
  constructor(readonly state: 'refused' | 'failed', message: string) {
    super(`update-${state}`, message);
  }
}

/** A desktop some process holds (run, serve, a transfer): named, so the agent waits for it to end. */
export async function busyDesktop(home: string): Promise<string | null> {
  const vault = await Vault.open(home);
  for (const id of await readdir(join(home, 'desktops')).catch(() => [] as string[])) {
    const owner = await readOwner(vault, id).catch(() => null);
    if (owner) return `${id} (\`carryon ${owner.kind}\`, pid ${owner.pid})`;
  }
  return null;
}

/**
 * One try at the offered update; each step is reported to the broker. Returns the state reached:
 * `done` (the new version is current: the agent process should end so its launcher starts it),
 * `waiting` (a desktop runs: tried again at the next heartbeat), or a refusal / rollback.
 */
export async function applyUpdate(u: UpdateContext, offer: UpdateOffer): Promise<UpdateState | 'skipped'> {
  const report = async (state: UpdateState, detail?: string) => {
    u.log(`update ${offer.version}: ${state}${detail ? `: ${detail}` : ''}`);
    try {
      await u.broker.signedPost('/v1/agent/update', { version: offer.version, state, ...(detail ? { detail: detail.slice(0, 2000) } : {}) }, u.device, z.object({ ok: z.boolean() }));
    } catch (err) {
      u.log(`could not report the update's state to the broker: ${(err as Error).message}`);
    }
  };
  if (existsSync(join(u.root, 'failed', offer.version))) return 'skipped';
  try {
    const manifest = await checkOffer(u, offer);
    const bundle = await download(u, manifest, () => report('downloading'));
    await report('verified', `signature, sha256 ${manifest.sha256.slice(0, 12)}… and version checked`);
    const busy = await busyDesktop(u.home);
    if (busy) {
      await report('waiting', `desktop ${busy} is in use; applied when nothing runs`);
      return 'waiting';
    }
    const dir = await unpack(u, manifest, bundle);
    await report('installed', dir);
    const previous = await switchTo(u.root, `versions/${manifest.version}`);
    await report('switched', `current -> versions/${manifest.version} (was ${previous})`);
    try {
      await selfCheck(u, manifest.version);
    } catch (err) {
      await switchTo(u.root, previous);
      await markFailed(u.root, manifest.version, (err as Error).message);
      await rm(dir, { recursive: true, force: true });
      await report('rolled-back', `self-check of ${manifest.version} failed (${(err as Error).message}); back on ${previous}`);
      return 'rolled-back';
    }
    await writeLauncher(u.root);
    await rm(bundle, { force: true });
    await report('done', `${u.running.version} -> ${manifest.version}`);
    return 'done';
  } catch (err) {
    const state = err instanceof Refused ? err.state : 'failed';
    // A refusal is final for this release (it is signed wrongly, older, or needs a full install); a failure (network, disk) is tried again.
    if (state === 'refused') await markFailed(u.root, offer.version, (err as Error).message);
    await report(state, (err as Error).message);
    return state;
  }
}

/** Before a byte is fetched: signed by the pinned key, and strictly newer than what runs. */
async function checkOffer(u: UpdateContext, offer: UpdateOffer): Promise<ReleaseManifest> {
  let pinned: KeyObject | null;
  try {
    pinned = await u.pinned();
  } catch (err) {
    throw new Refused('refused', (err as Error).message);
  }
  if (!pinned) throw new Refused('refused', 'this device pinned no release key at enrolment: enrol it again to receive updates');
  let manifest: ReleaseManifest;
  try {
    manifest = verifyRelease(pinned, offer.signature);
  } catch (err) {
    throw new Refused('refused', `${(err as Error).message} (the key pinned at enrolment)`);
  }
  if (manifest.version !== offer.version || manifest.sha256 !== offer.sha256 || manifest.size !== offer.size) throw new Refused('refused', `the broker's offer (${offer.version}) is not what the signed manifest says (${manifest.version})`);
  if (compareVersions(manifest.version, u.running.version) <= 0) throw new Refused('refused', `${manifest.version} is not newer than the running ${u.running.version}: downgrades are refused`);
  if (manifest.minimumVersion && compareVersions(u.running.version, manifest.minimumVersion) < 0) throw new Refused('refused', `${manifest.version} needs at least ${manifest.minimumVersion} to update from; this device runs ${u.running.version}: it needs a full install`);
  if (manifest.size > MAX_BUNDLE_BYTES) throw new Refused('refused', `the bundle is larger than ${MAX_BUNDLE_BYTES} bytes`);
  return manifest;
}

/** Fetches the bundle, resuming a partial file by Range; returns its path once its size and SHA-256 match the signed manifest. */
async function download(u: UpdateContext, m: ReleaseManifest, started: () => Promise<void>): Promise<string> {
  const dir = join(u.root, 'downloads');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const part = join(dir, `${m.version}.tgz.part`);
  let have = (await stat(part).catch(() => ({ size: 0 }))).size;
  if (have > m.size) {
    await rm(part, { force: true });
    have = 0;
  }
  if (have < m.size) {
    await started();
    if (have > 0) u.log(`update ${m.version}: resuming the download at ${have} of ${m.size} bytes`);
    const res = await u.broker.signedDownload(`/v1/agent/releases/${m.version}/bundle`, u.device, { range: `bytes=${have}-` });
    if (res.status !== 206 && res.status !== 200) {
      const text = await res.body.text();
      throw new CarryonError('update-download', `the broker answered ${res.status} for the bundle: ${text.slice(0, 200)}`);
    }
    // A 200 is the whole file from the start (a broker that ignores Range): start over.
    const append = res.status === 206 && String(res.headers['content-range'] ?? '').startsWith(`bytes ${have}-`);
    await pipeline(res.body, createWriteStream(part, { flags: append ? 'a' : 'w', mode: 0o600 }));
  }
  const got = await sha256File(part);
  if (got.size !== m.size || got.sha256 !== m.sha256) {
    await rm(part, { force: true });
    throw new Refused('failed', `the downloaded bundle (${got.size} bytes, sha256 ${got.sha256.slice(0, 12)}…) is not the one signed; discarded, fetched again next time`);
  }
  return part;
}

const PackageJson = z.object({ name: z.string(), version: z.string(), dependencies: z.record(z.string(), z.string()).default({}) }).loose();

/**
 * Unpacks the bundle into versions/<version>/ (a temporary name first, renamed when whole). Its
 * dependencies are the running version's node_modules, linked, only when it declares exactly the
 * same dependencies: laptops cannot reach npm, so anything else needs a full install.
 */
async function unpack(u: UpdateContext, m: ReleaseManifest, bundle: string): Promise<string> {
  const versions = join(u.root, 'versions');
  const staging = join(versions, `.${m.version}.${randomBytes(4).toString('hex')}`);
  await mkdir(staging, { recursive: true, mode: 0o755 });
  try {
    await new Promise<void>((resolve, reject) => execFile('tar', ['-xzf', bundle, '-C', staging, '--no-same-owner', '--no-same-permissions'], (err, _o, stderr) => (err ? reject(new Refused('refused', `the bundle does not unpack: ${stderr || err.message}`)) : resolve())));
    const pkg = PackageJson.parse(JSON.parse(await readFile(join(staging, 'package', 'package.json'), 'utf8')));
    if (pkg.name !== 'carryon' || pkg.version !== m.version) throw new Refused('refused', `the bundle holds ${pkg.name} ${pkg.version}, not carryon ${m.version} as signed`);
    const mine = PackageJson.parse(JSON.parse(await readFile(join(u.running.packageDir, 'package.json'), 'utf8')));
    if (!isDeepStrictEqual(pkg.dependencies, mine.dependencies)) {
      const changed = [...new Set([...Object.keys(pkg.dependencies), ...Object.keys(mine.dependencies)])].filter((k) => pkg.dependencies[k] !== mine.dependencies[k]);
      throw new Refused('refused', `${m.version} changes its dependencies (${changed.join(', ')}): this release needs a full install (laptops cannot fetch packages)`);
    }
    await symlink(await realpath(join(u.running.packageDir, 'node_modules')), join(staging, 'package', 'node_modules'));
    const dest = join(versions, m.version);
    // A leftover of an earlier try that did not finish (never current: the switch comes after this).
    if ((await currentTarget(u.root)) !== `versions/${m.version}`) await rm(dest, { recursive: true, force: true });
    await rename(staging, dest);
    return dest;
  } catch (err) {
    await rm(staging, { recursive: true, force: true });
    throw err;
  }
}

async function currentTarget(root: string): Promise<string | null> {
  return readlink(join(root, 'current')).catch(() => null);
}

/** Points `current` at `target` by renaming a new link over it (atomic); returns what it pointed at. */
async function switchTo(root: string, target: string): Promise<string> {
  const previous = await currentTarget(root);
  if (previous === null) throw new Refused('failed', `${root}/current is missing: not a managed install`);
  const tmp = join(root, `.current.${randomBytes(4).toString('hex')}`);
  await symlink(target, tmp);
  await rename(tmp, join(root, 'current'));
  return previous;
}

/** The new version, started as the launcher would start it: it must load, state its version and open the home. */
async function selfCheck(u: UpdateContext, version: string): Promise<void> {
  const main = join(u.root, 'current', 'package', 'dist', 'src', 'cli', 'main.js');
  const out = await new Promise<string>((resolve, reject) => {
    execFile(process.execPath, [main, '--home', u.home, '--json', 'self-check'], { timeout: u.selfCheckMs ?? 60_000, env: { ...process.env, CARRYON_HOME: u.home } }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      // The error line of a crash (not its stack), or what `carryon` printed.
      const lines = (stderr || err.message).trim().split('\n');
      const said = lines.find((l) => /^(\w*Error\b|carryon:)/.test(l)) ?? lines[lines.length - 1] ?? '';
      reject(new Error(`exit ${err.code ?? err.signal}: ${said.slice(0, 500)}`));
    });
  });
  let said: { ok?: unknown; version?: unknown };
  try {
    said = JSON.parse(out) as typeof said;
  } catch {
    throw new Error(`self-check printed no JSON: ${out.slice(0, 200)}`);
  }
  if (said.ok !== true || said.version !== version) throw new Error(`self-check says ${JSON.stringify(said).slice(0, 300)}, expected version ${version}`);
}

async function markFailed(root: string, version: string, why: string): Promise<void> {
  await mkdir(join(root, 'failed'), { recursive: true, mode: 0o700 });
  await writeFile(join(root, 'failed', version), `${new Date().toISOString()} ${why}\n`);
}

/** `<root>/bin/carryon`: the command users and the agent's service run; it always runs `current`. */
export async function writeLauncher(root: string): Promise<void> {
  const path = join(root, 'bin', 'carryon');
  await mkdir(dirname(path), { recursive: true });
  // The environment and V8 flags the CLI's own shebang sets (node-flags.ts): this script starts Node itself.
  const node = `env ${LAUNCHER_ENV_ASSIGNMENTS.join(' ')} "\${CARRYON_NODE:-${process.execPath}}" ${NODE_FLAGS.join(' ')}`;
  const text = `#!/bin/sh\n# Carryon launcher: runs the version \`current\` points at (client updates switch it).\nroot="$(dirname "$(dirname "$(readlink -f "$0")")")"\ncli="$root/current/package/dist/src/cli"\n# carryon.cjs starts faster; a version built before it has main.js only.\n[ -f "$cli/carryon.cjs" ] && exec ${node} "$cli/carryon.cjs" "$@"\nexec ${node} "$cli/main.js" "$@"\n`;
  await writeFile(`${path}.tmp`, text, { mode: 0o755 });
  await chmod(`${path}.tmp`, 0o755);
  await rename(`${path}.tmp`, path);
}

/** What `carryon self-check` prints: this version, loaded whole, and the home opened read-only. */
export async function selfCheckReport(home: string): Promise<{ ok: true; version: string; enrolled: boolean; desktops: number }> {
  // The CLI and the laptop's modules are loaded by the CLI that runs this: a broken build fails before here.
  let enrolled = false;
  if (existsSync(join(home, 'device.json'))) {
    const device = await loadDevice(home);
    await readReleasePin(home, { id: device.info.deviceId!, key: device.privateKey });
    enrolled = true;
  }
  const desktops = (await readdir(join(home, 'desktops')).catch(() => [] as string[])).length;
  return { ok: true, version: PACKAGE_VERSION, enrolled, desktops };
}
