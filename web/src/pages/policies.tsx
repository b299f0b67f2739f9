import { useState } from 'preact/hooks';
import { api, enc, get } from '../api';
import { useAction, usePoll } from '../hooks';
import { Field, Section, Status } from '../ui';
import type { AdminDesktop, Pool, Resolved } from './types';

interface User { name: string; role: string; policy: Record<string, unknown> }
type Scope = 'global' | 'pool' | 'desktop' | 'user';

const show = (v: unknown) => (v === undefined ? '' : String(v));

/** The layers side by side (global → pool → desktop → user), the effective value and the layer that won. */
export function PoliciesPage() {
  const desktops = usePoll(() => get<{ desktops: AdminDesktop[] }>('/v1/admin/desktops'), 5000);
  const pools = usePoll(() => get<{ pools: Pool[] }>('/v1/admin/pools'), 5000);
  const users = usePoll(() => get<{ users: User[] }>('/v1/admin/users'), 5000);
  const [desktopId, setDesktop] = useState('');
  const [user, setUser] = useState('');
  const globalLayer = usePoll(() => get<{ policy: Resolved }>('/v1/admin/policies/resolve'), 5000);
  const q = new URLSearchParams({ ...(desktopId ? { desktop: desktopId } : {}), ...(user ? { user } : {}) }).toString();
  const resolved = usePoll(() => get<{ policy: Resolved }>(`/v1/admin/policies/resolve?${q}`), 3000, [q]);
  const d = desktops.data?.desktops.find((x) => x.id === desktopId);
  const pool = d?.poolId ? pools.data?.pools.find((p) => p.id === d.poolId) : undefined;
  const u = users.data?.users.find((x) => x.name === user);
  const layers: { scope: Scope; id: string; title: string; values: Record<string, unknown> }[] = [
    { scope: 'global', id: '-', title: 'Global', values: Object.fromEntries(Object.entries(globalLayer.data?.policy ?? {}).filter(([, v]) => v.source === 'global').map(([k, v]) => [k, v.value])) },
    ...(pool ? [{ scope: 'pool' as const, id: pool.id, title: `Pool ${pool.name}`, values: pool.policy }] : []),
    ...(d ? [{ scope: 'desktop' as const, id: d.id, title: `Desktop ${d.name}`, values: d.policy }] : []),
    ...(u ? [{ scope: 'user' as const, id: u.name, title: `User ${u.name}`, values: u.policy }] : []),
  ];
  const names = Object.keys(resolved.data?.policy ?? {});
  const sourceTitle = (s: string) => {
    const [kind, id] = s.split(':');
    if (kind === 'pool') return `pool ${pools.data?.pools.find((p) => p.id === id)?.name ?? id}`;
    if (kind === 'desktop') return `desktop ${desktops.data?.desktops.find((x) => x.id === id)?.name ?? id}`;
    if (kind === 'user') return `user ${id}`;
    return s;
  };

  const [scope, setScope] = useState<Scope>('desktop');
  const [name, setName] = useState('maxLeaseHours');
  const [value, setValue] = useState('');
  const act = useAction();
  const target = layers.find((l) => l.scope === scope);
  const current = resolved.data?.policy[name]?.value;
  const reloadAll = () => {
    desktops.reload();
    pools.reload();
    users.reload();
    globalLayer.reload();
    resolved.reload();
  };
  return (
    <>
      <Section title="Effective policy">
        <form class="inline" aria-label="Choose desktop and user" onSubmit={(e) => e.preventDefault()}>
          <Field label="Desktop">
            <select value={desktopId} onChange={(e) => setDesktop(e.currentTarget.value)}>
              <option value="">(none)</option>
              {desktops.data?.desktops.map((x) => <option key={x.id} value={x.id}>{x.name}</option>)}
            </select>
          </Field>
          <Field label="User">
            <select value={user} onChange={(e) => setUser(e.currentTarget.value)}>
              <option value="">(none)</option>
              {users.data?.users.map((x) => <option key={x.name} value={x.name}>{x.name}</option>)}
            </select>
          </Field>
        </form>
        <table aria-label="Policy layers">
          <thead>
            <tr>
              <th>Policy</th>
              {layers.map((l) => <th key={l.scope}>{l.title}</th>)}
              <th>Effective</th>
              <th>Winning layer</th>
            </tr>
          </thead>
          <tbody>
            {names.map((n) => {
              const r = resolved.data!.policy[n]!;
              return (
                <tr key={n} data-policy={n}>
                  <th scope="row">{n}</th>
                  {layers.map((l) => <td key={l.scope} class={r.source.split(':')[0] === l.scope ? 'win' : ''}>{show(l.values[n])}</td>)}
                  <td class="effective">{show(r.value)}</td>
                  <td class="source">{sourceTitle(r.source)}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </Section>
      <Section title="Change a layer">
        <form class="inline" aria-label="Change a policy value" onSubmit={(e) => {
          e.preventDefault();
          void act.run(async () => {
            if (!target) throw new Error(`choose a ${scope} above first`);
            const next: Record<string, unknown> = { ...target.values };
            if (value === '') delete next[name];
            else next[name] = value === 'true' ? true : value === 'false' ? false : Number(value);
            await api('PUT', `/v1/admin/policies/${scope}/${enc(target.id)}`, next);
            reloadAll();
            return `${target.title}: ${name} ${value === '' ? 'inherits' : `= ${value}`}`;
          });
        }}>
          <Field label="Layer">
            <select value={scope} onChange={(e) => setScope(e.currentTarget.value as Scope)}>
              {layers.map((l) => <option key={l.scope} value={l.scope}>{l.title}</option>)}
            </select>
          </Field>
          <Field label="Policy">
            <select value={name} onChange={(e) => setName(e.currentTarget.value)}>{names.map((n) => <option key={n}>{n}</option>)}</select>
          </Field>
          <Field label="Value" hint="empty = inherit from the layer below">
            {typeof current === 'boolean' ? (
              <select value={value} onChange={(e) => setValue(e.currentTarget.value)}>
                <option value="">(inherit)</option><option>true</option><option>false</option>
              </select>
            ) : (
              <input value={value} inputMode="decimal" onInput={(e) => setValue(e.currentTarget.value)} />
            )}
          </Field>
          <button type="submit" disabled={act.busy}>Save</button>
        </form>
        <Status error={act.error ?? resolved.error} note={act.note} />
      </Section>
    </>
  );
}
