import { join } from 'node:path';
import { request } from 'undici';
import { startBroker, type RunningBroker } from '../../src/broker/start.js';
import { enroll, type ClientEnv } from '../../src/client/ops.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';

/** A broker (embedded transfer server) on 127.0.0.1 with one user and one desktop, for benchmarks. */
export class Rig {
  private laptops = 0;
  private constructor(readonly dir: string, readonly broker: RunningBroker) {}

  static async start(dir: string, image: string, chunkSize?: number): Promise<Rig> {
    process.env.CARRYON_SCRYPT_N ??= '16384';
    const broker = await startBroker({ dataDir: join(dir, 'server'), initAdmin: { name: 'admin', password: 'bench-admin-pw' }, settings: { passwordCostN: 16384 } });
    const agent = pinnedAgent(broker.fingerprint);
    const call = async (path: string, body: unknown, token?: string) => {
      const res = await request(`${broker.url}${path}`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body: JSON.stringify(body) });
      const json = (await res.body.json()) as Record<string, unknown>;
      if (res.statusCode >= 400) throw new Error(`${path}: ${JSON.stringify(json)}`);
      return json;
    };
    const token = String((await call('/v1/auth/login', { username: 'admin', password: 'bench-admin-pw' })).token);
    await call('/v1/admin/users', { name: 'bench', password: 'bench-user-pw' }, token);
    await call('/v1/admin/desktops', { name: 'desk', image, chunkSize, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, token);
    await call('/v1/admin/entitlements', { principalType: 'user', principal: 'bench', targetType: 'desktop', target: 'desk' }, token);
    await agent.close();
    return new Rig(dir, broker);
  }

  /** A freshly enrolled laptop with an empty vault. */
  async laptop(): Promise<ClientEnv> {
    const env: ClientEnv = { home: join(this.dir, `laptop-${this.laptops++}`), user: 'bench', password: async () => 'bench-user-pw', log: () => undefined, pollMs: 50 };
    await enroll(env, this.broker.url, { fingerprint: this.broker.fingerprint, name: 'bench-laptop' });
    return env;
  }

  close(): Promise<void> {
    return this.broker.close();
  }
}
