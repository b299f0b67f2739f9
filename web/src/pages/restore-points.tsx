import { useState } from 'preact/hooks';
import { api, enc, get } from '../api';
import { bytes, ago, when } from '../format';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Status } from '../ui';
import type { RestorePoints } from './types';

/** Restore points of one desktop, each with a Restore button where the broker allows it. */
export function RestorePointList({ desktopId, name, admin }: { desktopId: string; name: string; admin: boolean }) {
  const rp = usePoll(() => get<RestorePoints>(`/v1/desktops/${enc(desktopId)}/restore-points`), 3000, [desktopId]);
  const act = useAction();
  const [confirming, setConfirming] = useState<string | null>(null);
  const [reason, setReason] = useState('');
  const data = rp.data;
  return (
    <div>
      <h3>Restore points of {name}</h3>
      {data && !data.canRestore && <p class="muted">{data.reason}</p>}
      <table aria-label={`Restore points of ${name}`}>
        <thead>
          <tr><th>Kind</th><th>Created</th><th class="num">Size</th><th>Current</th><th><span class="sr-only">Action</span></th></tr>
        </thead>
        <tbody>
          {data && data.restorePoints.length === 0 && <Empty cols={5} />}
          {data?.restorePoints.map((p) => (
            <tr key={p.id}>
              <td>{p.kind}</td>
              <td title={when(p.createdAt)}>{ago(p.createdAt)}</td>
              <td class="num">{bytes(p.sizeBytes)}</td>
              <td>{p.current ? <Badge kind="ok">current</Badge> : ''}</td>
              <td>
                {!p.current && data.canRestore && confirming !== p.id && (
                  <button type="button" class="secondary" onClick={() => setConfirming(p.id)} aria-label={`Restore ${p.kind} of ${when(p.createdAt)}`}>
                    Restore
                  </button>
                )}
                {confirming === p.id && (
                  <form
                    class="inline"
                    onSubmit={(e) => {
                      e.preventDefault();
                      void act.run(async () => {
                        await api('POST', `/v1/desktops/${enc(desktopId)}/restore`, { snapshotId: p.id, reason: reason || undefined });
                        setConfirming(null);
                        setReason('');
                        rp.reload();
                        return admin ? `${name} now runs the ${p.kind} of ${when(p.createdAt)}` : `your next check-out of ${name} starts from the ${p.kind} of ${when(p.createdAt)}`;
                      });
                    }}
                  >
                    <Field label="Reason (optional)">
                      <input value={reason} onInput={(e) => setReason(e.currentTarget.value)} />
                    </Field>
                    <button type="submit" disabled={act.busy}>Confirm restore</button>
                    <button type="button" class="secondary" onClick={() => setConfirming(null)}>Cancel</button>
                  </form>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <Status error={act.error ?? rp.error} note={act.note} />
    </div>
  );
}
