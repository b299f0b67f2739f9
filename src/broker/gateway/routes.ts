import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import { CarryonError } from '../../core/errors.js';

/**
 * The public gateway (haproxy in TCP mode, TLS passed through, routed by SNI): one address for
 * laptops, and a stable name per server behind it. The broker is `broker.<domain>` (and any
 * ClientHello without a name, or with the gateway's own host name: what a laptop enrolling with
 * the gateway's URL sends); transfer server `<id>` is `<label>.transfer.<domain>`.
 */
export interface GatewaySettings {
  /** What laptops dial: a host name or IP address, and a port. */
  host: string;
  port: number;
  /** The DNS suffix of the SNI names; the names need not resolve (laptops dial host:port). */
  domain: string;
  /** `host:port` the gateway reaches this broker at, where that is not its listen address (0.0.0.0, NAT). */
  brokerBackend?: string;
}

/** A gateway route: where to connect, which name to present, whose certificate to pin. */
export interface GatewayRoute {
  url: string;
  servername: string;
  fingerprint: string;
}

/** What admins are told when servers changed since haproxy's config was made (CLI: no broker code loaded). */
export const OUT_OF_DATE = 'gateway config out of date: run `carryon admin gateway-config --out FILE` and reload haproxy';

const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

function checkDomain(domain: string): string {
  const d = domain.toLowerCase().replace(/\.$/, '');
  const labels = d.split('.');
  // Room for `<63-char label>.transfer.` in front: every name must stay a valid DNS name (≤ 253).
  if (!d || d.length > 253 - 64 - 10 || labels.some((l) => !LABEL.test(l)) || labels.every((l) => /^\d+$/.test(l))) {
    throw new CarryonError('bad-config', `--gateway-domain must be a DNS name such as gw.example.com (letters, digits, hyphens; at most ${253 - 74} characters), got ${JSON.stringify(domain)}`);
  }
  return d;
}

function hostPort(flag: string, address: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]/\s]+)):(\d{1,5})$/.exec(address.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 1 && port <= 65535)) throw new CarryonError('bad-config', `${flag} must be host:port (e.g. gw.example.com:443), got ${JSON.stringify(address)}`);
  const host = (m[1] ?? m[2]!).toLowerCase();
  if (m[1] && isIP(host) !== 6) throw new CarryonError('bad-config', `${flag}: ${host} is not an IPv6 address`);
  if (!m[1] && !isIP(host) && host.split('.').some((l) => !LABEL.test(l))) throw new CarryonError('bad-config', `${flag}: ${JSON.stringify(host)} is neither an IP address nor a host name`);
  return { host, port };
}

/** `host:port` (IPv6 as `[::1]:443`) and a domain, validated: a bad value fails the broker's start. */
export function parseGateway(address: string, domain: string | undefined, brokerBackend?: string): GatewaySettings {
  if (!domain) throw new CarryonError('bad-config', '--gateway needs --gateway-domain (the suffix of the names laptops present to it)');
  const { host, port } = hostPort('--gateway', address);
  const backend = brokerBackend ? hostPort('--gateway-backend', brokerBackend) : null;
  return { host, port, domain: checkDomain(domain), ...(backend ? { brokerBackend: `${isIP(backend.host) === 6 ? `[${backend.host}]` : backend.host}:${backend.port}` } : {}) };
}

export function gatewayUrl(g: GatewaySettings): string {
  return `https://${isIP(g.host) === 6 ? `[${g.host}]` : g.host}:${g.port}`;
}

export function brokerName(g: GatewaySettings): string {
  return `broker.${g.domain}`;
}

/**
 * A transfer server's label: its id where that is already a DNS label, else a digest of it
 * (ids such as `embedded@host:8443` are not); stable, so the name survives restarts.
 */
export function transferLabel(id: string): string {
  return LABEL.test(id) && !id.startsWith('x-') ? id : `x-${createHash('sha256').update(id).digest('hex').slice(0, 20)}`;
}

export function transferName(g: GatewaySettings, id: string): string {
  return `${transferLabel(id)}.transfer.${g.domain}`;
}

/** The route a laptop takes to transfer server `id`, pinned to its own certificate. */
export function transferRoute(g: GatewaySettings, server: { id: string; fingerprint: string }): GatewayRoute {
  return { url: gatewayUrl(g), servername: transferName(g, server.id), fingerprint: server.fingerprint };
}
