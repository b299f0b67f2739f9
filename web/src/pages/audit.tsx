import { useState } from 'preact/hooks';
import { download, get } from '../api';
import { ago, when } from '../format';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Section, Status } from '../ui';

interface Event { id: number; time: string; actor: string; desktopId: string | null; action: string; outcome: string; detail: string | null }

/** The audit trail, newest first, filtered, exported as CSV or JSON. */
export function AuditPage() {
  const [text, setText] = useState('');
  const [outcome, setOutcome] = useState('');
  const [limit, setLimit] = useState(100);
  const q = new URLSearchParams({ limit: String(limit), ...(text ? { q: text } : {}), ...(outcome ? { outcome } : {}) }).toString();
  const events = usePoll(() => get<{ events: Event[] }>(`/v1/admin/audit?${q}`), 2000, [q]);
  const act = useAction();
  const list = events.data?.events ?? [];
  const stamp = new Date().toISOString().slice(0, 19).replace(/:/g, '');
  return (
    <Section title="Audit trail (newest first)">
      <form class="inline" aria-label="Filter the audit trail" onSubmit={(e) => e.preventDefault()}>
        <Field label="Search"><input type="search" value={text} onInput={(e) => setText(e.currentTarget.value)} placeholder="user, action, detail…" /></Field>
        <Field label="Outcome">
          <select value={outcome} onChange={(e) => setOutcome(e.currentTarget.value)}>
            <option value="">(any)</option><option>ok</option><option>denied</option><option>failed</option><option>info</option>
          </select>
        </Field>
        <button type="button" class="secondary" onClick={() => void act.run(() => download(`/v1/admin/audit?${q.replace(/limit=\d+/, 'limit=100000')}&format=csv`, `carryon-audit-${stamp}.csv`))}>Export CSV</button>
        <button type="button" class="secondary" onClick={() => void act.run(() => download(`/v1/admin/audit?${q.replace(/limit=\d+/, 'limit=100000')}`, `carryon-audit-${stamp}.json`))}>Export JSON</button>
      </form>
      <Status error={act.error ?? events.error} />
      <table aria-label="Audit events">
        <thead><tr><th>When</th><th>Actor</th><th>Action</th><th>Outcome</th><th>Detail</th></tr></thead>
        <tbody>
          {events.data && list.length === 0 && <Empty cols={5} text="no matching events" />}
          {list.map((e) => (
            <tr key={e.id}>
              <td title={when(e.time)}>{ago(e.time)}</td><td>{e.actor}</td><td>{e.action}</td>
              <td><Badge kind={e.outcome === 'ok' ? 'ok' : e.outcome === 'info' ? '' : 'bad'}>{e.outcome}</Badge></td>
              <td>{e.detail ?? ''}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {list.length >= limit && <button type="button" class="secondary" onClick={() => setLimit(limit * 2)}>Show more</button>}
    </Section>
  );
}
