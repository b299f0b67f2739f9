import type { Command } from 'commander';
import { z } from 'zod';
import { BrokerClient } from '../../net/broker-client.js';
import { splitList } from '../../client/session/brokers.js';
import { CarryonError } from '../../core/errors.js';
import { passwordSource, printJsonOr } from '../common.js';

export interface AdminOpts { url?: string; fingerprint?: string; user?: string; passwordFile?: string; json?: boolean }
export type Json = Record<string, unknown>;
export const AnyObject = z.record(z.string(), z.unknown());
export const enc = encodeURIComponent;
export type Method = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

/** Logs in as the admin (flags or CARRYON_URL / CARRYON_FINGERPRINT / CARRYON_USER) and runs `fn`. */
export async function withAdmin<T>(cmd: Command, fn: (b: BrokerClient, o: AdminOpts & { url: string; fingerprint: string }) => Promise<T>): Promise<T> {
  const o = cmd.optsWithGlobals<AdminOpts>();
  const url = o.url ?? process.env.CARRYON_URL;
  const fp = o.fingerprint ?? process.env.CARRYON_FINGERPRINT;
  const user = o.user ?? process.env.CARRYON_USER;
  if (!url || !fp || !user) throw new CarryonError('invalid', 'admin commands need --url, --fingerprint and --user (or CARRYON_URL, CARRYON_FINGERPRINT, CARRYON_USER)');
  // Several brokers of one deployment: comma-separated URLs, and a fingerprint for each (or one for all).
  const urls = splitList(url);
  const fps = splitList(fp);
  if (fps.length !== 1 && fps.length !== urls.length) throw new CarryonError('invalid', `${urls.length} broker URLs but ${fps.length} fingerprints: give one per URL, in the same order (or one for all)`);
  const broker = new BrokerClient(urls.map((u, i) => ({ url: u, fingerprint: fps[fps.length === 1 ? 0 : i]! })), '', (l) => process.stderr.write(`${l}\n`));
  try {
    await broker.login(user, await passwordSource(o)());
    // Uploads and exports talk to the broker that answered the login.
    return await fn(broker, { ...o, url: broker.url, fingerprint: broker.fingerprint });
  } finally {
    await broker.close();
  }
}

export const get = (b: BrokerClient, path: string) => b.call('GET', path, undefined, AnyObject);
export const list = async <T = Json>(b: BrokerClient, path: string, key: string) => ((await get(b, path))[key] ?? []) as T[];

export interface EndpointSpec {
  name: string;
  description: string;
  method: Method;
  path: (args: string[], o: Json) => string;
  body?: (args: string[], o: Json) => unknown;
  options?: [string, string][];
  /** Human output; `--json` prints the broker's answer unchanged. */
  human: (res: Json, args: string[], b: BrokerClient, o: Json) => Promise<void> | void;
}

/** A subcommand that calls one admin endpoint. */
export function endpoint(parent: Command, spec: EndpointSpec): Command {
  const c = parent.command(spec.name).description(spec.description);
  for (const [flags, desc] of spec.options ?? []) c.option(flags, desc);
  c.action(async (...raw: unknown[]) => {
    const cmd = raw[raw.length - 1] as Command;
    const o = cmd.opts<Json>();
    await withAdmin(cmd, async (b, g) => {
      const res = await b.call(spec.method, spec.path(cmd.args, o), spec.body?.(cmd.args, o), AnyObject);
      if (g.json) printJsonOr(true, res, () => undefined);
      else await spec.human(res, cmd.args, b, o);
    });
  });
  return c;
}

export const say = (line: string): void => void process.stdout.write(`${line}\n`);

/** id → name for desktops, pools and devices (tables show names, not IDs). */
export async function names(b: BrokerClient, what: ('desktops' | 'pools' | 'devices')[]): Promise<(id: string | null | undefined) => string> {
  const map = new Map<string, string>();
  for (const w of what) {
    for (const r of await list<{ id: string; name: string }>(b, `/v1/admin/${w}`, w)) map.set(r.id, r.name);
  }
  return (id) => (id ? (map.get(id) ?? id) : '');
}
