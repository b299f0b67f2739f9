import { PolicyValues, resolvePolicy, type PolicySource, type ResolvedPolicy } from '../core/policy.js';
import type { DesktopRow, MetadataStore } from './db/metadata.js';

/** Loads the four layers for (user, desktop) and resolves them. */
export async function effectivePolicy(meta: MetadataStore, user: string | null, desktop: DesktopRow | null): Promise<ResolvedPolicy> {
  // Not strict: a name no longer in the API (ssoAllowed) left in a stored layer is ignored.
  const layer = (v: unknown) => PolicyValues.partial().parse(v ?? {});
  const global = layer(JSON.parse((await meta.getSetting('policy.global')) ?? '{}'));
  const pool = desktop?.poolId ? await meta.getPool(desktop.poolId) : null;
  const u = user ? await meta.getUser(user) : null;
  return resolvePolicy({
    global,
    pool: pool ? { id: pool.id, values: layer(pool.policy) } : undefined,
    desktop: desktop ? { id: desktop.id, values: layer(desktop.policy) } : undefined,
    user: u ? { name: u.name, values: layer(u.policy) } : undefined,
  });
}

/**
 * A policy source as people name it, for refusals: `desktop win11`, `pool lab`, `user bob`, `global`
 * (the sources themselves carry IDs, which the API keeps for programs).
 */
export async function describePolicySource(meta: MetadataStore, source: PolicySource): Promise<string> {
  const [kind, id] = source.split(/:(.*)/s) as [string, string | undefined];
  if (kind === 'desktop' && id) return `desktop ${(await meta.getDesktop(id))?.name ?? id}`;
  if (kind === 'pool' && id) return `pool ${(await meta.getPool(id))?.name ?? id}`;
  if (kind === 'user' && id) return `user ${id}`;
  return source === 'default' ? 'the default' : source;
}
