import { get } from '../api';
import { bytes, rate } from '../format';
import { usePoll } from '../hooks';
import { Badge, Empty, Progress, Section, Status } from '../ui';
import type { Transfers } from './types';

/** Transfer servers, slots, queue, and each job's user, desktop, progress and rate, live. */
export function TransfersPage() {
  const t = usePoll(() => get<Transfers>('/v1/admin/transfers'), 1000);
  const d = t.data;
  return (
    <>
      <Section title="Transfer servers">
        <table aria-label="Transfer servers">
          <thead><tr><th>Server</th><th>URL</th><th class="num">Slots in use</th><th>State</th><th class="num">Out</th><th class="num">In</th><th class="num">Sent</th><th class="num">Received</th></tr></thead>
          <tbody>
            {d && d.servers.length === 0 && <Empty cols={8} text="no transfer server registered" />}
            {d?.servers.map((s) => (
              <tr key={s.id}>
                <td>{s.id}</td><td>{s.url}</td><td class="num">{`${s.inUse} / ${s.slots}`}</td>
                <td>{s.alive ? <Badge kind="ok">alive</Badge> : <Badge kind="bad">silent</Badge>}</td>
                <td class="num">{rate(s.rateOut)}</td><td class="num">{rate(s.rateIn)}</td><td class="num">{bytes(s.bytesOut)}</td><td class="num">{bytes(s.bytesIn)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </Section>
      <Section title="Jobs">
        <table aria-label="Transfer jobs">
          <thead><tr><th>Kind</th><th>User</th><th>Desktop</th><th>State</th><th>Server</th><th>Progress</th><th class="num">Moved</th><th class="num">Rate</th></tr></thead>
          <tbody>
            {d && d.active.length + d.queued.length === 0 && <Empty cols={8} text="nothing is transferring" />}
            {[...(d?.active ?? []), ...(d?.queued ?? [])].map((j) => (
              <tr key={j.id} data-job={j.desktop ?? ''}>
                <td>{j.kind}</td><td>{j.user}</td><td>{j.desktop}</td>
                <td>{j.state === 'queued' ? `queued #${j.queuePosition ?? '?'}` : j.state}</td>
                <td>{j.serverId}</td>
                <td><Progress percent={j.percent} label={`${j.kind} of ${j.desktop ?? ''}`} /></td>
                <td class="num">{bytes(j.bytesDone)}</td><td class="num">{rate(j.rate)}</td>
              </tr>
            ))}
          </tbody>
        </table>
        <Status error={t.error} />
      </Section>
    </>
  );
}
