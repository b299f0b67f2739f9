import { encodeManifest, decodeManifest } from '../../core/chunks/manifest.js';
import type { DesktopRow } from '../db/metadata.js';
import { lineageKeysFor } from '../desktops/desktops.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { effectivePolicy } from '../policies.js';
import { handoverFailed, handoverLost } from './handover.js';
import { alive, hostJobOwner, lostMessage } from './health.js';
import { ON_HOST, type HostCommandRow, type HostReport, type HostRow, type PlacementRow } from './store.js';

/**
 * Online desktops (issue 26): the broker decides where a desktop runs and what a host does; a
 * host only carries out commands it polls for. Every power operation is refused while the desktop
 * is checked out to a laptop, and a check-out is refused while a host holds the desktop (running,
 * or stopped with what the guest wrote kept there), so neither copy silently overtakes the other.
 */

export type PowerAction = 'on' | 'off' | 'reset' | 'shutdown';


const refuse = async (ctx: BrokerContext, actor: string, desktopId: string, action: string, status: number, code: string, message: string) => {
  await ctx.audit({ actor, desktopId, action, outcome: 'denied', detail: `${code}: ${message}` });
  return new HttpError(status, code, message, {}, true);
};


/** Why no power operation may touch `desktop` now (checked out to a laptop), or null. */
async function checkedOutRefusal(ctx: BrokerContext, desktop: DesktopRow): Promise<string | null> {
  const c = await ctx.meta.activeCheckout(desktop.id);
  return c ? `${desktop.name} is checked out to ${c.user} (device ${c.deviceId}) since ${c.createdAt}; power operations wait for its check-in` : null;
}

/** Hosts silent for three heartbeats are marked lost, and the desktops they ran with them (audited once each). */
export async function sweepHosts(ctx: BrokerContext): Promise<void> {
  for (const h of await ctx.hosts.markLost(new Date())) await desktopsLost(ctx, h, `stopped heartbeating (last seen ${h.lastSeen})`);
}

/** A host lost (silent, or its credential revoked): the desktops it ran are marked lost with it, audited. */
export async function desktopsLost(ctx: BrokerContext, h: HostRow, why: string): Promise<void> {
  const desktops: string[] = [];
  for (const p of await ctx.hosts.placements(h.id)) {
    if (!ON_HOST.includes(p.state) || !(await ctx.hosts.transition(p.desktopId, ON_HOST, 'lost', { detail: `host ${h.id} ${why}` }))) continue;
    await ctx.meta.setPowerState(p.desktopId, 'lost');
    if (p.state === 'returning') await handoverLost(ctx, p.desktopId, h.id);
    await ctx.audit({ actor: 'system', desktopId: p.desktopId, action: 'host-lost', outcome: 'failed', detail: `host ${h.id} ${why} while it ran this desktop; the guest's writes since snapshot ${p.snapshotId ?? '-'} are at risk` });
    desktops.push(p.desktopId);
  }
  await ctx.audit({ actor: 'system', action: 'host-lost', outcome: 'failed', detail: `host ${h.id} ${why}; desktops marked: ${desktops.length ? desktops.join(', ') : 'none'}` });
}

/** What each host has left: desktops placed and on it count against its vCPUs, RAM and desktop slots. */
async function freeCapacity(ctx: BrokerContext, h: HostRow) {
  const on = (await ctx.hosts.placements(h.id)).filter((p) => ON_HOST.includes(p.state));
  return { vcpus: h.vcpus - on.reduce((n, p) => n + p.vcpus, 0), ramMiB: h.ramMiB - on.reduce((n, p) => n + p.ramMiB, 0), desktops: h.maxDesktops - on.length };
}

async function fits(ctx: BrokerContext, h: HostRow, desktop: DesktopRow): Promise<{ ok: boolean; freeRamMiB: number }> {
  const free = await freeCapacity(ctx, h);
  return { ok: alive(h) && free.desktops >= 1 && free.vcpus >= desktop.config.vcpus && free.ramMiB >= desktop.config.ramMiB, freeRamMiB: free.ramMiB };
}

/** A live host with room for the desktop: one that already holds its base first (fewer chunks to pull), then the most free RAM. */
async function chooseHost(ctx: BrokerContext, desktop: DesktopRow): Promise<HostRow | null> {
  const candidates: { h: HostRow; hasBase: boolean; freeRamMiB: number }[] = [];
  // A host that keeps an at-risk copy (fail-over) is not given the desktop again until an admin releases that copy.
  const keeping = new Set((await ctx.hosts.kept({ desktopId: desktop.id })).map((k) => k.hostId));
  for (const h of await ctx.hosts.hosts()) {
    if (keeping.has(h.id)) continue;
    const f = await fits(ctx, h, desktop);
    if (f.ok) candidates.push({ h, hasBase: (h.report.bases ?? []).includes(desktop.id), freeRamMiB: f.freeRamMiB });
  }
  candidates.sort((a, b) => Number(b.hasBase) - Number(a.hasBase) || b.freeRamMiB - a.freeRamMiB);
  return candidates[0]?.h ?? null;
}

/**
 * A power operation by an admin, or by an entitled user where policy allows (routes check that):
 * on places the desktop on a host (or on the host that keeps its chain) and tells it to start;
 * off (forced), shutdown (ACPI, forced after a bounded wait) and reset go to the host that runs it.
 */
export async function powerDesktop(ctx: BrokerContext, actor: string, desktop: DesktopRow, action: PowerAction): Promise<{ state: string; host: string }> {
  const audit = `power-${action}`;
  await sweepHosts(ctx);
  const locked = await checkedOutRefusal(ctx, desktop);
  if (locked) throw await refuse(ctx, actor, desktop.id, audit, 409, 'locked', locked);
  const p = await ctx.hosts.placement(desktop.id);
  if (action !== 'on') {
    if (!p && (action === 'off' || action === 'shutdown') && (await ctx.hypervisor.isRunning(desktop.id))) return await legacyPowerOff(ctx, actor, desktop, audit);
    if (!p || p.state !== 'running') throw await refuse(ctx, actor, desktop.id, audit, 409, 'not-running', `${desktop.name} is not running on a host${p ? ` (it is ${p.state} on ${p.hostId})` : ''}`);
    if (action !== 'reset' && !(await ctx.hosts.transition(desktop.id, ['running'], 'stopping'))) throw await refuse(ctx, actor, desktop.id, audit, 409, 'busy', `${desktop.name} changed state meanwhile; try again`);
    await ctx.hosts.queue({ hostId: p.hostId, desktopId: desktop.id, type: action });
    await ctx.audit({ actor, desktopId: desktop.id, action: audit, outcome: 'ok', detail: `sent to host ${p.hostId}` });
    return { state: action === 'reset' ? 'running' : 'stopping', host: p.hostId };
  }
  if (!desktop.currentSnapshot) throw await refuse(ctx, actor, desktop.id, audit, 409, 'no-snapshot', `${desktop.name} has no disk image yet`);
  let hostId: string;
  if (p) {
    if (p.state !== 'stopped') throw await refuse(ctx, actor, desktop.id, audit, 409, p.state === 'lost' ? 'host-lost' : 'already-running', p.state === 'lost' ? lostMessage(p, desktop.name) : `${desktop.name} is already ${p.state} on host ${p.hostId}`);
    // Its chain (and what the guest wrote) is on that host: it starts there again, or not at all.
    const h = await ctx.hosts.host(p.hostId);
    if (!h || !(await fits(ctx, h, desktop)).ok) throw await refuse(ctx, actor, desktop.id, audit, 503, 'host-unavailable', `${desktop.name} keeps its online changes on host ${p.hostId}, which is ${h && alive(h) ? 'full' : 'not answering'}`);
    if (!(await ctx.hosts.transition(desktop.id, ['stopped'], 'starting', { snapshotId: desktop.currentSnapshot }))) throw await refuse(ctx, actor, desktop.id, audit, 409, 'busy', `${desktop.name} changed state meanwhile; try again`);
    hostId = h.id;
  } else {
    const h = await chooseHost(ctx, desktop);
    if (!h) throw await refuse(ctx, actor, desktop.id, audit, 503, 'no-host', `no desktop host with ${desktop.config.vcpus} vCPUs and ${desktop.config.ramMiB} MiB free is answering (\`carryon admin hosts list\`)`);
    if (!(await ctx.hosts.place({ desktopId: desktop.id, hostId: h.id, snapshotId: desktop.currentSnapshot, vcpus: desktop.config.vcpus, ramMiB: desktop.config.ramMiB }))) {
      throw await refuse(ctx, actor, desktop.id, audit, 409, 'already-running', `${desktop.name} was started meanwhile`);
    }
    hostId = h.id;
  }
  // A check-out that locked between our check and the placement: one of the two sees the other (both insert, then check).
  const raced = await checkedOutRefusal(ctx, desktop);
  if (raced) {
    if (!p) await ctx.hosts.unplace(desktop.id, ['starting']);
    else await ctx.hosts.transition(desktop.id, ['starting'], 'stopped');
    throw await refuse(ctx, actor, desktop.id, audit, 409, 'locked', raced);
  }
  await ctx.hosts.queue({ hostId, desktopId: desktop.id, type: 'start' });
  await ctx.meta.setPowerState(desktop.id, 'starting');
  await ctx.audit({ actor, desktopId: desktop.id, action: audit, outcome: 'ok', detail: `placed on host ${hostId} (snapshot ${desktop.currentSnapshot})` });
  return { state: 'starting', host: hostId };
}

/**
 * Policy `startOnlineAfterCheckin`: once a laptop checked the desktop in, it runs on a host again
 * (placed as a power-on; a host that kept its base pulls only the chunks that changed). A refusal
 * (no host free) is audited by powerDesktop and leaves the check-in as it is.
 */
export async function startAfterCheckin(ctx: BrokerContext, user: string, desktopId: string): Promise<void> {
  const desktop = await ctx.meta.getDesktop(desktopId);
  if (!desktop || !(await effectivePolicy(ctx.meta, user, desktop)).startOnlineAfterCheckin.value) return;
  try {
    await powerDesktop(ctx, 'system', desktop, 'on');
  } catch (err) {
    if (!(err instanceof HttpError)) await ctx.audit({ actor: 'system', desktopId, action: 'power-on', outcome: 'failed', detail: `after check-in: ${(err as Error).message}` });
  }
}

/** A datacenter QEMU something else started (`--hypervisor qmp`): stopped over its QMP socket, as before hosts. */
async function legacyPowerOff(ctx: BrokerContext, actor: string, desktop: DesktopRow, audit: string) {
  await ctx.hypervisor.powerOff(desktop.id);
  await ctx.meta.setPowerState(desktop.id, 'off');
  await ctx.audit({ actor, desktopId: desktop.id, action: audit, outcome: 'ok', detail: `${ctx.hypervisor.kind} hypervisor` });
  return { state: 'off', host: ctx.hypervisor.kind };
}

/**
 * What the host needs to start a desktop: its config, manifests, lineage keys (over the pinned
 * TLS link to the authenticated host; it keeps them in memory only) and a download job for the
 * chunks it lacks. Only for a desktop placed on this host and starting.
 */
export async function prepareStart(ctx: BrokerContext, hostId: string, desktopId: string) {
  const p = await ctx.hosts.placement(desktopId);
  if (!p || p.hostId !== hostId || p.state !== 'starting') {
    await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'host-prepare', outcome: 'denied', detail: p ? `placement is ${p.state} on ${p.hostId}` : 'not placed' });
    throw new HttpError(409, 'not-starting', `desktop ${desktopId} is not starting on host ${hostId}`, {}, true);
  }
  const desktop = (await ctx.meta.getDesktop(desktopId))!;
  const snapshot = p.snapshotId ? await ctx.meta.getSnapshot(p.snapshotId) : null;
  if (!snapshot) throw new HttpError(409, 'no-snapshot', `desktop ${desktop.name} has no snapshot to start from`);
  const disks = [];
  for (const d of snapshot.disks) {
    const raw = await ctx.store.getManifest(d.digest);
    if (!raw) throw new HttpError(500, 'manifest-missing', `manifest ${d.digest} is missing from the store`);
    disks.push({ name: d.name, digest: d.digest, manifest: encodeManifest(decodeManifest(raw)).toString('base64') });
  }
  const keyRef = await lineageKeysFor(ctx, desktop);
  // A start asked again (the host restarted mid-fill): its earlier job gives its slot back at once.
  if (p.jobId) await ctx.scheduler.finish(p.jobId, 'cancelled');
  const job = await ctx.scheduler.enqueue({ kind: 'checkout', checkoutId: hostJobOwner(hostId, desktopId), desktopId, manifests: snapshot.disks.map((d) => d.digest), ...keyRef }, 'internal');
  await ctx.hosts.transition(desktopId, ['starting'], 'starting', { jobId: job.id });
  await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'ticket-issue', outcome: 'ok', detail: `job ${job.id} (host start, snapshot ${snapshot.id})${job.transfer ? ` on ${job.transfer.url}` : ''}` });
  return {
    desktop: { id: desktop.id, name: desktop.name, config: { vcpus: desktop.config.vcpus, ramMiB: desktop.config.ramMiB, nic: desktop.config.nic } },
    snapshotId: snapshot.id,
    keys: ctx.keysFor(Buffer.from(keyRef.wrappedKeys, 'base64'), keyRef.keyContext),
    disks,
    job,
    // Background replicas while it runs there (hosts/replica.ts): the desktop's policy, as a laptop's.
    replicateEveryMin: (await effectivePolicy(ctx.meta, null, desktop)).replicationIntervalMin.value,
  };
}

/** A host's heartbeat: reconciles what it says runs with the placements, and hands it its pending commands. */
export async function hostHeartbeat(ctx: BrokerContext, host: HostRow, report: HostReport): Promise<HostCommandRow[]> {
  const said = new Map((report.desktops ?? []).map((d) => [d.desktopId, d]));
  for (const p of await ctx.hosts.placements(host.id)) {
    const r = said.get(p.desktopId);
    if (r?.state === 'running' && p.state === 'lost') {
      if (await ctx.hosts.transition(p.desktopId, ['lost'], 'running', { detail: null })) {
        await ctx.meta.setPowerState(p.desktopId, 'on');
        await ctx.audit({ actor: `host:${host.id}`, desktopId: p.desktopId, action: 'host-back', outcome: 'info', detail: 'the host answers again and the desktop still runs there' });
      }
    } else if (!r || r.state === 'stopped') {
      // The guest powered itself off, QEMU died, or the host restarted: the chain stays there.
      if ((p.state === 'running' || p.state === 'lost') && (await ctx.hosts.transition(p.desktopId, [p.state], 'stopped', { detail: r?.detail ?? 'not running on the host' }))) {
        await ctx.meta.setPowerState(p.desktopId, 'off');
        await ctx.audit({ actor: `host:${host.id}`, desktopId: p.desktopId, action: 'guest-stopped', outcome: 'info', detail: r?.detail ?? 'no longer running on the host' });
      }
    }
  }
  for (const k of await ctx.hosts.kept({ hostId: host.id })) {
    const r = said.get(k.desktopId);
    if (r?.state !== 'running' || (await ctx.hosts.pending(host.id)).some((c) => c.desktopId === k.desktopId && c.type === 'off')) continue;
    // Back after a fail-over: its guest must not run beside the new one; powered off, its chain (the at-risk writes) kept.
    await ctx.hosts.queue({ hostId: host.id, desktopId: k.desktopId, type: 'off' });
    await ctx.audit({ actor: 'system', desktopId: k.desktopId, action: 'power-off', outcome: 'ok', detail: `host ${host.id} is back and still ran this desktop, which failed over meanwhile: powered off there, its writes kept (at risk) until released` });
  }
  return ctx.hosts.pending(host.id);
}

/** The outcome of a command the host carried out. */
export async function hostAck(ctx: BrokerContext, hostId: string, commandId: string, r: { ok: boolean; message: string | null; kept?: boolean; guest?: 'running' | 'stopped' }): Promise<void> {
  const c = await ctx.hosts.command(commandId);
  if (!c || !(await ctx.hosts.ack(commandId, hostId, r.ok, r.message))) throw new HttpError(404, 'not-found', `no pending command ${commandId} for host ${hostId}`);
  const actor = `host:${hostId}`;
  // Only this host's placement follows its answers (after a fail-over the desktop is placed on another host).
  const placed = await ctx.hosts.placement(c.desktopId);
  const p = placed?.hostId === hostId ? placed : null;
  await ctx.audit({ actor, desktopId: c.desktopId, action: `host-${c.type}`, outcome: r.ok ? 'ok' : 'failed', detail: r.message ?? undefined });
  if (c.type === 'start') await endStart(ctx, c, p, r);
  else if (c.type === 'handover' && (!r.ok || p?.state === 'returning')) await handoverFailed(ctx, hostId, c.desktopId, r.ok ? 'the host ended the handover without sending the desktop back' : r.message, r.guest ?? 'stopped');
  else if ((c.type === 'off' || c.type === 'shutdown') && p?.state === 'stopping') {
    if (await ctx.hosts.transition(c.desktopId, ['stopping'], r.ok ? 'stopped' : 'running', { detail: r.message })) await ctx.meta.setPowerState(c.desktopId, r.ok ? 'off' : 'on');
  }
}

async function endStart(ctx: BrokerContext, c: HostCommandRow, p: PlacementRow | null, r: { ok: boolean; message: string | null; kept?: boolean }): Promise<void> {
  if (p?.jobId) await ctx.scheduler.finish(p.jobId, r.ok ? 'done' : 'failed');
  if (!p || p.state !== 'starting') return;
  if (r.ok) {
    if (await ctx.hosts.transition(c.desktopId, ['starting'], 'running', { detail: null, jobId: null })) await ctx.meta.setPowerState(c.desktopId, 'on');
    return;
  }
  // A start that failed: nothing of the guest's on the host (no top layer) frees the desktop; else it stays there, stopped.
  if (r.kept) await ctx.hosts.transition(c.desktopId, ['starting'], 'stopped', { detail: r.message, jobId: null });
  else await ctx.hosts.unplace(c.desktopId, ['starting']);
  await ctx.meta.setPowerState(c.desktopId, 'off');
}

/**
 * An admin's decision for a desktop whose online changes are on a host (stopped there, or the host
 * lost): forget them. The placement ends and the host deletes the desktop's top layer when it hears.
 */
export async function releaseDesktop(ctx: BrokerContext, actor: string, desktop: DesktopRow, reason?: string, hostId?: string): Promise<{ released: string }> {
  const p = await ctx.hosts.placement(desktop.id);
  // The at-risk copy a lost host keeps after a fail-over: named by its host.
  if (hostId && p?.hostId !== hostId) {
    if (!(await ctx.hosts.unkeep(desktop.id, hostId))) throw await refuse(ctx, actor, desktop.id, 'host-release', 404, 'not-kept', `host ${hostId} keeps no copy of ${desktop.name}`);
    await ctx.hosts.queue({ hostId, desktopId: desktop.id, type: 'discard' });
    await ctx.audit({ actor, desktopId: desktop.id, action: 'host-release', outcome: 'ok', detail: `the at-risk copy on host ${hostId} discarded${reason ? `: ${reason}` : ''}` });
    return { released: hostId };
  }
  if (!p) throw await refuse(ctx, actor, desktop.id, 'host-release', 404, 'not-placed', `${desktop.name} is on no host`);
  if (ON_HOST.includes(p.state)) throw await refuse(ctx, actor, desktop.id, 'host-release', 409, 'running', `${desktop.name} is ${p.state} on host ${p.hostId}: stop it first`);
  if (!(await ctx.hosts.unplace(desktop.id, ['stopped', 'lost']))) throw await refuse(ctx, actor, desktop.id, 'host-release', 409, 'busy', `${desktop.name} changed state meanwhile; try again`);
  await ctx.hosts.queue({ hostId: p.hostId, desktopId: desktop.id, type: 'discard' });
  await ctx.meta.setPowerState(desktop.id, 'off');
  await ctx.audit({ actor, desktopId: desktop.id, action: 'host-release', outcome: 'ok', detail: `online changes on host ${p.hostId} (${p.state} since ${p.updatedAt}) discarded${reason ? `: ${reason}` : ''}` });
  return { released: p.hostId };
}

/**
 * An admin's explicit decision for a desktop whose host is lost: start it on another host from its
 * last snapshot. What the guest wrote on the lost host since that snapshot is said to be at risk;
 * the lost host keeps it (its chain is not touched) until an admin releases it; if that host comes
 * back, its guest is powered off there (host heartbeats), never run beside the new one.
 */
export async function failOver(ctx: BrokerContext, actor: string, desktop: DesktopRow, reason?: string): Promise<{ state: string; host: string; atRisk: string }> {
  await sweepHosts(ctx);
  const p = await ctx.hosts.placement(desktop.id);
  if (!p || p.state !== 'lost') throw await refuse(ctx, actor, desktop.id, 'failover', 409, 'not-lost', `${desktop.name} is ${p ? `${p.state} on host ${p.hostId}` : 'on no host'}: only a desktop whose host is lost fails over`);
  await ctx.hosts.keep({ desktopId: desktop.id, hostId: p.hostId, snapshotId: p.snapshotId, reason: reason ?? null });
  if (!(await ctx.hosts.unplace(desktop.id, ['lost']))) throw await refuse(ctx, actor, desktop.id, 'failover', 409, 'busy', `${desktop.name} changed state meanwhile; try again`);
  // The lost host's open jobs for it (a background replica cut off mid-way) give their slots back.
  await ctx.scheduler.finishForCheckout(hostJobOwner(p.hostId, desktop.id), 'cancelled');
  const atRisk = `what the guest wrote on host ${p.hostId} since snapshot ${desktop.currentSnapshot ?? '-'} (running there since ${p.since}) is at risk: that host keeps it until \`carryon admin hosts release ${desktop.name} --host ${p.hostId}\``;
  await ctx.audit({ actor, desktopId: desktop.id, action: 'failover', outcome: 'ok', detail: `${atRisk}${reason ? `; reason: ${reason}` : ''}` });
  try {
    const on = await powerDesktop(ctx, actor, desktop, 'on');
    return { ...on, atRisk };
  } catch (err) {
    // No host free: the desktop is off, the at-risk copy recorded; power on later starts it.
    await ctx.meta.setPowerState(desktop.id, 'off');
    throw err;
  }
}

/** `carryon admin hosts list`: each host, its capacity and what is free, what runs there, its health. */
export async function hostsOverview(ctx: BrokerContext) {
  await sweepHosts(ctx);
  const out = [];
  for (const h of await ctx.hosts.hosts()) {
    const placed = await ctx.hosts.placements(h.id);
    out.push({
      id: h.id, displayUrl: h.displayUrl, accel: h.accel, health: alive(h) ? 'ok' : h.health === 'ok' ? 'late' : h.health, lastSeen: h.lastSeen, registeredAt: h.registeredAt,
      capacity: { vcpus: h.vcpus, ramMiB: h.ramMiB, desktops: h.maxDesktops }, free: await freeCapacity(ctx, h),
      desktops: [
        ...placed.map((p) => ({ desktopId: p.desktopId, state: p.state, since: p.since, detail: p.detail, pid: h.report.desktops?.find((d) => d.desktopId === p.desktopId)?.pid ?? null })),
        ...(await ctx.hosts.kept({ hostId: h.id })).map((k) => ({ desktopId: k.desktopId, state: 'kept', since: k.since, detail: 'failed over elsewhere: the writes kept here are at risk until released', pid: null })),
      ],
      freeDiskBytes: h.report.freeDiskBytes ?? null,
    });
  }
  return { hosts: out };
}
