import { prepareLayerTemplates } from '../../live/disks/disks.js';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { probeFingerprint } from '../../net/pinned-agent.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { BrokerClient, type BrokerEndpoint } from '../../net/broker-client.js';
import { brokerEndpoints, chooseSecretStorage, createDeviceKeys, DeviceFile, hostFacts, loadDevice, type SecretStorage } from '../vault/home.js';
import { readJsonFile } from '../../files/json-file.js';
import type { ClientEnv } from './session.js';

const BrokerInfo = z.object({ version: z.string(), signingPublicKey: z.string() });

/** `https://a:8443,https://b:8443` and repeated arguments alike: one origin per broker, order kept. */
export function splitList(values: string | readonly string[] | undefined): string[] {
  const all = typeof values === 'string' ? [values] : (values ?? []);
  return all.flatMap((v) => v.split(',')).map((v) => v.trim()).filter(Boolean);
}

function origin(url: string): URL {
  const u = new URL(url);
  if (u.protocol !== 'https:') throw new CarryonError('invalid', `the broker URL must be https:// (${url})`);
  return u;
}

const normalise = (fp: string) => fp.replace(/[^0-9a-fA-F]/g, '').toLowerCase();

/**
 * Pins each broker's certificate: the fingerprint given for it (one per URL, or one for all when
 * the brokers share a certificate) must be what it presents now; without one, `accept` takes
 * what it presents (trust on first use). A broker that cannot be reached now keeps the
 * fingerprint given for it (it may be down for maintenance); without one it cannot be pinned.
 */
export async function pinBrokers(urls: readonly string[], fingerprints: readonly string[], accept: boolean, log: (l: string) => void): Promise<BrokerEndpoint[]> {
  if (urls.length === 0) throw new CarryonError('invalid', 'name at least one broker URL');
  if (fingerprints.length > 1 && fingerprints.length !== urls.length) throw new CarryonError('invalid', `${urls.length} broker URLs but ${fingerprints.length} fingerprints: give one per URL, in the same order (or one for all)`);
  const out: BrokerEndpoint[] = [];
  const unpinned: string[] = [];
  for (const [i, url] of urls.entries()) {
    const u = origin(url);
    const given = fingerprints.length ? normalise(fingerprints[fingerprints.length === 1 ? 0 : i]!) : null;
    let seen: string | null = null;
    try {
      seen = await probeFingerprint(u.hostname, Number(u.port || 443), 5_000);
    } catch (err) {
      if (!given) throw new CarryonError('offline', `cannot reach ${u.origin} to read its certificate (${(err as Error).message}); give its --fingerprint to pin it while it is down`);
      log(`${u.origin} cannot be reached now (${(err as Error).message}); pinned to the fingerprint given for it`);
    }
    if (given && seen && given !== seen) throw new CarryonError('pin-mismatch', `the broker ${u.origin} presents certificate ${seen}, not the expected ${given}`);
    if (!given && !accept) unpinned.push(`${u.origin}: ${seen}`);
    out.push({ url: u.origin, fingerprint: given ?? seen! });
  }
  if (unpinned.length) {
    throw new CarryonError('unpinned', `the broker certificate fingerprint${unpinned.length > 1 ? 's are' : ' is'} ${unpinned.join(', ')}; compare with what the server printed and re-run with --fingerprint ${out.map((e) => e.fingerprint).join(',')}`);
  }
  return out;
}

const EnrolAnswer = z.object({
  deviceId: z.string(),
  /** The broker's route through the public gateway, where it has one. */
  gateway: z.object({ url: z.string(), servername: z.string().min(1).max(253), fingerprint: z.string() }).optional(),
});

/**
 * A laptop enrolled inside the company keeps the broker's gateway route as the last broker of its
 * list: outside, it fails over to it. Only a route to the certificate this laptop pinned is kept
 * (the gateway passes TLS through: the laptop still talks to that broker, end to end).
 */
function gatewayFallback(route: z.infer<typeof EnrolAnswer>['gateway'], brokers: readonly BrokerEndpoint[], answered: string, log: (l: string) => void): BrokerEndpoint[] {
  if (!route || brokers.some((b) => b.url === origin(route.url).origin)) return [];
  if (normalise(route.fingerprint) !== answered) {
    log(`the broker's gateway route ${route.url} names another certificate than the pinned one: not kept`);
    return [];
  }
  log(`outside the company this laptop reaches the broker through the gateway ${route.url} (as ${route.servername})`);
  return [{ url: origin(route.url).origin, fingerprint: answered, servername: route.servername }];
}

/** Every reachable broker of the list must speak for one deployment: the same lease-signing key. */
async function commonSigningKey(brokers: readonly BrokerEndpoint[], log: (l: string) => void): Promise<string | null> {
  let key: string | null = null;
  for (const b of brokers) {
    const one = new BrokerClient(b.url, b.fingerprint);
    try {
      const info = await one.call('GET', '/v1/broker', undefined, BrokerInfo);
      if (key && info.signingPublicKey !== key) throw new CarryonError('pin-mismatch', `${b.url} signs leases with another key than ${brokers[0]!.url}: the brokers of one list must belong to one deployment (shared secrets)`);
      key = info.signingPublicKey;
    } catch (err) {
      if (!(err instanceof CarryonError) || err.code !== 'offline') throw err;
      log(`${b.url}: ${err.message}`);
    } finally {
      await one.close();
    }
  }
  return key;
}

/**
 * The device file with this broker list. The first broker is also in the single-broker fields
 * (what older versions read); a one-broker list is written in that older form alone.
 */
function withBrokers(file: DeviceFile, brokers: readonly BrokerEndpoint[]): DeviceFile {
  const { brokers: _old, ...rest } = file;
  const first = { ...rest, brokerUrl: brokers[0]!.url, fingerprint: brokers[0]!.fingerprint };
  return brokers.length > 1 ? { ...first, brokers: brokers.map((b) => ({ url: b.url, fingerprint: b.fingerprint, ...(b.servername ? { servername: b.servername } : {}) })) } : first;
}

export async function enroll(env: ClientEnv, brokerUrl: string | readonly string[], opts: { fingerprint?: string | readonly string[]; name: string; acceptFingerprint?: boolean; secretStorage?: SecretStorage | 'auto' }) {
  // Progress lines (stderr in the CLI): the whole enrolment takes seconds (password hashing, a TPM, QEMU's key-derivation benchmark).
  env.log('contacting the broker and checking its certificate…');
  const brokers = await pinBrokers(splitList(brokerUrl), splitList(opts.fingerprint), Boolean(opts.acceptFingerprint), env.log);
  const signingPublicKey = await commonSigningKey(brokers, env.log);
  if (!signingPublicKey) throw new CarryonError('offline', `none of the brokers answered: ${brokers.map((b) => b.url).join(', ')}`);
  const broker = new BrokerClient(brokers, '', env.log);
  try {
    const user = env.user ?? (() => { throw new CarryonError('invalid', 'enrolment needs --user'); })();
    env.log(`logging in as ${user}…`);
    await broker.login(user, await env.password());
    const storage = chooseSecretStorage(opts.secretStorage ?? 'auto');
    env.log(storage === 'tpm' ? 'creating the device key and secret, sealed by the TPM…' : 'creating the device key and secret…');
    const { publicKeyB64, secretStorage } = await createDeviceKeys(env.home, storage, await env.password());
    env.log('registering this device with the broker…');
    const host = await hostFacts(env.home);
    const { deviceId, gateway } = await broker.call('POST', '/v1/devices', { name: opts.name, publicKey: publicKeyB64, host: { os: host.os, cpus: host.cpus, ramBytes: host.ramBytes, freeDiskBytes: host.freeDiskBytes } }, EnrolAnswer);
    brokers.push(...gatewayFallback(gateway, brokers, broker.fingerprint, env.log));
    const file = withBrokers({ deviceId, name: opts.name, brokerUrl: '', fingerprint: brokers[0]!.fingerprint, signingPublicKey, secretStorage }, brokers);
    await writeFileAtomic(join(env.home, 'device.json'), JSON.stringify(file, null, 2));
    // One-time work that would otherwise delay the first check-out (QEMU's PBKDF benchmark).
    env.log('preparing encrypted layer templates (one-time; takes several seconds)…');
    await prepareLayerTemplates(env.home);
    const list = brokers.map((b) => `${b.url} (certificate ${b.fingerprint})`).join(', ');
    env.log(`enrolled device ${deviceId} with ${list}; device secret ${secretStorage === 'tpm' ? 'sealed by this TPM' : 'in a 0600 file (no TPM found)'}`);
    return { deviceId, fingerprint: brokers[0]!.fingerprint, brokers, host, secretStorage };
  } finally {
    await broker.close();
  }
}

/** The brokers this laptop uses, in order (an older single-broker home lists its one broker). */
export async function listBrokers(home: string): Promise<BrokerEndpoint[]> {
  return brokerEndpoints((await loadDevice(home)).info);
}

/**
 * Adds brokers of the same deployment to an enrolled laptop (no re-enrolment): each is pinned
 * like at enrolment and must present the lease-signing key pinned then.
 */
export async function addBrokers(env: ClientEnv, urls: readonly string[], opts: { fingerprint?: readonly string[]; acceptFingerprint?: boolean }): Promise<BrokerEndpoint[]> {
  const file = await deviceFile(env.home);
  const current = brokerEndpoints(file);
  const added = (await pinBrokers(urls, opts.fingerprint ?? [], Boolean(opts.acceptFingerprint), env.log)).filter((b) => !current.some((c) => c.url === b.url));
  if (added.length === 0) return current;
  // One that is down now is checked when it first answers: every check-out compares the key it states.
  const key = await commonSigningKey(added, env.log);
  if (key !== null && key !== file.signingPublicKey) throw new CarryonError('pin-mismatch', 'the added broker signs leases with another key than the one pinned at enrolment: it belongs to another deployment');
  const next = [...current, ...added];
  await writeFileAtomic(join(env.home, 'device.json'), JSON.stringify(withBrokers(file, next), null, 2));
  return next;
}

/** Removes brokers from the list (the last one stays: a laptop needs a broker). */
export async function removeBrokers(home: string, urls: readonly string[]): Promise<BrokerEndpoint[]> {
  const file = await deviceFile(home);
  const drop = new Set(urls.map((u) => origin(u).origin));
  const next = brokerEndpoints(file).filter((b) => !drop.has(b.url));
  if (next.length === 0) throw new CarryonError('invalid', 'that would leave no broker: add the new one first');
  await writeFileAtomic(join(home, 'device.json'), JSON.stringify(withBrokers(file, next), null, 2));
  return next;
}

async function deviceFile(home: string): Promise<DeviceFile> {
  const file = await readJsonFile(join(home, 'device.json'), DeviceFile, { missing: null });
  if (!file || !file.deviceId) throw new CarryonError('not-enrolled', `no enrolled device in ${home}: run \`carryon enroll <broker-url>\` first`);
  return file;
}
