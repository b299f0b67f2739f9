import { useState } from 'preact/hooks';
import { get } from '../api';
import { left } from '../format';
import { useAction, usePoll } from '../hooks';
import { openDisplay } from './display';
import { Badge, Empty, Section, Status } from '../ui';
import { RestorePointList } from './restore-points';
import type { CheckoutView, PageProps, Resolved } from './types';

interface Entry { id: string; name: string; state: string; checkout?: CheckoutView; actions: string[]; policy: Resolved }

const ACTION_HELP: Record<string, string> = {
  checkout: 'carryon checkout', open: 'Open (here) or carryon open', start: 'carryon start', stop: 'carryon stop', cancel: 'carryon cancel', checkin: 'carryon checkin', replicate: 'carryon replicate', rollback: 'carryon rollback',
};

/** What a user sees: their desktops, state, the actions allowed now, restore points, lease left. */
export function MyDesktopsPage({ session }: PageProps) {
  const mine = usePoll(() => get<{ desktops: Entry[] }>('/v1/desktops'), 2000);
  const [open, setOpen] = useState<string | null>(null);
  const list = mine.data?.desktops ?? [];
  const sel = list.find((d) => d.id === open);
  const act = useAction();
  return (
    <Section title={`Desktops ${session.user.name} may use`}>
      <table aria-label="My desktops">
        <thead><tr><th>Desktop</th><th>State</th><th>Held by</th><th>Lease</th><th>Allowed now</th><th><span class="sr-only">Restore points</span></th></tr></thead>
        <tbody>
          {mine.data && list.length === 0 && <Empty cols={6} text="you are not entitled to any desktop" />}
          {list.map((d) => (
            <tr key={d.id} data-desktop={d.name}>
              <td>{d.name}</td>
              <td><Badge kind={d.state === 'available' ? 'ok' : 'warn'}>{d.state.replace('_', ' ')}</Badge></td>
              <td>{d.checkout ? d.checkout.user : ''}</td>
              <td>{d.checkout ? left(d.checkout.leaseExpiresAt) : `up to ${String(d.policy.maxLeaseHours?.value ?? '?')} h`}</td>
              <td class="actions">{d.actions.length ? d.actions.map((a) => <Badge key={a} kind="ok"><span title={`on your laptop: ${ACTION_HELP[a] ?? a}`}>{a}</span></Badge>) : <span class="muted">none</span>}</td>
              <td>
                {d.actions.includes('open') && <button type="button" aria-label={`Open the screen of ${d.name}`} disabled={act.busy} onClick={() => void act.run(() => openDisplay(d.id))}>Open</button>}{' '}
                <button type="button" class="secondary" aria-expanded={open === d.id} aria-label={`Restore points of ${d.name}`} onClick={() => setOpen(open === d.id ? null : d.id)}>Restore points</button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <Status error={mine.error ?? act.error} />
      <p class="muted">Check-out, check-in, replicate and rollback run on your laptop (<code>carryon checkout &lt;desktop&gt;</code> …).</p>
      {sel && <RestorePointList desktopId={sel.id} name={sel.name} admin={false} />}
    </Section>
  );
}
