import type { Command } from 'commander';
import { CarryonError } from '../../core/errors.js';
import { AnyObject, endpoint, enc, names, say, withAdmin, type Json } from './admin-shared.js';
import { passwordSource } from '../common.js';
import { printTable } from '../format.js';

interface User { name: string; role: string; source: string; disabled: boolean; policy: Json }
interface Entitlement { id: string; principalType: string; principal: string; targetType: string; target: string }

const newPassword = () => passwordSource({}, 'NEW_USER_PASSWORD', 'New password')();

/** Users, groups and entitlements. */
export function registerDirectoryCommands(admin: Command): void {
  const users = admin.command('users').description('users (local; LDAP users appear after their first login)');
  endpoint(users, { name: 'list', description: 'list users', method: 'GET', path: () => '/v1/admin/users', human: (r) =>
    printTable(r.users as User[], [{ h: 'name', v: (u) => u.name }, { h: 'role', v: (u) => u.role }, { h: 'source', v: (u) => u.source }, { h: 'state', v: (u) => (u.disabled ? 'disabled' : 'active') },
      { h: 'policy', v: (u) => Object.entries(u.policy).map(([k, v]) => `${k}=${String(v)}`).join(' ') }]) });
  users.command('add <name>').description('add a local user (password: NEW_USER_PASSWORD or a prompt)').option('--role <role>', 'admin or user', 'user')
    .action(async (name: string, o: { role: string }, cmd: Command) => {
      const password = await newPassword();
      await withAdmin(cmd, async (b, g) => {
        const r = await b.call('POST', '/v1/admin/users', { name, password, role: o.role }, AnyObject);
        if (g.json) say(JSON.stringify(r, null, 2));
        else say(`added ${o.role} ${name}`);
      });
    });
  users.command('reset-password <name>').description('set a new password for a local user (NEW_USER_PASSWORD or a prompt)')
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const password = await newPassword();
      if (password.length < 8) throw new CarryonError('invalid', 'the new password needs at least 8 characters');
      await withAdmin(cmd, async (b, g) => {
        const r = await b.call('PATCH', `/v1/admin/users/${enc(name)}`, { password }, AnyObject);
        if (g.json) say(JSON.stringify(r, null, 2));
        else say(`password of ${name} reset`);
      });
    });
  endpoint(users, { name: 'disable <name>', description: 'disable a user (logins and API calls refused)', method: 'PATCH', path: ([n]) => `/v1/admin/users/${enc(n!)}`, body: () => ({ disabled: true }), human: (_r, [n]) => say(`${n!} disabled`) });
  endpoint(users, { name: 'enable <name>', description: 're-enable a disabled user', method: 'PATCH', path: ([n]) => `/v1/admin/users/${enc(n!)}`, body: () => ({ disabled: false }), human: (_r, [n]) => say(`${n!} enabled`) });
  endpoint(users, { name: 'role <name> <admin|user>', description: 'change a user\'s role', method: 'PATCH', path: ([n]) => `/v1/admin/users/${enc(n!)}`, body: ([, role]) => ({ role }), human: (_r, [n, role]) => say(`${n!} is now ${role!}`) });
  endpoint(users, { name: 'delete <name>', description: 'delete a user', method: 'DELETE', path: ([n]) => `/v1/admin/users/${enc(n!)}`, human: (_r, [n]) => say(`deleted ${n!}`) });

  const groups = admin.command('groups').description('groups');
  endpoint(groups, { name: 'list', description: 'list groups', method: 'GET', path: () => '/v1/admin/groups', human: (r) =>
    printTable(r.groups as { name: string; members: string[] }[], [{ h: 'group', v: (g) => g.name }, { h: 'members', v: (g) => g.members.join(', ') || '(empty)' }]) });
  endpoint(groups, { name: 'add <name> [members...]', description: 'create a group / add members', method: 'POST', path: () => '/v1/admin/groups', body: ([name, ...members]) => ({ name, members }),
    human: (_r, [name, ...members]) => say(members.length ? `${name!} += ${members.join(', ')}` : `group ${name!}`) });
  endpoint(groups, { name: 'remove-member <group> <user>', description: 'take a user out of a group', method: 'DELETE', path: ([g, u]) => `/v1/admin/groups/${enc(g!)}/members/${enc(u!)}`, human: (_r, [g, u]) => say(`${g!} -= ${u!}`) });
  endpoint(groups, { name: 'delete <group>', description: 'delete a group (and the entitlements granted to it)', method: 'DELETE', path: ([g]) => `/v1/admin/groups/${enc(g!)}`, human: (_r, [g]) => say(`deleted group ${g!}`) });

  const ent = admin.command('entitlements').description('who may use which desktop or pool');
  endpoint(ent, { name: 'list', description: 'list entitlements', method: 'GET', path: () => '/v1/admin/entitlements', human: async (r, _a, b) => {
    const name = await names(b, ['desktops', 'pools']);
    printTable(r.entitlements as Entitlement[], [{ h: 'who', v: (e) => `${e.principalType} ${e.principal}` }, { h: 'may use', v: (e) => `${e.targetType} ${name(e.target)}` }, { h: 'id', v: (e) => e.id }]);
  } });
  endpoint(ent, { name: 'add <user|group> <principal> <desktop|pool> <target>', description: 'entitle a user or group', method: 'POST', path: () => '/v1/admin/entitlements',
    body: ([principalType, principal, targetType, target]) => ({ principalType, principal, targetType, target }), human: (r, [pt, p, tt, t]) => say(`${pt!} ${p!} may use ${tt!} ${t!} (${String(r.id)})`) });
  endpoint(ent, { name: 'remove <id>', description: 'remove an entitlement (ids: `entitlements list`)', method: 'DELETE', path: ([id]) => `/v1/admin/entitlements/${enc(id!)}`, human: () => say('entitlement removed') });
}
