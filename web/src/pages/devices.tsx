import { useState } from 'preact/hooks';
import { api, ApiError, enc, get } from '../api';
import { ago, bytes, when } from '../format';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Section, Status } from '../ui';
import type { AdminDesktop } from './types';

interface Heartbeat { host?: { cpus?: number; ramBytes?: number; freeDiskBytes?: number; loadAvg?: number[]; os?: string }; vaultBytes?: number; desktops?: { desktopId: string; state: string; percentLocal?: number; dirtyBytes?: number }[] }
interface Device { id: string; user: string; name: string; host: Record<string, unknown>; enrolledAt: string; lastSeen: string | null; revoked?: boolean; revokedAt?: string | null; latest: { time: string; stats: Heartbeat } | null; update?: DeviceUpdate }
/** Client updates (issue 28): what the device runs and the last step of its update. */
interface DeviceUpdate { ring: string; runningVersion: string | null; state: string | null; targetVersion: string | null; detail: string | null }
interface Command { id: string; deviceId: string; desktopId: string | null; type: string; state: string; result: string | null; createdAt: string }

const TYPES = ['lock', 'unlock', 'wipe', 'replicate', 'renew-lease'];

export function DevicesPage() {
  const devices = usePoll(() => get<{ devices: Device[] }>('/v1/admin/devices'), 2000);
  const commands = usePoll(() => get<{ commands: Command[] }>('/v1/admin/commands'), 2000);
  const desktops = usePoll(() => get<{ desktops: AdminDesktop[] }>('/v1/admin/desktops'), 10_000);
  const [device, setDevice] = useState('');
  const [type, setType] = useState('replicate');
  const [desktop, setDesktop] = useState('');
  // Revoke exists only on brokers that have the route: hidden after the first 404 "no route".
  const [canRevoke, setCanRevoke] = useState(true);
  const act = useAction();
  const list = devices.data?.devices ?? [];
  const devName = (id: string) => list.find((d) => d.id === id)?.name ?? id.slice(0, 8);
  const dtName = (id: string | null) => (id ? (desktops.data?.desktops.find((d) => d.id === id)?.name ?? id.slice(0, 8)) : '');
  return (
    <>
      <Section title="Enrolled devices">
        <table aria-label="Devices">
          <thead><tr><th>Device</th><th>User</th><th>Last heartbeat</th><th>Host</th><th class="num">Free disk</th><th class="num">Vault</th><th>Desktops</th><th>Version</th><th><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            {list.length === 0 && <Empty cols={9} text="no device enrolled" />}
            {list.map((d) => {
              const hb = d.latest?.stats;
              const host = hb?.host ?? (d.host as Heartbeat['host']) ?? {};
              return (
                <tr key={d.id}>
                  <td title={d.id}>{d.name} {d.revoked || d.revokedAt ? <Badge kind="bad">revoked</Badge> : null}</td>
                  <td>{d.user}</td>
                  <td title={when(d.latest?.time ?? d.lastSeen)}>{ago(d.latest?.time ?? d.lastSeen)}</td>
                  <td>{`${host.os ?? ''} ${host.cpus ?? '?'} CPU, ${bytes(host.ramBytes)} RAM${host.loadAvg ? `, load ${host.loadAvg[0]?.toFixed(2)}` : ''}`}</td>
                  <td class="num">{bytes(host.freeDiskBytes)}</td>
                  <td class="num">{bytes(hb?.vaultBytes)}</td>
                  <td>{(hb?.desktops ?? []).map((x) => <Badge key={x.desktopId}>{`${dtName(x.desktopId)}: ${x.state}${x.percentLocal !== undefined ? `, ${x.percentLocal}% local` : ''}`}</Badge>)}</td>
                  <td title={d.update?.detail ?? undefined}>{`${d.update?.runningVersion ?? '?'} (${d.update?.ring ?? 'stable'})`}{d.update?.state ? <Badge kind={['refused', 'rolled-back', 'failed'].includes(d.update.state) ? 'bad' : undefined}>{`${d.update.targetVersion ?? ''} ${d.update.state}`}</Badge> : null}</td>
                  <td>
                    {canRevoke && !(d.revoked || d.revokedAt) && (
                      <button type="button" class="danger" aria-label={`Revoke ${d.name}`} onClick={() => confirm(`Revoke device ${d.name}? It can no longer log in or renew leases.`) && void act.run(async () => {
                        try {
                          await api('POST', `/v1/admin/devices/${enc(d.id)}/revoke`, {});
                        } catch (e) {
                          if (e instanceof ApiError && e.status === 404 && /no route/.test(e.message)) {
                            setCanRevoke(false);
                            return 'this broker has no device revocation';
                          }
                          throw e;
                        }
                        devices.reload();
                        return `revoked ${d.name}`;
                      })}>Revoke</button>
                    )}
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </Section>
      <Section title="Remote commands">
        <form class="inline" aria-label="Send a remote command" onSubmit={(e) => { e.preventDefault(); void act.run(async () => { await api('POST', `/v1/admin/devices/${enc(device)}/commands`, { type, desktopId: desktop || undefined }); commands.reload(); return `queued ${type} for ${devName(device)}; the agent picks it up at its next heartbeat`; }); }}>
          <Field label="Device">
            <select value={device} onChange={(e) => setDevice(e.currentTarget.value)} required>
              <option value="">(choose)</option>
              {list.map((d) => <option key={d.id} value={d.id}>{`${d.name} (${d.user})`}</option>)}
            </select>
          </Field>
          <Field label="Command">
            <select value={type} onChange={(e) => setType(e.currentTarget.value)}>{TYPES.map((t) => <option key={t}>{t}</option>)}</select>
          </Field>
          <Field label="Desktop (optional)">
            <select value={desktop} onChange={(e) => setDesktop(e.currentTarget.value)}>
              <option value="">(all)</option>
              {desktops.data?.desktops.map((d) => <option key={d.id} value={d.id}>{d.name}</option>)}
            </select>
          </Field>
          <button type="submit" disabled={act.busy}>Send</button>
        </form>
        <Status error={act.error ?? devices.error} note={act.note} />
        <table aria-label="Commands">
          <thead><tr><th>Sent</th><th>Device</th><th>Command</th><th>Desktop</th><th>Ack</th><th>Result</th></tr></thead>
          <tbody>
            {(commands.data?.commands.length ?? 0) === 0 && <Empty cols={6} />}
            {[...(commands.data?.commands ?? [])].reverse().map((c) => (
              <tr key={c.id}>
                <td title={when(c.createdAt)}>{ago(c.createdAt)}</td><td>{devName(c.deviceId)}</td><td>{c.type}</td><td>{dtName(c.desktopId)}</td>
                <td><Badge kind={c.state === 'done' ? 'ok' : c.state === 'failed' ? 'bad' : 'warn'}>{c.state === 'pending' ? 'waiting for the agent' : c.state}</Badge></td>
                <td>{c.result ?? ''}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </Section>
    </>
  );
}
