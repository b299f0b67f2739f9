import { request } from 'undici';
import { signDeviceRequest } from '../../src/core/tokens/device-auth.js';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { Api } from './harness.js';

export const HOST = { cpus: 8, ramBytes: 16 * 2 ** 30, freeDiskBytes: 100 * 2 ** 30 };

export interface TestDevice {
  id: string;
  /** A device-signed POST (the agent's way in); `replay` resends the exact same headers. */
  post(path: string, body: unknown): Promise<{ status: number; body: Record<string, unknown>; headers: Record<string, string> }>;
  replay(path: string, body: string, headers: Record<string, string>): Promise<{ status: number; body: Record<string, unknown> }>;
}

/** Enrols a fresh device key for the token's user and returns a signer for agent requests. */
export async function enrolDevice(http: Api, url: string, fingerprint: string, token: string, name = 'laptop'): Promise<TestDevice> {
  const key = generateSigningKey();
  const res = await http.call('POST', '/v1/devices', { name, publicKey: publicKeyToBase64(key.publicKey), host: HOST }, token);
  if (res.status !== 201) throw new Error(`enrol: ${JSON.stringify(res.body)}`);
  const id = String(res.body.deviceId);
  const send = async (path: string, text: string, headers: Record<string, string>) => {
    const agent = pinnedAgent(fingerprint);
    try {
      const r = await request(`${url}${path}`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', ...headers }, body: text });
      const raw = await r.body.text();
      return { status: r.statusCode, body: raw ? (JSON.parse(raw) as Record<string, unknown>) : {} };
    } finally {
      await agent.close();
    }
  };
  return {
    id,
    async post(path, body) {
      const text = JSON.stringify(body);
      const headers = signDeviceRequest(key.privateKey, id, 'POST', path, text);
      return { ...(await send(path, text, headers)), headers };
    },
    replay: send,
  };
}

export const HEARTBEAT = { host: { cpus: 4, ramBytes: 2 ** 33, freeDiskBytes: 2 ** 34 }, vaultBytes: 0, desktops: [] };
