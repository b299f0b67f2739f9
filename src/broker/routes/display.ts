import { createHash, randomBytes } from 'node:crypto';
import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { DesktopRow } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';
import { CLOSE, displayRelay } from '../display/relay.js';
import { HttpError, parse, requireUser } from '../http.js';
import { markScope } from './scopes.js';
import { userOf } from './user/user-scope.js';
import { entitledDesktop } from './user/desktop-scope.js';
import { readToken } from '../auth/tokens.js';
import { adminOf } from './admin/admin-scope.js';
import { checkHostCredential } from './hosts.js';

/** A ticket opens one connection, within this time, for its user and desktop. */
export const TICKET_TTL_MS = 30_000;
const HOST_WAIT_MS = 25_000;
const Id = z.string().min(1).max(200);
const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

/** Audits a refused display opening and makes its error. */
async function refuse(ctx: BrokerContext, actor: string, desktopId: string | null, status: number, code: string, message: string): Promise<HttpError> {
  await ctx.audit({ actor, desktopId, action: 'display-open', outcome: 'denied', detail: `${code}: ${message}` });
  return new HttpError(status, code, message, {}, true);
}

/** The user may see this desktop's screen now: entitled, and it runs on a host. */
async function openable(ctx: BrokerContext, user: string, idOrName: string): Promise<{ desktop: DesktopRow; hostId: string }> {
  const desktop = await ctx.meta.getDesktop(idOrName);
  if (!desktop || !(await ctx.meta.isEntitled(user, desktop))) throw await refuse(ctx, user, desktop?.id ?? null, 403, 'not-entitled', `you are not entitled to a desktop named ${idOrName}`);
  return { desktop, hostId: await runningOn(ctx, user, desktop) };
}

/** The host the desktop runs on; refused (audited) when it runs nowhere. */
async function runningOn(ctx: BrokerContext, user: string, desktop: DesktopRow): Promise<string> {
  const p = await ctx.hosts.placement(desktop.id);
  if (!p || p.state !== 'running') throw await refuse(ctx, user, desktop.id, 409, 'not-running', `${desktop.name} is not running on a desktop host${p ? ` (it is ${p.state})` : ''}: start it first (\`carryon start ${desktop.name}\`)`);
  return p.hostId;
}

/**
 * A desktop's screen in the browser (issue 26 item 3), in three plugins by who calls: the user's
 * one-time tickets (desktop scope: the user is entitled), the browser's WebSocket (open: its proof is a ticket or a
 * session, checked on every connection before the host hears of it), and the host's long poll
 * and dial-back (its secret checked by the plugin's hook). The admins' view of open sessions is
 * `displayAdminRoutes`.
 */
export const displayTicketRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.post('/v1/desktops/:id/display-ticket', async (req) => {
    const claims = userOf(req);
    const desktop = entitledDesktop(req);
    parse(z.object({}).strict(), req.body ?? {});
    await runningOn(ctx, claims.sub, desktop);
    const ticket = randomBytes(32).toString('base64url');
    const expiresAt = new Date(Date.now() + TICKET_TTL_MS).toISOString();
    await ctx.hosts.pruneDisplayTickets(new Date(Date.now() - 3600_000));
    await ctx.hosts.addDisplayTicket({ hash: sha256(ticket), user: claims.sub, desktopId: desktop.id, expiresAt });
    await ctx.audit({ actor: claims.sub, desktopId: desktop.id, action: 'display-ticket', outcome: 'ok', detail: `valid until ${expiresAt}, one connection` });
    const q = `ticket=${encodeURIComponent(ticket)}`;
    // The fragment (the console's page and the ticket) never reaches a server log.
    return { desktop: desktop.name, desktopId: desktop.id, expiresAt, url: `https://${req.headers.host}/#/display/${encodeURIComponent(desktop.id)}?${q}`, socket: `/v1/desktops/${encodeURIComponent(desktop.id)}/display?${q}` };
  });
};

export const displayBrowserRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'open');
  const relay = displayRelay(ctx);
  /** Who opens the display: a one-time ticket (consumed here, whatever follows) or the session's bearer token. */
  const authorizeBrowser = async (req: FastifyRequest): Promise<{ user: string; via: 'session' | 'ticket' }> => {
    const { id } = parse(z.object({ id: Id }), req.params);
    const { ticket } = parse(z.object({ ticket: z.string().max(200).optional() }), req.query);
    const auth = req.headers.authorization ?? '';
    const bearer = auth.startsWith('Bearer ') ? readToken(ctx.secrets.tokenKey, auth.slice(7))?.sub ?? null : null;
    if (ticket === undefined) return { user: (await requireUser(ctx, req)).sub, via: 'session' };
    const hash = sha256(ticket);
    const t = await ctx.hosts.consumeDisplayTicket(hash);
    const actor = bearer ?? `anonymous@${req.ip}`;
    if (!t) throw await refuse(ctx, actor, null, 403, (await ctx.hosts.displayTicketKnown(hash)) ? 'ticket-used' : 'ticket-invalid', (await ctx.hosts.displayTicketKnown(hash)) ? 'this display ticket was used already: ask for a new one (`carryon open`)' : 'no such display ticket');
    if (Date.parse(t.expiresAt) < Date.now()) throw await refuse(ctx, actor, t.desktopId, 403, 'ticket-expired', `this display ticket expired at ${t.expiresAt}: ask for a new one (\`carryon open\`)`);
    const desktop = await ctx.meta.getDesktop(id);
    if (desktop?.id !== t.desktopId) throw await refuse(ctx, actor, t.desktopId, 403, 'ticket-other-desktop', `this display ticket is for another desktop than ${id}`);
    if (bearer && bearer !== t.user) throw await refuse(ctx, actor, t.desktopId, 403, 'ticket-other-user', `this display ticket is ${t.user}'s, not yours`);
    const user = await ctx.meta.getUser(t.user);
    if (!user || user.disabled) throw await refuse(ctx, t.user, t.desktopId, 401, 'unauthenticated', 'the ticket\'s user is disabled or no longer exists');
    return { user: t.user, via: 'ticket' };
  };

  app.route({
    method: 'GET',
    url: '/v1/desktops/:id/display',
    // Every check before the upgrade: a refused browser gets an HTTP status and the host hears nothing.
    preValidation: async (req) => {
      const who = await authorizeBrowser(req);
      const { desktop, hostId } = await openable(ctx, who.user, (req.params as { id: string }).id);
      req.display = { ...who, desktopId: desktop.id, desktopName: desktop.name, hostId };
    },
    handler: async (_req, reply) => reply.status(426).send({ error: 'upgrade-required', message: 'this is a WebSocket' }),
    wsHandler: (socket, req) => {
      void relay.open(socket, req.display!).catch((err: Error) => socket.close(1011, `the broker could not open the display: ${err.message}`.slice(0, 120)));
    },
  });
};

/** The host's side: its long poll, and its dial-back for one session (the host's own credential, checked by this plugin's hook). */
export const displayHostRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'machine');
  const relay = displayRelay(ctx);
  app.addHook('onRequest', async (req) => checkHostCredential(ctx, req, req.routeOptions.config.hostAction ?? 'host-request'));
  const hostOf = async (req: FastifyRequest) => {
    const { id } = parse(z.object({ id: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/) }).passthrough(), req.params);
    const host = await ctx.hosts.host(id);
    if (!host) throw new HttpError(404, 'not-registered', `host ${id} is not registered: register first`);
    return host;
  };
  // The host's long poll: its pending commands that it does not hold yet (`known`), as soon as there is one; else after a while, none.
  app.post('/v1/hosts/:id/commands/wait', { config: { hostAction: 'host-wait' } }, async (req) => {
    const host = await hostOf(req);
    const b = parse(z.object({ known: z.array(z.string().max(200)).max(1000).default([]), waitMs: z.number().int().min(0).max(HOST_WAIT_MS).default(HOST_WAIT_MS) }).strict(), req.body ?? {});
    const known = new Set(b.known);
    const gone = new AbortController();
    req.raw.once('close', () => gone.abort());
    const woken = relay.waiter(host.id, b.waitMs, gone.signal);
    const fresh = async () => (await relay.commandsFor(host.id, await ctx.hosts.pending(host.id))).filter((c) => !known.has(c.id));
    let commands = await fresh();
    if (!commands.length) {
      await woken;
      // Revoked while it waited (the revocation wakes it): told nothing more, not even a display token.
      if ((await ctx.hosts.keyHash(host.id)) !== req.hostKeyHash) throw new HttpError(401, 'bad-secret', 'host credential refused: revoked', {}, true);
      commands = gone.signal.aborted ? [] : await fresh();
    }
    gone.abort(); // ends the waiter when it was not needed
    return { commands };
  });
  app.route({
    method: 'GET',
    url: '/v1/hosts/:id/display/:session',
    config: { hostAction: 'host-display' },
    preValidation: async (req) => {
      const host = await hostOf(req);
      const { session } = parse(z.object({ session: Id }).passthrough(), req.params);
      try {
        relay.claim(session, host.id, String(req.headers['x-carryon-display-token'] ?? ''));
      } catch (err) {
        await ctx.audit({ actor: `host:${host.id}`, action: 'host-display', outcome: 'denied', detail: `session ${session}: ${(err as Error).message}` });
        throw Object.assign(err as HttpError, { audited: true });
      }
      req.displaySession = session;
    },
    handler: async (_req, reply) => reply.status(426).send({ error: 'upgrade-required', message: 'this is a WebSocket' }),
    wsHandler: (socket, req) => relay.attach(req.displaySession!, socket),
  });
};

/** Admins: the open display sessions of this broker, and ending one (both sockets close; audited). */
export const displayAdminRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const relay = displayRelay(ctx);
  app.get('/v1/admin/displays', async () => ({ displays: relay.list() }));
  app.delete('/v1/admin/displays/:id', async (req) => {
    const admin = adminOf(req);
    const { id } = parse(z.object({ id: Id }), req.params);
    if (!(await relay.end(id, CLOSE.ended, `ended by administrator ${admin}`, `admin:${admin}`))) throw new HttpError(404, 'not-found', `no open display session ${id}`);
    return { ended: id };
  });
};

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by the display route's checks, for its WebSocket handler. */
    display?: { user: string; via: 'session' | 'ticket'; desktopId: string; desktopName: string; hostId: string };
    displaySession?: string;
  }
}
