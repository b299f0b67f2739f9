import { execFile } from 'node:child_process';
import { createReadStream, existsSync } from 'node:fs';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Command } from 'commander';
import { request } from 'undici';
import { CarryonError } from '../../core/errors.js';
import { loadReleasePrivateKey, MAX_BUNDLE_BYTES, newReleaseKey, parseSignatureFile, RELEASE_SIGNATURE_HEADER, sha256File, signRelease, VERSION_RE } from '../../core/tokens/release.js';
import { pinnedAgent } from '../../net/pinned-agent.js';
import { passwordSource, printJsonOr } from '../common.js';
import { endpoint, enc, say, withAdmin } from './admin-shared.js';
import { ago, bytes, printTable } from '../format.js';

/** The version a bundle states in its own package.json (what `npm pack` wrote). */
async function bundleVersion(bundle: string): Promise<string> {
  const text = await new Promise<string>((resolve, reject) => execFile('tar', ['-xzOf', bundle, 'package/package.json'], { maxBuffer: 1 << 20 }, (err, out) => (err ? reject(new CarryonError('invalid', `${bundle} is not an \`npm pack\` bundle (no package/package.json): ${err.message.split('\n')[0]}`)) : resolve(out))));
  const pkg = JSON.parse(text) as { name?: unknown; version?: unknown };
  if (pkg.name !== 'carryon') throw new CarryonError('invalid', `${bundle} is a bundle of ${String(pkg.name)}, not carryon`);
  if (typeof pkg.version !== 'string' || !VERSION_RE.test(pkg.version)) throw new CarryonError('invalid', `${bundle} states version ${String(pkg.version)}: releases need MAJOR.MINOR.PATCH`);
  return pkg.version;
}

const passphrase = (o: { passphraseFile?: string }) => passwordSource({ passwordFile: o.passphraseFile }, 'CARRYON_RELEASE_PASSPHRASE', 'Release key passphrase');

/** `carryon admin releases …`: signed client releases, published to the broker and rolled out by ring. */
export function registerReleaseCommands(admin: Command): void {
  const rel = admin.command('releases').description('client releases: a key kept offline signs them; the broker passes them to laptops by ring');

  rel.command('keygen').description('write a new release key pair (offline; keep the private key off the broker): release-key.pem (encrypted, 0600) and release-key.pub')
    .requiredOption('--out <dir>', 'directory to write the two files into')
    .option('--passphrase-file <file>', 'the passphrase that encrypts the private key (else CARRYON_RELEASE_PASSPHRASE or a prompt)')
    .action(async (o: { out: string; passphraseFile?: string }) => {
      const pem = join(o.out, 'release-key.pem');
      const pub = join(o.out, 'release-key.pub');
      if (existsSync(pem) || existsSync(pub)) throw new CarryonError('exists', `${o.out} already holds a release key: a new one would strand every laptop that pinned the old one`);
      const key = newReleaseKey(await passphrase(o)());
      await mkdir(o.out, { recursive: true, mode: 0o700 });
      await writeFile(pem, key.privatePem, { mode: 0o600, flag: 'wx' });
      await writeFile(pub, `${key.publicB64}\n`, { mode: 0o644, flag: 'wx' });
      say(`wrote ${pem} (private, encrypted: keep it offline) and ${pub}\nstart the broker with --release-key ${pub}; laptops pin it when they enrol`);
    });

  rel.command('sign <bundle>').description('sign a bundle (`npm pack` of Carryon) with the release key, offline: writes <bundle>.sig')
    .requiredOption('--key <file>', 'the private release key (release-key.pem)')
    .option('--out <file>', 'where to write the signature (default <bundle>.sig)')
    .option('--minimum-version <v>', 'laptops older than this are not updated by this release (they need a full install)')
    .option('--passphrase-file <file>', 'the key\'s passphrase (else CARRYON_RELEASE_PASSPHRASE or a prompt)')
    .action(async (bundle: string, o: { key: string; out?: string; minimumVersion?: string; passphraseFile?: string }) => {
      const version = await bundleVersion(bundle);
      const { sha256, size } = await sha256File(bundle);
      if (size > MAX_BUNDLE_BYTES) throw new CarryonError('too-large', `${bundle} is ${size} bytes; bundles are at most ${MAX_BUNDLE_BYTES}`);
      if (o.minimumVersion && !VERSION_RE.test(o.minimumVersion)) throw new CarryonError('invalid', `--minimum-version must be MAJOR.MINOR.PATCH, not ${o.minimumVersion}`);
      const key = loadReleasePrivateKey(await readFile(o.key, 'utf8'), await passphrase(o)());
      const sig = signRelease(key, { v: 1, name: 'carryon', version, sha256, size, ...(o.minimumVersion ? { minimumVersion: o.minimumVersion } : {}) });
      const out = o.out ?? `${bundle}.sig`;
      await writeFile(out, `${JSON.stringify(sig)}\n`);
      say(`signed carryon ${version} (${bytes(size)}, sha256 ${sha256}): ${out}`);
    });

  rel.command('publish <bundle>').description('upload a signed bundle to the broker (streamed); the broker checks it against its release public key')
    .requiredOption('--signature <file>', 'the signature file (`releases sign`)')
    .action(async (bundle: string, o: { signature: string }, cmd: Command) => {
      const sigText = await readFile(o.signature, 'utf8');
      const sig = parseSignatureFile(sigText, o.signature);
      const version = (JSON.parse(Buffer.from(sig.manifest, 'base64').toString('utf8')) as { version?: string }).version ?? '';
      const size = (await stat(bundle)).size;
      await withAdmin(cmd, async (b, g) => {
        const agent = pinnedAgent(b.fingerprint);
        try {
          const res = await request(`${b.url}/v1/admin/releases/${enc(version)}`, {
            method: 'PUT', dispatcher: agent, body: createReadStream(bundle),
            headers: { 'content-type': 'application/octet-stream', 'content-length': String(size), authorization: `Bearer ${b.token}`, [RELEASE_SIGNATURE_HEADER]: Buffer.from(JSON.stringify(sig)).toString('base64') },
          });
          const body = (await res.body.json()) as Record<string, unknown>;
          if (res.statusCode >= 400) throw new CarryonError(String(body.error ?? 'publish-failed'), String(body.message ?? `HTTP ${res.statusCode}`));
          printJsonOr(Boolean(g.json), body, () => say(`published carryon ${version} (${bytes(size)}); roll it out with \`carryon admin releases rollout ${version} --ring canary\``));
        } finally {
          await agent.close();
        }
      });
    });

  endpoint(rel, { name: 'rollout <version>', description: 'offer a published release to the canary devices, to every device, or to none (withdraw)', method: 'POST',
    path: ([v]) => `/v1/admin/releases/${enc(v!)}/rollout`, options: [['--ring <ring>', 'canary | all | none']], body: (_a, o) => ({ ring: o.ring ?? 'canary' }),
    human: (r) => say(`${String(r.version)}: rolled out to ${String(r.ring)}; devices update at their next heartbeat (when no desktop runs)`) });

  endpoint(rel, { name: 'list', description: 'published releases, newest first, with their ring and how many devices run each', method: 'GET', path: () => '/v1/admin/releases', human: (r) => {
    if (!r.releaseKey) say('this broker has no release key (`carryon server --release-key FILE`): nothing can be published');
    printTable(r.releases as { version: string; size: number; sha256: string; ring: string; publishedAt: string; publishedBy: string; devicesRunning: number }[], [
      { h: 'version', v: (x) => x.version }, { h: 'ring', v: (x) => x.ring }, { h: 'size', v: (x) => bytes(x.size), right: true }, { h: 'devices', v: (x) => x.devicesRunning, right: true },
      { h: 'published', v: (x) => `${ago(x.publishedAt)} by ${x.publishedBy}` }, { h: 'sha256', v: (x) => x.sha256.slice(0, 16) },
    ]);
  } });
}
