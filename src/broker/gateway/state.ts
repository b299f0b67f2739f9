import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { gatewayBackends, renderHaproxyConfig, serverSetHash, type GatewayConfigOptions } from './haproxy.js';
import { brokerName, gatewayUrl, type GatewayRoute } from './routes.js';

export interface GatewayStatus {
  url: string;
  domain: string;
  /** Every server behind the gateway and the SNI names routed to it. */
  routes: { id: string; kind: 'broker' | 'transfer'; names: string[]; address: string }[];
  serverSetHash: string;
  configMadeAt: string | null;
  /** False: servers changed since the config was made (or none was made): regenerate and reload haproxy. */
  upToDate: boolean;
}


async function current(ctx: BrokerContext) {
  const g = ctx.settings.gateway;
  if (!g) return null;
  const backends = gatewayBackends(g, ctx.self.url, await ctx.scheduler.registeredServers());
  return { g, backends, hash: serverSetHash(g, backends) };
}

/** Null without a gateway. */
export async function gatewayStatus(ctx: BrokerContext): Promise<GatewayStatus | null> {
  const c = await current(ctx);
  if (!c) return null;
  const made = await ctx.scheduler.gatewayConfig();
  return {
    url: gatewayUrl(c.g), domain: c.g.domain, routes: c.backends.map((b) => ({ id: b.id, kind: b.kind, names: b.names, address: b.address })),
    serverSetHash: c.hash, configMadeAt: made?.madeAt ?? null, upToDate: made?.hash === c.hash,
  };
}

/** Writes haproxy's config for the servers registered now, and records that it was made for them. */
export async function makeGatewayConfig(ctx: BrokerContext, opts: GatewayConfigOptions): Promise<{ config: string; status: GatewayStatus }> {
  const c = await current(ctx);
  if (!c) throw new HttpError(409, 'no-gateway', 'this broker has no gateway: start it with --gateway HOST:PORT --gateway-domain NAME');
  const config = renderHaproxyConfig(c.g, c.backends, c.hash, opts);
  await ctx.scheduler.gatewayConfigMade(c.hash);
  return { config, status: (await gatewayStatus(ctx))! };
}

/** The broker's own route through the gateway (enrolment answer: a laptop enrolled inside can reach it from outside). */
export function brokerRoute(ctx: BrokerContext): GatewayRoute | null {
  const g = ctx.settings.gateway;
  return g ? { url: gatewayUrl(g), servername: brokerName(g), fingerprint: ctx.self.fingerprint } : null;
}
