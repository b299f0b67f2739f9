import { useState } from 'preact/hooks';
import { api, enc, get } from '../api';
import { bytes, left, rate } from '../format';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Progress, Section, Status } from '../ui';
import type { AdminDesktop, CheckoutTransfer, CheckoutView } from './types';

/** Who holds which desktop, the transfer in flight, and force-unlock with a reason. */
export function CheckoutsPage() {
  // Each check-out comes with its job's numbers, the same the Transfers page shows.
  const checkouts = usePoll(() => get<{ checkouts: (CheckoutView & { createdAt?: string; transfer?: CheckoutTransfer | null })[] }>('/v1/admin/checkouts'), 1000);
  const desktops = usePoll(() => get<{ desktops: AdminDesktop[] }>('/v1/admin/desktops'), 5000);
  const [unlocking, setUnlocking] = useState<string | null>(null);
  const [reason, setReason] = useState('');
  const act = useAction();
  const name = (id: string) => desktops.data?.desktops.find((d) => d.id === id)?.name ?? id.slice(0, 8);
  const list = checkouts.data?.checkouts ?? [];
  return (
    <Section title="Active check-outs (locks)">
      <table aria-label="Active check-outs">
        <thead><tr><th>Desktop</th><th>User</th><th>Device</th><th>State</th><th>Transfer</th><th class="num">Moved</th><th class="num">Rate</th><th>Lease</th><th><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>
          {list.length === 0 && <Empty cols={9} text={checkouts.data ? 'no desktop is checked out' : 'loading…'} />}
          {list.map((c) => {
            const job = c.transfer ?? null;
            return (
              <tr key={c.id} data-checkout={name(c.desktopId)}>
                <td>{name(c.desktopId)}</td>
                <td>{c.user}</td>
                <td title={c.deviceId}>{c.deviceId.slice(0, 8)}</td>
                <td>{c.failure ? <Badge kind="bad">{`failed: ${c.failure}`}</Badge> : <Badge kind={c.state === 'checked_out' ? 'ok' : 'warn'}>{c.state.replace('_', ' ')}</Badge>}</td>
                <td>{job ? (job.state === 'queued' ? `queued (#${job.queuePosition ?? '?'})` : <Progress percent={job.percent} label={`${job.kind} of ${name(c.desktopId)}`} />) : c.state === 'checked_out' ? 'complete' : ''}</td>
                <td class="num">{job ? bytes(job.bytesDone) : ''}</td>
                <td class="num">{job ? rate(job.rate) : ''}</td>
                <td>{left(c.leaseExpiresAt)}</td>
                <td>
                  {unlocking === c.id ? (
                    <form class="inline" aria-label={`Force-unlock ${name(c.desktopId)}`} onSubmit={(e) => {
                      e.preventDefault();
                      void act.run(async () => {
                        await api('POST', `/v1/admin/checkouts/${enc(c.id)}/force-unlock`, { reason });
                        setUnlocking(null);
                        setReason('');
                        checkouts.reload();
                        return `unlocked ${name(c.desktopId)} (the laptop's changes since its last check-in or replica are not current; its user can hand them back as a restore point with carryon handback)`;
                      });
                    }}>
                      <Field label="Reason (goes to the audit trail)"><input value={reason} onInput={(e) => setReason(e.currentTarget.value)} required minLength={3} /></Field>
                      <button type="submit" class="danger" disabled={act.busy}>Force-unlock</button>
                      <button type="button" class="secondary" onClick={() => setUnlocking(null)}>Cancel</button>
                    </form>
                  ) : (
                    <button type="button" class="secondary" onClick={() => setUnlocking(c.id)} aria-label={`Force-unlock ${name(c.desktopId)}`}>Force-unlock</button>
                  )}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      <Status error={act.error ?? checkouts.error} note={act.note} />
      <p class="muted">Updated every second.</p>
    </Section>
  );
}
