import { useState } from 'preact/hooks';
import { api, enc, get } from '../api';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Section, Status } from '../ui';
import type { AdminDesktop, Pool } from './types';

interface User { name: string; role: string; source: string; disabled: boolean }
interface Group { name: string; members: string[] }
interface Entitlement { id: string; principalType: string; principal: string; targetType: string; target: string }

export function DirectoryPage() {
  const users = usePoll(() => get<{ users: User[] }>('/v1/admin/users'), 4000);
  const groups = usePoll(() => get<{ groups: Group[] }>('/v1/admin/groups'), 4000);
  const ents = usePoll(() => get<{ entitlements: Entitlement[] }>('/v1/admin/entitlements'), 4000);
  const desktops = usePoll(() => get<{ desktops: AdminDesktop[] }>('/v1/admin/desktops'), 10_000);
  const pools = usePoll(() => get<{ pools: Pool[] }>('/v1/admin/pools'), 10_000);
  const act = useAction();
  const [nu, setNu] = useState({ name: '', password: '', role: 'user' });
  const [resetFor, setResetFor] = useState<string | null>(null);
  const [newPassword, setNewPassword] = useState('');
  const [ng, setNg] = useState({ name: '', member: '' });
  const [ne, setNe] = useState({ principalType: 'user', principal: '', targetType: 'desktop', target: '' });
  const reload = () => { users.reload(); groups.reload(); ents.reload(); };
  const targetName = (e: Entitlement) => (e.targetType === 'desktop' ? desktops.data?.desktops.find((d) => d.id === e.target)?.name : pools.data?.pools.find((p) => p.id === e.target)?.name) ?? e.target;
  const op = (fn: () => Promise<unknown>, msg: string) => void act.run(async () => { await fn(); reload(); return msg; });
  return (
    <>
      <Status error={act.error} note={act.note} />
      <div class="cols">
        <Section title="Users">
          <table aria-label="Users">
            <thead><tr><th>Name</th><th>Role</th><th>Source</th><th>State</th><th><span class="sr-only">Actions</span></th></tr></thead>
            <tbody>
              {users.data?.users.map((u) => (
                <tr key={u.name}>
                  <td>{u.name}</td><td>{u.role}</td><td>{u.source}</td>
                  <td>{u.disabled ? <Badge kind="bad">disabled</Badge> : <Badge kind="ok">active</Badge>}</td>
                  <td>
                    <button type="button" class="secondary" aria-label={`${u.disabled ? 'Enable' : 'Disable'} ${u.name}`} onClick={() => op(() => api('PATCH', `/v1/admin/users/${enc(u.name)}`, { disabled: !u.disabled }), `${u.name} ${u.disabled ? 'enabled' : 'disabled'}`)}>{u.disabled ? 'Enable' : 'Disable'}</button>{' '}
                    {u.source === 'local' && <button type="button" class="secondary" aria-label={`Reset password of ${u.name}`} onClick={() => setResetFor(u.name)}>Reset password</button>}{' '}
                    <button type="button" class="danger" aria-label={`Delete ${u.name}`} onClick={() => confirm(`Delete user ${u.name}?`) && op(() => api('DELETE', `/v1/admin/users/${enc(u.name)}`), `deleted ${u.name}`)}>Delete</button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
          {resetFor && (
            <form class="inline" aria-label={`New password for ${resetFor}`} onSubmit={(e) => { e.preventDefault(); op(() => api('PATCH', `/v1/admin/users/${enc(resetFor)}`, { password: newPassword }), `password of ${resetFor} reset`); setResetFor(null); setNewPassword(''); }}>
              <Field label={`New password for ${resetFor}`}><input type="password" autoComplete="new-password" minLength={8} value={newPassword} onInput={(e) => setNewPassword(e.currentTarget.value)} required /></Field>
              <button type="submit">Set password</button>
              <button type="button" class="secondary" onClick={() => setResetFor(null)}>Cancel</button>
            </form>
          )}
          <form class="inline" aria-label="Add a user" onSubmit={(e) => { e.preventDefault(); op(() => api('POST', '/v1/admin/users', nu), `added ${nu.name}`); setNu({ name: '', password: '', role: 'user' }); }}>
            <Field label="New user"><input value={nu.name} onInput={(e) => setNu({ ...nu, name: e.currentTarget.value })} required /></Field>
            <Field label="Password"><input type="password" autoComplete="new-password" minLength={8} value={nu.password} onInput={(e) => setNu({ ...nu, password: e.currentTarget.value })} required /></Field>
            <Field label="Role"><select value={nu.role} onChange={(e) => setNu({ ...nu, role: e.currentTarget.value })}><option>user</option><option>admin</option></select></Field>
            <button type="submit">Add user</button>
          </form>
        </Section>
        <Section title="Groups">
          <table aria-label="Groups">
            <thead><tr><th>Group</th><th>Members</th><th><span class="sr-only">Actions</span></th></tr></thead>
            <tbody>
              {(groups.data?.groups.length ?? 0) === 0 && <Empty cols={3} />}
              {groups.data?.groups.map((g) => (
                <tr key={g.name}>
                  <td>{g.name}</td>
                  <td>{g.members.map((m) => (
                    <span key={m} class="badge">{m} <button type="button" class="link" aria-label={`Remove ${m} from ${g.name}`} onClick={() => op(() => api('DELETE', `/v1/admin/groups/${enc(g.name)}/members/${enc(m)}`), `removed ${m} from ${g.name}`)}>Remove</button></span>
                  ))}</td>
                  <td><button type="button" class="danger" aria-label={`Delete group ${g.name}`} onClick={() => op(() => api('DELETE', `/v1/admin/groups/${enc(g.name)}`), `deleted ${g.name}`)}>Delete</button></td>
                </tr>
              ))}
            </tbody>
          </table>
          <form class="inline" aria-label="Add to a group" onSubmit={(e) => { e.preventDefault(); op(() => api('POST', '/v1/admin/groups', { name: ng.name, members: ng.member ? [ng.member] : [] }), `group ${ng.name} updated`); }}>
            <Field label="Group"><input value={ng.name} onInput={(e) => setNg({ ...ng, name: e.currentTarget.value })} required /></Field>
            <Field label="Member (optional)">
              <select value={ng.member} onChange={(e) => setNg({ ...ng, member: e.currentTarget.value })}>
                <option value="">(none)</option>
                {users.data?.users.map((u) => <option key={u.name}>{u.name}</option>)}
              </select>
            </Field>
            <button type="submit">Create / add</button>
          </form>
        </Section>
      </div>
      <Section title="Entitlements">
        <table aria-label="Entitlements">
          <thead><tr><th>Who</th><th>May use</th><th><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            {(ents.data?.entitlements.length ?? 0) === 0 && <Empty cols={3} />}
            {ents.data?.entitlements.map((e) => (
              <tr key={e.id}>
                <td>{`${e.principalType} ${e.principal}`}</td><td>{`${e.targetType} ${targetName(e)}`}</td>
                <td><button type="button" class="secondary" aria-label={`Remove entitlement of ${e.principal} to ${targetName(e)}`} onClick={() => op(() => api('DELETE', `/v1/admin/entitlements/${enc(e.id)}`), 'entitlement removed')}>Remove</button></td>
              </tr>
            ))}
          </tbody>
        </table>
        <form class="inline" aria-label="Add an entitlement" onSubmit={(ev) => { ev.preventDefault(); op(() => api('POST', '/v1/admin/entitlements', ne), `${ne.principal} entitled to ${ne.target}`); }}>
          <Field label="Principal type"><select value={ne.principalType} onChange={(e) => setNe({ ...ne, principalType: e.currentTarget.value })}><option>user</option><option>group</option></select></Field>
          <Field label="Principal"><input value={ne.principal} onInput={(e) => setNe({ ...ne, principal: e.currentTarget.value })} required /></Field>
          <Field label="Target type"><select value={ne.targetType} onChange={(e) => setNe({ ...ne, targetType: e.currentTarget.value, target: '' })}><option>desktop</option><option>pool</option></select></Field>
          <Field label="Target">
            <select value={ne.target} onChange={(e) => setNe({ ...ne, target: e.currentTarget.value })} required>
              <option value="">(choose)</option>
              {(ne.targetType === 'desktop' ? desktops.data?.desktops : pools.data?.pools)?.map((t) => <option key={t.id} value={t.id}>{t.name}</option>)}
            </select>
          </Field>
          <button type="submit">Entitle</button>
        </form>
      </Section>
    </>
  );
}
