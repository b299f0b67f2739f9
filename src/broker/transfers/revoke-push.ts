import type { KeyObject } from 'node:crypto';
import { request } from 'undici';
import { signRevocation } from '../../core/tokens/revocation.js';
import { pinnedAgent } from '../../net/pinned-agent.js';

export interface PushTarget {
  id: string;
  url: string;
  fingerprint: string;
}

/**
 * Tells each transfer server at once which jobs ended (`POST /v1/revoke`, signed for that server,
 * over its pinned certificate), so a cancelled check-out's ticket stops now rather than at the
 * server's next heartbeat. A server that does not answer within `timeoutMs` learns it at that
 * heartbeat (the list it gets there is the same). Never throws.
 */
export async function pushRevocations(targets: readonly PushTarget[], jobIds: readonly string[], signingKey: KeyObject, timeoutMs = 2000): Promise<{ reached: string[]; missed: string[] }> {
  const reached: string[] = [];
  const missed: string[] = [];
  await Promise.all(targets.map(async (t) => {
    const agent = pinnedAgent(t.fingerprint, { connections: 1, connectTimeoutMs: timeoutMs });
    try {
      const revocation = signRevocation({ v: 1, kind: 'revoke', serverId: t.id, jobIds: [...jobIds], issuedAt: new Date().toISOString() }, signingKey);
      const res = await request(`${t.url}/v1/revoke`, {
        method: 'POST', dispatcher: agent, headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
        headers: { 'content-type': 'application/json' }, body: JSON.stringify({ revocation }),
      });
      await res.body.dump();
      (res.statusCode === 200 ? reached : missed).push(t.id);
    } catch {
      missed.push(t.id);
    } finally {
      await agent.close().catch(() => undefined);
    }
  }));
  return { reached, missed };
}
