import { PolicyValues, resolvePolicy, type ResolvedPolicy } from '../core/policy.js';
import type { DesktopRow, MetadataStore } from '../store/metadata.js';

/** Loads the four layers for (user, desktop) and resolves them. */
export async function effectivePolicy(meta: MetadataStore, user: string | null, desktop: DesktopRow | null): Promise<ResolvedPolicy> {
  // Not strict: a name no longer in the API (printingAllowed, ssoAllowed) left in a stored layer is ignored.
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
