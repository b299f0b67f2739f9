// Facts about hosts and their placements that power, handover and fail-over all read.
import type { HostRow, PlacementRow } from './store.js';

/** Healthy and heard from within three of its heartbeats. */
export const alive = (h: HostRow) => h.health === 'ok' && Date.now() - Date.parse(h.lastSeen) <= 3 * h.heartbeatSec * 1000;

/** A transfer job of a host's start: the scheduler's `checkoutId` names the host and the desktop (no checkout row). */
export const hostJobOwner = (hostId: string, desktopId: string) => `host:${hostId}:${desktopId}`;

/** What an admin is told about a desktop whose host went silent. */
export const lostMessage = (p: PlacementRow, name: string) => `the desktop was running on host ${p.hostId}, which stopped answering (${p.updatedAt}); what the guest wrote there is at risk: an administrator decides (\`carryon admin hosts failover ${name}\` starts it elsewhere from its last snapshot; \`carryon admin hosts release ${name}\` discards it)`;
